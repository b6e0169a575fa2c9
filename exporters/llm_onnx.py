"""Decoder LLMs to an ONNX Runtime GenAI folder, with onnxruntime-genai's own model builder.

The builder re-authors the HF model as one ONNX graph with GroupQueryAttention and a KV cache that the GenAI
runtime keeps in a buffer of ``search.max_length`` tokens (``past_present_share_buffer``): we set that to the
request's max context, so the cache is static and its size known at export. Quantized recipes become
``MatMulNBits`` (block-wise weights; ``accuracy_level=4`` makes the CPU kernel quantize activations to int8 at run
time, i.e. dynamic 8-bit activations). Embedding tables stay fp32 (the builder quantizes MatMuls only; a tied
lm_head gets its own quantized copy).

The builder runs in a child process: it prints a progress line per tensor and holds a second copy of the weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

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


#: our recipe -> builder settings. The one table: export, the manifest's quantization entry and the docs read it.
RECIPES: dict[str, BuilderRecipe] = {
    "fp32": BuilderRecipe("fp32", None, "fp32 weights and activations"),
    "int8-dynamic": BuilderRecipe("int8", 4, "8-bit block-wise weights (MatMulNBits), int8 activations at run time"),
    "int4-weight": BuilderRecipe("int4", 4, "4-bit block-wise weights (MatMulNBits, symmetric), int8 activations "
                                 "at run time; embeddings fp32"),
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
    # the runtime sizes its shared KV buffer by search.max_length: that is the static cache
    cfg["search"]["max_length"] = req.max_context
    cfg["model"]["context_length"] = min(int(cfg["model"].get("context_length", req.max_context)), req.max_context)
    cfg_path.write_text(json.dumps(cfg, indent=4), encoding="utf-8")
    files = sorted(p.relative_to(req.out) for p in req.out.rglob("*") if p.is_file())
    quant = {"scheme": spec.how, "builder_precision": spec.precision, "weights_bits": {"fp32": 32, "int8": 8,
             "int4": 4}[spec.precision], "block_size": (req.group_size if spec.precision == "int4" else 32)
             if spec.precision != "fp32" else None, "accuracy_level": spec.accuracy_level,
             "activations": "int8 dynamic" if spec.accuracy_level == 4 else "fp32", "embeddings": "fp32"}
    warnings = []
    if req.options.get("target_arch") == "aarch64":
        warnings.append("onnxruntime-genai publishes no Linux aarch64 wheel: on a Raspberry Pi / Jetson build it from "
                        "source (Android uses its AAR); the .pte or .tflite artifact runs there without that")
    return LLMExportResult(
        files=files,
        runtime={"kind": "onnxruntime-genai", "entry": GENAI_CONFIG, "execution_provider": "cpu",
                 "max_context": req.max_context, "kv_cache": "shared buffer of search.max_length tokens (fp32)"},
        quantization=quant, kv_cache_bytes_per_token=kv_cache_bytes_per_token(req.model.config, KV_BYTES_PER_ELEMENT),
        tool={"onnxruntime-genai model builder": version}, warnings=warnings)
