"""Decoder LLMs to an ONNX Runtime GenAI folder, with onnxruntime-genai's own model builder.

The builder re-authors the HF model as one ONNX graph with GroupQueryAttention and a KV cache that the GenAI
runtime keeps in a buffer of ``search.max_length`` tokens (``past_present_share_buffer``): we set that to the
request's max context, so the cache is static and its size known at export. Quantized recipes become
``MatMulNBits`` (block-wise weights; ``accuracy_level=4`` makes the CPU kernel quantize activations to int8 at run
time, i.e. dynamic 8-bit activations; matmuls whose int8 activations change a greedy answer get ``accuracy_level=1``
in 4-bit or stay fp32 MatMuls in 8-bit, within a budget, see ``llm_keep``). Embedding tables stay fp32 (MatMuls
only are quantized; a tied lm_head gets its own quantized copy). The quantized recipes are not the builder's
int4/int8: the builder writes fp32 and our own pass (``onnx_affine4``) quantizes each MatMul to affine blocks with an
exact per-block offset, which keeps a 4-bit source (a GGUF) on its own grid (SmolLM2 int4 top-1 agreement: builder
0.648, ours: see the README).

The KV cache is fp32 (the CPU graph's I/O dtype), or int8 with ``kv_cache="int8"``: the builder's
``kv_cache_quant_scheme=int8_per_channel`` with one scale per channel (KV head x head dim) per layer, which we
calibrate as the absmax of PyTorch's cached K and V (after RoPE, as the cache holds them) over text the fidelity
check never reads, plain and chat-templated (see ``edgeship.llm.calibration_sequences``). SmolLM2-135M at
context 2048: 94 -> 24 MB, decode as fast, prefill slower, top-1 about 0.02 lower (README).

The builder runs in a child process: it prints a progress line per tensor and holds a second copy of the weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.errors import ExportError, RuntimeMissingError, UnsupportedRecipeError
from edgeship.exporters.base import Stage
from edgeship.exporters.llm_base import (
    KV_CACHE_DTYPES,
    LLM_EXPORTERS,
    LLMExportRequest,
    LLMExportResult,
    kv_cache_bytes_per_token,
)
from edgeship.exporters.onnx_affine4 import BlockCache

GENAI_CONFIG = "genai_config.json"
KV_SCALES = "kv-cache-scales.json"  # the builder's kv_cache_scale_file (workdir only; the scales end in the graph)
INT8_MAX = 127
FP32_ACTIVATIONS = 1  # MatMulNBits accuracy_level with fp32 activations (MLAS has a fast kernel for 4-bit weights)


@dataclass(frozen=True)
class BuilderRecipe:
    precision: str  # the builder's -p
    accuracy_level: int | None  # MatMulNBits: 4 = int8 activations at run time
    how: str
    affine_bits: int | None = None  # build fp32, then quantize MatMuls with onnx_affine4 (exact per-block offsets)


#: our recipe -> builder settings. The one table: export, the manifest's quantization entry and the docs read it.
RECIPES: dict[str, BuilderRecipe] = {
    "fp32": BuilderRecipe("fp32", None, "fp32 weights and activations"),
    "int8-dynamic": BuilderRecipe("fp32", 4, "8-bit block-wise affine weights (MatMulNBits uint8 + zero point) with "
                                  "an exact per-block offset correction, int8 activations at run time except the "
                                  "matmuls the greedy check keeps as fp32 MatMuls; embeddings fp32", affine_bits=8),
    # accuracy_level 4 (int8 activations, as llama.cpp's Q8 activations): SmolLM2 top-1 0.965 at 1.07x llama.cpp's
    # decode speed, but a near-tie flips the France answer. When a greedy answer changes, llm_keep gives fp32
    # activations (accuracy_level 1) to the fewest 4-bit matmuls that restore it, within a budget: onnxruntime has
    # a fast fp32 kernel for 4-bit weights. Not for 8-bit ones (the 8-bit head at level 1 alone decoded at 10
    # tok/s: README), so int8 keeps those as plain fp32 MatMuls and the head is never a candidate
    "int4-weight": BuilderRecipe("fp32", 4, "4-bit block-wise affine weights (MatMulNBits uint4 + zero point) with "
                                 "an exact per-block offset correction, 8-bit LM head, int8 activations at run time "
                                 "except fp32 on the 4-bit matmuls the greedy check keeps; the embedding reads the "
                                 "head's blocks", affine_bits=4),
}


def builder_version() -> str:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise RuntimeMissingError("ONNX GenAI export needs onnxruntime-genai: pip install 'edgeship[llm]' "
                                  "(no wheel for Linux aarch64 upstream)") from None
    return str(og.__version__)


def kv_channel_scales(model: Any, sequences: Sequence[Sequence[int]]) -> dict[str, list[list[float]]]:
    """Per layer, symmetric int8 scales of the cached K and V, one per channel (KV head x head dim, the order
    onnxruntime's GroupQueryAttention reads): the absmax over every sequence / 127, as the builder's scale file
    wants them."""
    import torch

    if (n := sum(len(s) for s in sequences)) < 16:
        raise ExportError(f"onnx: an int8 KV cache needs calibration text; got {n} tokens (need >= 16)")
    k_max: list[Any] = []
    v_max: list[Any] = []
    for seq in sequences:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([list(seq)], dtype=torch.long), use_cache=True)
        cache = out.get("cache", out.get("past_key_values"))  # transformers renames it
        layers = getattr(cache, "layers", None)
        if not layers or not all(hasattr(layer, "keys") for layer in layers):
            raise ExportError(f"onnx: cannot read the K/V of this model's cache ({type(cache).__name__}) to calibrate "
                              "an int8 KV cache; export with --kv-cache fp32")
        # [batch, kv heads, positions, head dim] -> one absmax per kv head x head dim
        ks = [layer.keys[0].abs().amax(dim=1).flatten().float() for layer in layers]
        vs = [layer.values[0].abs().amax(dim=1).flatten().float() for layer in layers]
        k_max = ks if not k_max else [torch.maximum(a, b) for a, b in zip(k_max, ks, strict=True)]
        v_max = vs if not v_max else [torch.maximum(a, b) for a, b in zip(v_max, vs, strict=True)]

    def scales(amax: Any) -> list[float]:  # the builder refuses a zero scale (an all-zero channel)
        return [float(v) for v in (amax / INT8_MAX).clamp_min(1e-8)]

    return {"k_scales": [scales(a) for a in k_max], "v_scales": [scales(a) for a in v_max]}


def last_position_logits(model_path: Path) -> str:
    """Compute the LM head for the last position only: a Slice between the final norm and the head, and ``logits``
    ``[batch, 1, vocab]``. The builder's graph computes every prompt position's logits, which the GenAI runtime
    keeps only the last of (it reads either shape): SmolLM2 at a 256-token prompt spent 48 MB and ~17% of its time
    to first token on the others (README). Returns "last", or "every position" when the graph has another shape
    (left as built). The edit touches the graph file only; the weights stay in their external data file."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from edgeship.exporters.onnx_affine4 import LM_HEAD

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    head = next((n for n in g.node if "logits" in n.output), None)
    outputs = {o.name: o for o in g.output}
    if head is None or head.name != LM_HEAD or head.op_type != "MatMul" or head.input[0] in outputs:
        return "every position"
    hidden, last = head.input[0], head.input[0] + "/last_position"
    params = {"starts": -1, "ends": np.iinfo(np.int64).max, "axes": 1}
    g.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), f"/model/last_position/{k}")
                         for k, v in params.items())
    head.input[0] = last
    at = next(i for i, n in enumerate(g.node) if hidden in n.output)
    g.node.insert(at + 1, helper.make_node("Slice", [hidden, *(f"/model/last_position/{k}" for k in params)], [last],
                                           name="/model/last_position/Slice"))
    seq = outputs["logits"].type.tensor_type.shape.dim[1]
    seq.ClearField("dim_param")
    seq.dim_value = 1
    onnx.save(model, str(model_path))
    return "last"


