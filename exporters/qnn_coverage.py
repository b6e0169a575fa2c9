"""Compile a QDQ ONNX model into a QNN HTP context model, and measure what the HTP took.

Coverage comes from the QNN execution provider's own partitioning, not from a list of ops we
believe the HTP supports: every node of the compile input that is *not* left in the compiled
context model went into an ``EPContext`` partition. The reason a node fell out is the EP's own
``Validation FAILED ... REASON`` line from its verbose log (captured from stderr during the
compile). FLOPs are estimates from static shapes: 2 x MACs for MatMul / Gemm / Conv, one per
output element for everything else.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeship.errors import ExportError

if TYPE_CHECKING:
    from edgeship.targets.schema import QnnTarget

_FAILED = re.compile(r"Validation FAILED for \d+ nodes in \w+ \((\w+)\)")
_NODE = re.compile(r"Operator type: (\S+) Node name: (.+?) Node index")
_REASON = re.compile(r"REASON : (.*)")
NO_REASON = "not claimed by the QNN EP (no validation failure logged)"


@dataclass(frozen=True)
class Compiled:
    context_model: Path
    binary: Path
    seconds: float
    coverage: dict[str, Any]
    versions: dict[str, str]
    ep_sdk_version: str


@contextlib.contextmanager
def captured_stderr(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (where onnxruntime's C++ logger writes) to ``path`` for the block."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def compile_context(qdq: Path, out_dir: Path, target: QnnTarget, name: str = "npu_ctx.onnx") -> Compiled:
    """Compile ``qdq`` for ``target`` into ``out_dir/name`` + ``out_dir/<stem>_qnn.bin``; measure coverage."""
    import onnx
    import onnxruntime as ort

    from edgeship.profiling.backends.qnn import qnn_versions, session_options

    out_dir.mkdir(parents=True, exist_ok=True)
    ctx_path = out_dir / name
    for stale in out_dir.iterdir():  # ORT refuses to overwrite an existing context model
        stale.unlink()
    so = session_options(target.htp_arch, target.soc_model, log_level=0)  # verbose: the EP's per-node verdicts
    # no ORT rewrites before partitioning, so the context model's leftover nodes keep the QDQ graph's names
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("ep.context_enable", "1")
    so.add_session_config_entry("ep.context_embed_mode", "0")  # the binary beside the model, as *_qnn.bin
    so.add_session_config_entry("ep.context_file_path", str(ctx_path))
    with tempfile.TemporaryDirectory(prefix="edgeship-qnn-") as td:
        log = Path(td) / "qnn.log"
        t0 = time.perf_counter()
        try:
            with captured_stderr(log):
                ort.InferenceSession(str(qdq), sess_options=so)
        except Exception as e:
            tail = [x for x in log.read_text(errors="replace").splitlines() if "[E:" in x][-1:]
            raise ExportError(f"onnx/npu: the QNN HTP compile for htp_arch {target.htp_arch} failed: "
                              f"{str(e).strip().splitlines()[0][:300]}{' / ' + tail[0][-200:] if tail else ''}") from None
        seconds = time.perf_counter() - t0
        reasons = failed_nodes(log.read_text(errors="replace"))
    bins = sorted(out_dir.glob("*.bin"))
    if not ctx_path.is_file() or len(bins) != 1:
        raise ExportError(f"onnx/npu: the QNN EP wrote no context model + one binary in {out_dir} "
                          f"(found {', '.join(p.name for p in out_dir.iterdir()) or 'nothing'})")
    ctx_model = onnx.load(str(ctx_path))
    ep_nodes = [n for n in ctx_model.graph.node if n.op_type == "EPContext"]
    if not ep_nodes:
        raise ExportError("onnx/npu: the QNN EP took no node of the graph; nothing runs on the HTP")
    sdk = next((a.s.decode() for n in ep_nodes for a in n.attribute if a.name == "ep_sdk_version"), "")
    cov = coverage(onnx.load(str(qdq)), ctx_model, reasons, target.min_flops_coverage)
    return Compiled(ctx_path, bins[0], seconds, cov, qnn_versions(), sdk)


def failed_nodes(log: str) -> dict[str, tuple[str, str]]:
    """node name -> (unit op type, the EP's reason), from the QNN EP's verbose validation log."""
    out: dict[str, tuple[str, str]] = {}
    unit, names = "", list[str]()
    for line in log.splitlines():
        if m := _FAILED.search(line):
            unit, names = m.group(1), []
        elif unit and (m := _NODE.search(line)):
            names.append(m.group(2))
        elif unit and (m := _REASON.search(line)):
            for n in names:
                out.setdefault(n, (unit, m.group(1).strip()))
            unit, names = "", []
    return out


def node_flops(model: Any) -> dict[str, float]:
    """Estimated FLOPs per node name from (static) shape inference."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(int(d.dim_value) for d in dims)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for node in inferred.graph.node:  # onnx leaves 16-bit Q/DQ outputs unshaped; they keep their input's shape
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] in shapes:
            shapes.setdefault(node.output[0], shapes[node.input[0]])
    out: dict[str, float] = {}
    for node in inferred.graph.node:
        shp = next((shapes[o] for o in node.output if o in shapes), None) or \
            next((shapes[i] for i in node.input if i in shapes), ())
        elems = float(np.prod(shp, dtype=np.float64)) if shp else 0.0
        a = shapes.get(node.input[0], ()) if node.input else ()
        w = shapes.get(node.input[1], ()) if len(node.input) > 1 else ()
        if node.op_type in ("MatMul", "Gemm") and a:
            trans_a = any(x.name == "transA" and x.i for x in node.attribute)
            k = a[0] if node.op_type == "Gemm" and trans_a else a[-1]
            out[node.name] = 2.0 * elems * k
        elif node.op_type == "Conv" and len(w) >= 3:
            out[node.name] = 2.0 * elems * float(np.prod(w[1:], dtype=np.float64))
        else:
            out[node.name] = elems
    return out


