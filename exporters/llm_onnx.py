"""Decoder LLMs to an ONNX Runtime GenAI folder, with onnxruntime-genai's own model builder.

The builder re-authors the HF model as one ONNX graph with GroupQueryAttention and a KV cache that the GenAI
runtime keeps in a buffer of ``search.max_length`` tokens (``past_present_share_buffer``): we set that to the
request's max context, so the cache is static and its size known at export. Quantized recipes become
``MatMulNBits`` (block-wise weights; ``accuracy_level=4`` makes the CPU kernel quantize activations to int8 at run
time, i.e. dynamic 8-bit activations). Embedding tables stay fp32 (MatMuls only are quantized; a tied lm_head gets
its own quantized copy). The quantized recipes are not the builder's int4/int8: the builder writes fp32 and our
own pass (``onnx_affine4``) quantizes each MatMul to affine blocks with an exact per-block offset, which keeps a
4-bit source (a GGUF) on its own grid (SmolLM2 int4 top-1 agreement: builder 0.648, ours: see the README).

The builder runs in a child process: it prints a progress line per tensor and holds a second copy of the weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from edgeship.errors import ExportError, RuntimeMissingError, UnsupportedRecipeError
from edgeship.exporters.llm_base import (
    LLM_EXPORTERS,
    LLMExportRequest,
    LLMExportResult,
    kv_cache_bytes_per_token,
)

GENAI_CONFIG = "genai_config.json"
KV_BYTES_PER_ELEMENT = 4  # the CPU build keeps the KV cache in the fp32 I/O dtype


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
                                  "an exact per-block offset correction, int8 activations at run time; embeddings "
                                  "fp32", affine_bits=8),
    # accuracy_level 4 (int8 activations, as llama.cpp's Q8 activations): SmolLM2 top-1 0.965 at 1.07x llama.cpp's
    # decode speed. accuracy_level 1 (fp32 activations) reached 0.996 and answers "Paris", but onnxruntime's fp32
    # path with 4-bit zero points decoded at 8 tok/s (0.1x): measured with benchmarks/bench_llm.py, see README
    "int4-weight": BuilderRecipe("fp32", 4, "4-bit block-wise affine weights (MatMulNBits uint4 + zero point) with "
                                 "an exact per-block offset correction, 8-bit LM head, int8 activations at run time; "
                                 "the embedding reads the head's blocks", affine_bits=4),
}


def builder_version() -> str:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise RuntimeMissingError("ONNX GenAI export needs onnxruntime-genai: pip install 'edgeship[llm]' "
                                  "(no wheel for Linux aarch64 upstream)") from None
    return str(og.__version__)


def _builder_command(req: LLMExportRequest, spec: BuilderRecipe) -> list[str]:
    extra = []
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


def _affine(req: LLMExportRequest, cfg: dict[str, Any], bits: int, accuracy_level: int) -> dict[str, Any]:
    """Quantize the builder's fp32 graph in place with onnx_affine4 (same file names, so genai_config holds)."""
    from edgeship.exporters.onnx_affine4 import convert_file

    name = cfg["model"]["decoder"]["filename"]
    src, data = req.out / name, req.out / f"{name}.data"
    staged = req.workdir / "affine4"
    staged.mkdir(exist_ok=True)
    try:
        report = convert_file(src, staged / name, f"{name}.data", block=req.group_size if bits == 4 else 32,
                              accuracy_level=accuracy_level, bits=bits)
    except (ValueError, OSError) as e:
        raise ExportError(f"onnx/{req.recipe}: the 4-bit pass failed on the builder's graph: {e}") from None
    data.unlink(missing_ok=True)
    for f in staged.iterdir():
        f.replace(req.out / f.name)
    return report.to_dict()


@LLM_EXPORTERS.register("onnx")
def export_onnx(req: LLMExportRequest) -> LLMExportResult:
    if req.recipe not in RECIPES:
        raise UnsupportedRecipeError(f"onnx has no LLM recipe '{req.recipe}' (it offers: {', '.join(RECIPES)})")
    version = builder_version()
    spec = RECIPES[req.recipe]
    log_path = req.workdir / f"onnx-builder-{req.recipe}.log"
    with open(log_path, "w", encoding="utf-8") as logf:
        proc = subprocess.run(_builder_command(req, spec), stdout=logf, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0 or not (req.out / GENAI_CONFIG).is_file():
        raise ExportError(f"onnxruntime-genai {version} model builder refused: "
                          f"{_last_error_line(log_path.read_text(encoding='utf-8', errors='replace'))}")
    cfg_path = req.out / GENAI_CONFIG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    affine = _affine(req, cfg, spec.affine_bits, spec.accuracy_level or 4) if spec.affine_bits else None
    # the runtime sizes its shared KV buffer by search.max_length: that is the static cache
    cfg["search"]["max_length"] = req.max_context
    cfg["model"]["context_length"] = min(int(cfg["model"].get("context_length", req.max_context)), req.max_context)
    cfg_path.write_text(json.dumps(cfg, indent=4), encoding="utf-8")
    files = sorted(p.relative_to(req.out) for p in req.out.rglob("*") if p.is_file())
    bits = spec.affine_bits or {"fp32": 32, "int8": 8, "int4": 4}[spec.precision]
    quant = {"scheme": spec.how, "builder_precision": spec.precision, "weights_bits": bits,
             "block_size": (req.group_size if bits == 4 else 32) if bits < 32 else None,
             "accuracy_level": spec.accuracy_level,
             "activations": "int8 dynamic" if spec.accuracy_level == 4 and bits < 32 else "fp32", "embeddings": "fp32"}
    if affine is not None:
        quant["affine_pass"] = affine
        if affine.get("tied_embedding_quantized"):
            quant["embeddings"] = "the LM head's quantized blocks (tied)"
    warnings: list[str] = []
    return LLMExportResult(
        files=files,
        runtime={"kind": "onnxruntime-genai", "entry": GENAI_CONFIG, "execution_provider": "cpu",
                 "max_context": req.max_context, "kv_cache": "shared buffer of search.max_length tokens (fp32)"},
        quantization=quant, kv_cache_bytes_per_token=kv_cache_bytes_per_token(req.model.config, KV_BYTES_PER_ELEMENT),
        tool={"onnxruntime-genai model builder": version}, warnings=warnings)