def _builder_command(req: LLMExportRequest, spec: BuilderRecipe) -> list[str]:
    extra = []
    if req.kv_cache == "int8":
        extra += ["kv_cache_quant_scheme=int8_per_channel", f"kv_cache_scale_file={req.workdir / KV_SCALES}"]
    if spec.precision in ("int4", "int8"):
        # block-wise always: channel-wise int4 passes smoke tests and fails real tasks
        extra += [f"block_size={req.group_size}" if spec.precision == "int4" else "block_size=32",
                  f"accuracy_level={spec.accuracy_level}"]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(req.hf_dir), "-o", str(req.out),
           "-p", spec.precision, "-e", "cpu", "-c", str(req.workdir / "onnx-builder-cache")]
    return [*cmd, "--extra_options", *extra] if extra else cmd


def _last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or "not supported" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


class _Builds:
    """Quantized variants of the builder's fp32 graph, each a complete GenAI folder in the workdir, memoised."""

    def __init__(self, req: LLMExportRequest, spec: BuilderRecipe, name: str) -> None:
        self.req, self.spec, self.name = req, spec, name
        self.fp32 = req.workdir / "builder-fp32"
        req.out.rename(self.fp32)  # the builder's folder: every variant is made from it, the chosen one moved back
        self.block = req.group_size if spec.affine_bits == 4 else 32
        self.reports: dict[tuple[str, ...], tuple[Path, dict[str, Any]]] = {}
        self.blocks: BlockCache = {}  # every build quantizes the same weights the same way: once

    def build(self, fp32_activations: Sequence[str]) -> Path:
        from edgeship.exporters.onnx_affine4 import convert_file

        key = tuple(sorted(fp32_activations))
        if key not in self.reports:
            d = self.req.workdir / "tries" / f"fp32act{len(key)}-{len(self.reports)}"
            d.mkdir(parents=True)
            for f in self.fp32.iterdir():
                if not f.name.startswith(self.name):
                    shutil.copy2(f, d / f.name)
            # fp32 activations: a 4-bit matmul keeps its blocks at accuracy_level 1 (MLAS has a fast kernel for it);
            # an 8-bit one has none (it dequantizes its matrix on every call), so it stays a plain fp32 MatMul
            four = self.spec.affine_bits == 4
            try:
                with self.req.stage(Stage.QUANTIZE):  # inside the search: a build counts as quantize, its score as validate
                    report = convert_file(self.fp32 / self.name, d / self.name, f"{self.name}.data", block=self.block,
                                          accuracy_level=self.spec.accuracy_level or 4, bits=self.spec.affine_bits or 4,
                                          node_accuracy=dict.fromkeys(key if four else (), FP32_ACTIVATIONS),
                                          skip=() if four else key, cache=self.blocks)
            except (ValueError, OSError) as e:
                raise ExportError(f"onnx/{self.req.recipe}: the block pass failed on the builder's graph: {e}") from None
            self.reports[key] = (d, report.to_dict())
        return self.reports[key][0]

    def finish(self, chosen: Path) -> dict[str, Any]:
        report = next(r for d, r in self.reports.values() if d == chosen)
        chosen.rename(self.req.out)
        shutil.rmtree(self.req.workdir / "tries", ignore_errors=True)  # the others: ~150 MB each
        shutil.rmtree(self.fp32, ignore_errors=True)
        return report