def coverage(source: Any, context_model: Any, reasons: dict[str, tuple[str, str]], minimum: float) -> dict[str, Any]:
    """Nodes and estimated FLOPs inside the HTP partitions vs left to the CPU, with why they fell out."""
    flops = node_flops(source)
    op_of = {n.name: n.op_type for n in source.graph.node}
    left = [n for n in context_model.graph.node if n.op_type != "EPContext"]
    cpu_names = {n.name for n in left}
    unknown = sorted(n.name for n in left if n.name not in op_of)  # nodes ORT made itself: not in the QDQ graph
    total = sum(flops.values())
    cpu = sum(flops.get(n, 0.0) for n in cpu_names)
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for n in left:
        unit, reason = reasons.get(n.name, (n.op_type, NO_REASON))
        g = groups.setdefault((n.op_type, reason), {"op_type": n.op_type, "nodes": 0, "flops": 0.0, "unit": unit,
                                                     "reason": reason, "examples": []})
        g["nodes"] += 1
        g["flops"] += flops.get(n.name, 0.0)
        if len(g["examples"]) < 3:
            g["examples"].append(n.name)
    fell = sorted(groups.values(), key=lambda g: (-g["flops"], g["op_type"]))
    share = (total - cpu) / total if total else 0.0
    return {
        "method": "the QNN EP's partitioning of the static QDQ graph (nodes missing from the compiled context model "
                  "ran into EPContext partitions); reasons from the EP's validation log",
        "flops_note": "estimated from static shapes: 2 x MACs for MatMul/Gemm/Conv, one per output element otherwise",
        "partitions": sum(1 for n in context_model.graph.node if n.op_type == "EPContext"),
        "nodes_total": len(op_of), "nodes_htp": len(op_of) - len(cpu_names - set(unknown)),
        "nodes_cpu": len(cpu_names), "flops_total": total, "flops_htp": total - cpu, "flops_cpu": cpu,
        "flops_share_htp": round(share, 6), "min_flops_coverage": minimum, "passed": share >= minimum,
        "fell_out": fell, "unmatched_cpu_nodes": unknown,
    }


__all__ = ["Compiled", "compile_context", "coverage", "failed_nodes", "node_flops"]
