"""Predicted latency for a target you do not have: a roofline per operator, summed, scaled by an efficiency
factor per runtime fitted on devices that were measured. Always a PREDICTION, always shown with its fit error.

Per operator: FLOPs and the bytes it must read from DRAM (its weights; activations are taken to stay in
cache, and an embedding lookup reads only its rows) from the exported graph with the shapes of the bundle's
timed input; its time on a target is ``max(FLOPs / peak compute, bytes / memory
bandwidth)`` with the target profile's ``peak_fp32_gflops`` (``peak_int8_gops`` for integer matmuls) and
``memory.bandwidth_gbps``. The sum is the roofline time, the time the target could not beat. Real runtimes
reach a fraction of it: ``efficiency = roofline / measured`` per runtime (onnxruntime, LiteRT, ExecuTorch),
fitted as the geometric mean over every measured (device, artifact), and its fit error is the spread of the
log ratios (a factor: 1.3 means measured points sit within about x/÷1.3 of the fit).

Shapes come from running the graph once on this machine (ONNX: every intermediate value as an output; LiteRT:
the interpreter's tensors), because static shape inference does not know onnxruntime's fused quantized ops. A
.pte keeps its work inside an opaque XNNPACK blob, so its operators are counted on the bundle's ONNX graph of
the same recipe (or fp32) and the prediction says so.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import ConfigError
from edgeship.manifest import ArtifactRecord, Bundle

RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert", "pte": "executorch"}
_VIEWS = {"Reshape", "Shape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Constant", "ConstantOfShape",
          "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "SHAPE"}
_HEAVY = {"Softmax": 5, "LayerNormalization": 8, "SkipLayerNormalization": 8, "EmbedLayerNormalization": 8,
          "QEmbedLayerNormalization": 8, "Gelu": 8, "BiasGelu": 8, "FastGelu": 8, "Erf": 8, "Tanh": 8, "Exp": 4,
          "SOFTMAX": 5, "GELU": 8, "TANH": 8, "EXP": 4, "LOGISTIC": 4, "RSQRT": 4, "MEAN": 1, "SUM": 1}
_GATHERS = {"Gather", "EmbedLayerNormalization", "QEmbedLayerNormalization", "GATHER", "EMBEDDING_LOOKUP"}
_INT8_ONNX = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QAttention", "DynamicQuantizeMatMul"}


@dataclass(frozen=True)
class OpCost:
    op: str
    flops: float
    bytes: float
    int8: bool  # runs at the integer peak


@dataclass(frozen=True)
class GraphCost:
    artifact: str
    runtime: str
    ops: tuple[OpCost, ...]
    counted_on: str  # the graph the operators were counted on (a .pte's: the bundle's ONNX)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)

    def roofline_ms(self, peak_fp32_gflops: float, peak_int8_gops: float, bandwidth_gbps: float) -> float:
        t = 0.0
        for o in self.ops:
            peak = (peak_int8_gops if o.int8 else peak_fp32_gflops) * 1e9
            t += max(o.flops / peak, o.bytes / (bandwidth_gbps * 1e9))
        return t * 1e3


# --- counting the graph -------------------------------------------------------------------------------------------

def _numel(shape: Sequence[int]) -> float:
    return float(np.prod([max(int(d), 1) for d in shape])) if len(shape) else 1.0


def _weight_bytes(op: str, weights: Sequence[tuple[tuple[int, ...], int]],
                  outs: Sequence[tuple[tuple[int, ...], int]]) -> float:
    """DRAM bytes of one operator: its weights, read once per inference. Activations are taken to stay in
    cache (an encoder's per-layer activations are well under a megabyte at batch 1); an embedding lookup reads
    only the rows it returns, not its table."""
    if not weights:
        return 0.0
    if op in _GATHERS:
        return sum(_numel(s) * b for s, b in outs[:1])
    return sum(_numel(s) * b for s, b in weights)


def _onnx_op(node: Any, shapes: Mapping[str, tuple[tuple[int, ...], int]], consts: set[str]) -> OpCost:
    """FLOPs and bytes of one ONNX node from the actual shapes (name -> (shape, itemsize)) of its values."""
    ins = [shapes[n] for n in node.input if n in shapes]
    outs = [shapes[n] for n in node.output if n in shapes]
    moved = _weight_bytes(node.op_type, [shapes[n] for n in node.input if n in consts and n in shapes], outs)
    n_out = sum(_numel(s) for s, _ in outs[:1])
    op, flops = node.op_type, n_out
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "FusedMatMul") and ins:
        flops = 2 * n_out * ins[0][0][-1]
    elif op == "Gemm" and ins:
        flops = 2 * n_out * ins[0][0][-1] + n_out
    elif op in ("Conv", "ConvInteger", "QLinearConv") and len(ins) > 1:
        w = ins[3 if op == "QLinearConv" else 1][0]
        flops = 2 * n_out * _numel(w[1:])
    elif op in ("Attention", "QAttention") and len(ins) > 1:  # QKV projection + scores + weighted sum
        (b, s, h), w = ins[0][0][:3], ins[1][0]
        flops = 2 * b * s * h * w[-1] + 4 * b * s * s * h
    elif op in _VIEWS or op in ("Cast", "Gather", "Transpose", "Concat", "Slice", "Split", "Expand", "Range"):
        flops = 0.0
    else:
        flops = n_out * _HEAVY.get(op, 1)
    return OpCost(op, float(flops), moved, op in _INT8_ONNX)


def _onnx_cost(path: Path, feeds: Mapping[str, np.ndarray]) -> list[OpCost]:
    try:
        import onnx
    except ImportError:
        raise ConfigError("predicting an ONNX or .pte artifact reads its graph with the onnx package: "
                          "pip install 'edgeship[export]'") from None
    import onnxruntime as ort

    model = onnx.load(str(path))
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for init in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        shapes[init.name] = (tuple(init.dims), itemsize)
    known = {o.name for o in model.graph.output}
    names = [o for n in model.graph.node for o in n.output if o and o not in known]
    model.graph.output.extend([onnx.ValueInfoProto(name=n) for n in names])  # every value, to read its shape
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the file's nodes, as exported
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    feed = {k: v for k, v in feeds.items() if k in wanted}
    for name, arr in zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True):
        a = np.asarray(arr)
        shapes[name] = (a.shape, a.dtype.itemsize)
    for k, v in feed.items():
        shapes[k] = (v.shape, v.dtype.itemsize)
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [_onnx_op(n, shapes, consts) for n in model.graph.node]


def _tflite_cost(path: Path, feeds: Mapping[str, np.ndarray]) -> list[OpCost]:
    from edgeship.profiling.backends import load  # the LiteRT interpreter edgeship already runs

    model = load(path, "tflite", threads=1, options={"xnnpack": False})  # the graph's own ops, not a delegate node
    model.run(model.adapt_feeds(dict(feeds)))  # the tensors take the timed input's shapes
    interp = getattr(model, "interpreter", None)
    if interp is None or not hasattr(interp, "_get_ops_details"):
        raise ConfigError(f"{path.name}: this LiteRT build does not list its operators (_get_ops_details)")
    tensors = {t["index"]: t for t in interp.get_tensor_details()}
    details = interp._get_ops_details()
    produced = {i for d in details for i in d["outputs"]} | {int(t["index"]) for t in interp.get_input_details()}
    ops = []
    for d in details:
        ins = [tensors[i] for i in d["inputs"] if i >= 0 and i in tensors]
        outs = [tensors[i] for i in d["outputs"] if i in tensors]
        name = str(d["op_name"])
        weights = [(tuple(t["shape"]), np.dtype(t["dtype"]).itemsize) for t in ins if t["index"] not in produced]
        moved = _weight_bytes(name, weights, [(tuple(t["shape"]), np.dtype(t["dtype"]).itemsize) for t in outs])
        n_out = sum(_numel(t["shape"]) for t in outs[:1])
        int8 = len(ins) > 1 and np.dtype(ins[1]["dtype"]) == np.int8
        if name == "FULLY_CONNECTED" and len(ins) > 1:
            flops = 2 * n_out * ins[1]["shape"][-1]
        elif name == "BATCH_MATMUL" and ins:
            flops = 2 * n_out * ins[0]["shape"][-1]
        elif name in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(ins) > 1:
            w = ins[1]["shape"]
            flops = 2 * n_out * (_numel(w[1:]) if name == "CONV_2D" else _numel(w[1:3]))
        elif name in _VIEWS or name in ("GATHER", "TRANSPOSE", "CONCATENATION", "SLICE", "STRIDED_SLICE", "CAST"):
            flops = 0.0
        else:
            flops = n_out * _HEAVY.get(name, 1)
        ops.append(OpCost(name, float(flops), moved, int8 and name in ("FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D")))
    return ops


def _feeds(bundle: Bundle) -> dict[str, np.ndarray]:
    """The input the profiler times by default: the bundle's first held-out sample, else zeros of default dims."""
    s = bundle.manifest.samples
    if s.get("inputs"):
        with np.load(bundle.root / s["inputs"]) as z:
            return {k: z[k][:1] for k in z.files}
    dims = bundle.manifest.default_dims()
    return {t.name: np.zeros([dims.get(d, 1) if isinstance(d, str) else d for d in t.shape], dtype=t.dtype)
            for t in bundle.manifest.inputs}


def graph_cost(bundle: Bundle, art: ArtifactRecord) -> GraphCost:
    runtime = RUNTIMES.get(art.format)
    if runtime is None:
        raise ConfigError(f"{art.key}: no roofline model for the {art.format} format (have: {', '.join(RUNTIMES)})")
    if art.format == "tflite":
        return GraphCost(art.key, runtime, tuple(_tflite_cost(bundle.path_of(art), _feeds(bundle))), art.key)
    onnx_art = art
    if art.format == "pte":  # the XNNPACK blob is opaque: count the same model's ONNX graph
        by_key = {a.key: a for a in bundle.manifest.artifacts}
        onnx_art = by_key.get(f"onnx/{art.recipe}") or by_key.get("onnx/fp32")  # type: ignore[assignment]
        if onnx_art is None:
            raise ConfigError(f"{art.key}: a .pte's operators are counted on the bundle's ONNX graph, and this "
                              "bundle has none; export --format onnx too")
    ops = _onnx_cost(bundle.path_of(onnx_art), _feeds(bundle))
    if art.format == "pte" and "int8" in art.recipe:  # XNNPACK runs the quantized linears in integer kernels
        ops = [dataclasses.replace(o, int8=True) if o.op in ("MatMul", "Gemm") else o for o in ops]
    return GraphCost(art.key, runtime, tuple(ops), onnx_art.key)


# --- fitting and predicting -------------------------------------------------------------------------------------

def _peaks(profile: Any) -> tuple[float, float, float]:
    return float(profile.peak_fp32_gflops), float(profile.peak_int8_gops), float(profile.memory_bandwidth_gbps)


@dataclass(frozen=True)
class Efficiency:
    """roofline / measured for one runtime, over ``points`` (device profile, artifact, roofline ms, measured ms)."""

    runtime: str
    efficiency: float
    fit_error: float  # x/÷ factor: exp of the RMS log residual (1.0 with a single point: no spread seen)
    points: tuple[tuple[str, str, float, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "efficiency": self.efficiency, "fit_error_factor": self.fit_error,
                "n_points": len(self.points), "points": [list(p) for p in self.points]}


def fit(points: Sequence[tuple[str, str, str, float, float]]) -> dict[str, Efficiency]:
    """Per runtime: geometric mean of roofline/measured over (runtime, profile, artifact, roofline, measured)."""
    out = {}
    for rt in sorted({p[0] for p in points}):
        mine = [p for p in points if p[0] == rt and p[3] > 0 and p[4] > 0]
        if not mine:
            continue
        logs = [math.log(p[3] / p[4]) for p in mine]
        mean = sum(logs) / len(logs)
        rms = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
        out[rt] = Efficiency(rt, math.exp(mean), math.exp(rms), tuple((p[1], p[2], p[3], p[4]) for p in mine))
    return out


@dataclass(frozen=True)
class Prediction:
    artifact: str
    runtime: str
    target: str
    roofline_ms: float
    predicted_ms: float | None  # None: no measured device for this runtime to fit its efficiency
    efficiency: float | None
    fit_error: float | None
    fit_points: int
    counted_on: str
    gflop: float
    mbytes: float
    measured_p50_ms: float | None = None  # measured on a device of this same target profile, when there is one
    kind: str = "prediction"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def predict(costs: Sequence[GraphCost], target: Any, fits: Mapping[str, Efficiency],
            measured: Mapping[str, float] | None = None) -> list[Prediction]:
    out = []
    for c in costs:
        roof = c.roofline_ms(*_peaks(target))
        eff = fits.get(c.runtime)
        out.append(Prediction(c.artifact, c.runtime, target.name, roof, roof / eff.efficiency if eff else None,
                              eff.efficiency if eff else None, eff.fit_error if eff else None,
                              len(eff.points) if eff else 0, c.counted_on, c.flops / 1e9, c.bytes / 2**20,
                              (measured or {}).get(c.artifact)))
    return out


def fit_points(costs: Mapping[str, GraphCost], results: Any, profile: Any) -> list[tuple[str, str, str, float, float]]:
    """(runtime, profile, artifact, roofline ms on ``profile``, measured p50 ms) for every measured artifact of
    ``results`` (a ProfileResult taken on a device described by ``profile``) that the bundle holds."""
    pts = []
    for r in results.results:
        c = costs.get(r.artifact)
        if c is None or not r.ok or r.latency is None or r.setting:  # a sweep's pinned settings are not the default
            continue
        pts.append((c.runtime, profile.name, r.artifact, c.roofline_ms(*_peaks(profile)), r.latency.p50_ms))
    return pts


def render(preds: Sequence[Prediction]) -> str:
    from edgeship.profiling.report import table

    rows = []
    for p in preds:
        pred = "-" if p.predicted_ms is None else f"{p.predicted_ms:.3g}"
        err = "-" if p.fit_error is None else f"x/÷{p.fit_error:.2f} (n={p.fit_points})"
        meas = "-" if p.measured_p50_ms is None else f"{p.measured_p50_ms:.3g}"
        ratio = "-" if p.measured_p50_ms is None or p.predicted_ms is None else f"{p.predicted_ms / p.measured_p50_ms:.2f}"
        rows.append([p.artifact, p.runtime, f"{p.gflop:.3g}", f"{p.mbytes:.3g}", f"{p.roofline_ms:.3g}",
                     "-" if p.efficiency is None else f"{p.efficiency:.3f}", pred, err, meas, ratio])
    head = ["artifact", "runtime", "GFLOP", "MB moved", "roofline ms", "efficiency", "PREDICTED p50 ms", "fit error",
            "measured p50 ms", "pred/meas"]
    notes = sorted({f"{p.artifact}: operators counted on {p.counted_on}" for p in preds if p.counted_on != p.artifact})
    lines = [f"PREDICTION for {preds[0].target} (roofline per operator x efficiency fitted on measured devices; "
             "not a measurement)" if preds else "no prediction", table(rows, head), *notes]
    missing = sorted({p.runtime for p in preds if p.predicted_ms is None})
    if missing:
        lines.append(f"no measured device for {', '.join(missing)}: give --fit RESULTS.json (and --fit-profile) to fit it")
    return "\n".join(lines)


def html_section(preds: Sequence[Prediction]) -> str:
    """Predicted next to measured, for the HTML report; every predicted number says it is one."""
    from edgeship.profiling.charts import esc
    from edgeship.profiling.html import _table

    body = []
    for p in preds:
        pred = "no fit" if p.predicted_ms is None else f"{p.predicted_ms:.3g} (PREDICTED)"
        err = "-" if p.fit_error is None else f"x/÷{p.fit_error:.2f} over {p.fit_points} measured"
        meas = "-" if p.measured_p50_ms is None else f"{p.measured_p50_ms:.3g}"
        ratio = ("-" if p.measured_p50_ms is None or p.predicted_ms is None
                 else f"{p.predicted_ms / p.measured_p50_ms:.2f}")
        body.append(("", [esc(p.artifact), esc(p.target), esc(p.runtime), f"{p.roofline_ms:.3g}",
                          f'<span class="est">{esc(pred)}</span>', esc(err), esc(meas), esc(ratio)]))
    return ("<h2>Predicted latency</h2><p class=\"est\">PREDICTIONS, not measurements: a roofline per operator "
            "(FLOPs and bytes of the exported graph against the target profile's peak compute and memory bandwidth), "
            "divided by an efficiency per runtime fitted on measured devices; the fit error is how far the measured "
            "points sit from that fit.</p>"
            + _table("Predicted vs measured p50", ["artifact", "target", "runtime", "roofline ms", "predicted p50 ms",
                                                   "fit error", "measured p50 ms", "predicted / measured"], body))


def save(preds: Sequence[Prediction], fits: Mapping[str, Efficiency], path: Path) -> None:
    from edgeship.profiling.runner import write_json_atomic

    write_json_atomic(path, json.dumps({"kind": "prediction", "schema_version": 1,
                                        "predictions": [p.to_dict() for p in preds],
                                        "efficiency": {k: v.to_dict() for k, v in fits.items()}}, indent=2))


def load_predictions(path: str | Path) -> list[Prediction]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"predictions file {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "prediction":
        raise ConfigError(f"{path}: not an `edgeship predict --json` file")
    names = {f.name for f in dataclasses.fields(Prediction)}
    return [Prediction(**{k: v for k, v in p.items() if k in names}) for p in doc.get("predictions", ())]