def _quantize(req: LLMExportRequest, spec: BuilderRecipe, name: str, runtime: dict[str, Any],
              max_share: float) -> dict[str, Any]:
    """The block pass; with a scorer, and when int8 activations change a greedy answer, the fewest matmuls with
    fp32 activations that agree on the prompts fp32 activations everywhere agree on (see llm_keep)."""
    from edgeship.exporters.llm_keep import keep_fp32_activations
    from edgeship.exporters.onnx_affine4 import LM_HEAD  # it gets 8-bit blocks

    builds = _Builds(req, spec, name)
    # the LM head is never a candidate: fp32 activations there cost the most (it is the largest matmul)
    with req.stage(Stage.SEARCH):  # ranking on the PyTorch proxy; its builds and scores time as their own stages
        keep = keep_fp32_activations(req, builds.build, builds.fp32 / name, runtime, builds.block, {LM_HEAD},
                                     max_share=max_share)
    report = builds.finish(keep.artifact)
    report["fp32_activations"] = keep.record
    return report


def _max_share(req: LLMExportRequest) -> float:
    """The ``max_fp32_share`` option (default llm_keep's), checked before minutes of work."""
    from edgeship.exporters.llm_keep import MAX_FP32_SHARE

    raw = req.options.get("max_fp32_share", MAX_FP32_SHARE)
    try:
        share = float(raw)
    except (TypeError, ValueError):
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ExportError(f"onnx: option max_fp32_share must be a number from 0 to 1 (the most of the weights that "
                          f"may keep fp32 activations), got {raw!r}")
    return share


@LLM_EXPORTERS.register("onnx")
def export_onnx(req: LLMExportRequest) -> LLMExportResult:
    if req.recipe not in RECIPES:
        raise UnsupportedRecipeError(f"onnx has no LLM recipe '{req.recipe}' (it offers: {', '.join(RECIPES)})")
    max_share = _max_share(req)
    version = builder_version()
    spec = RECIPES[req.recipe]
    kv_type = KV_CACHE_DTYPES[req.kv_cache]  # one that onnx reads: plan() refused the others before the model loaded
    if req.kv_cache == "int8":
        with req.stage(Stage.CALIBRATE):
            scales = kv_channel_scales(req.model, req.calibration)
            (req.workdir / KV_SCALES).write_text(json.dumps({"scales": scales}), encoding="utf-8")
    log_path = req.workdir / f"onnx-builder-{req.recipe}.log"
    with open(log_path, "w", encoding="utf-8") as logf, req.stage(Stage.LOWER):  # the model builder, in one process
        proc = subprocess.run(_builder_command(req, spec), stdout=logf, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0 or not (req.out / GENAI_CONFIG).is_file():
        raise ExportError(f"onnxruntime-genai {version} model builder refused: "
                          f"{_last_error_line(log_path.read_text(encoding='utf-8', errors='replace'))}")
    cfg_path = req.out / GENAI_CONFIG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # the runtime sizes its shared KV buffer by search.max_length: that is the static cache
    cfg["search"]["max_length"] = req.max_context
    cfg["model"]["context_length"] = min(int(cfg["model"].get("context_length", req.max_context)), req.max_context)
    # the builder shares the buffer for a quantized cache on CUDA only; onnxruntime's CPU GroupQueryAttention reads
    # and writes the int8 cache in place as well (the same tokens and top-1 with or without: a test checks), and the
    # shared buffer is what makes the cache static
    cfg["search"]["past_present_share_buffer"] = True
    cfg_path.write_text(json.dumps(cfg, indent=4), encoding="utf-8")
    logits = last_position_logits(req.out / cfg["model"]["decoder"]["filename"])
    runtime = {"kind": "onnxruntime-genai", "entry": GENAI_CONFIG, "execution_provider": "cpu",
               "max_context": req.max_context, "kv_cache_dtype": req.kv_cache, "logits": logits,
               "kv_cache": f"shared buffer of search.max_length tokens ({req.kv_cache})"}
    affine = _quantize(req, spec, cfg["model"]["decoder"]["filename"], runtime, max_share) if spec.affine_bits else None
    files = sorted(p.relative_to(req.out) for p in req.out.rglob("*") if p.is_file())
    bits = spec.affine_bits or {"fp32": 32, "int8": 8, "int4": 4}[spec.precision]
    kept = affine["fp32_activations"]["matmuls"] if affine else []
    how_kept = f"accuracy_level {FP32_ACTIVATIONS}" if bits == 4 else "plain fp32 MatMul, fp32 weights"
    quant = {"scheme": spec.how, "builder_precision": spec.precision, "weights_bits": bits,
             "block_size": (req.group_size if bits == 4 else 32) if bits < 32 else None,
             "accuracy_level": spec.accuracy_level,
             "activations": ("int8 dynamic" + (f", fp32 on {len(kept)} matmuls ({how_kept})" if kept else ""))
             if spec.accuracy_level == 4 and bits < 32 else "fp32",
             "embeddings": "fp32",
             "kv_cache": {"dtype": req.kv_cache, "how": kv_type.how}
             | ({"calibration_tokens": sum(len(s) for s in req.calibration)} if kv_type.calibrated else {})}
    if affine is not None:
        quant["affine_pass"] = affine
        if affine.get("tied_embedding_quantized"):
            quant["embeddings"] = "the LM head's quantized blocks (tied)"
    warnings: list[str] = []
    search = affine["fp32_activations"] if affine else {}
    if search.get("met") is False:
        warnings.append(f"greedy search: within its budget ({search['budget']['max_share']:.1%} of the weights) no "
                        f"kept set reproduces every prompt that fp32 activations do ({search['target']}); kept the "
                        f"{len(kept)} matmuls that reproduce the most")
    return LLMExportResult(
        files=files,
        runtime=runtime,
        quantization=quant, kv_cache_bytes_per_token=kv_cache_bytes_per_token(req.model.config,
                                                                           kv_type.bytes_per_element),
        tool={"onnxruntime-genai model builder": version}, warnings=warnings)
