"""LiteRT-LM exporter for decoder LLMs: litert-torch's stock generative signatures packed as a ``.litertlm``.

The plain ``--format tflite`` artifact (:mod:`edgeship.exporters.llm_tflite`) has edgeship's own signatures (KV
slices, last-token logits) for edgeship's decode loop on the LiteRT interpreter. LiteRT-LM's engine
(``litert-lm-api``) drives a model through its own executor instead, and expects litert-torch's *stock* signatures:

* ``prefill_<L>``: ``tokens`` int32 [1, L], ``input_pos`` int32 [L] and the KV cache -> the updated KV cache;
* ``decode``: ``tokens`` [1, 1], ``input_pos`` [1] and the KV cache -> ``logits`` [1, 1, vocab] and the cache;
* the cache as ``kv_cache_k_<i>`` [1, kv_heads, max_context, head_dim] and ``kv_cache_v_<i>``
  [1, kv_heads, head_dim, max_context] (litert-torch's *transposed* layout: LiteRT-LM 0.18.1 reads the context
  length from dimension 2 of the K cache, and with the default [1, T, heads, dim] layout it took the number of KV
  heads for the context: "Input token ids are too long ... 13 >= 2");
* the causal mask built inside the graph from ``input_pos``.

So this format converts the same re-authored decoder (:func:`edgeship.exporters.llm_tflite.model_config`, same
weights mapping) through litert-torch's own ``converter.convert_to_tflite``, quantizes it with the *same*
ai-edge-quantizer recipes as ``--format tflite`` (:data:`edgeship.exporters.llm_tflite.RECIPES`), and packs it with
``litert-lm-builder`` together with the Hugging Face ``tokenizer.json``, an ``LlmMetadata`` proto (start token when
the tokenizer adds one, the generation config's stop tokens, max_num_tokens = max context) and the chat template
(jinja). The device runtime is :mod:`edgeship.profiling.llm.litertlm`.
"""

from __future__ import annotations

import contextlib
import functools
import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeship.errors import ExportError, UnsupportedRecipeError
from edgeship.exporters import llm_tflite as lt
from edgeship.exporters.base import Stage
from edgeship.exporters.llm_base import (
    LLM_EXPORTERS,
    LLMExportRequest,
    LLMExportResult,
    kv_cache_bytes_per_token,
)

if TYPE_CHECKING:
    from torch import nn

FILE = "model.litertlm"


@LLM_EXPORTERS.register("litertlm")
def export_litertlm(req: LLMExportRequest) -> LLMExportResult:
    recipe = lt.RECIPES.get(req.recipe)
    if recipe is None:
        raise UnsupportedRecipeError(f"litertlm: no LLM recipe '{req.recipe}' (it offers: {', '.join(lt.RECIPES)})")
    if recipe.blockwise and req.group_size not in lt.BLOCKS:
        raise UnsupportedRecipeError(f"litertlm/{req.recipe}: group size {req.group_size} is not a block size "
                                     f"ai-edge-quantizer offers ({', '.join(map(str, lt.BLOCKS))})")
    tokenizer_json = req.hf_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ExportError(f"litertlm: {req.hf_dir} has no tokenizer.json (LiteRT-LM packs a Hugging Face fast "
                          "tokenizer or a SentencePiece model); save the tokenizer with a fast tokenizer")
    hf = req.model.config
    warnings: list[str] = []
    mcfg = lt.model_config(hf, req.max_context, warnings)
    lengths = lt.prefill_lengths(req.max_context)
    quant: dict[str, Any] = {"recipe": req.recipe}
    with req.stage(Stage.LOWER):
        float_path = lt.float_graph(req, mcfg, lengths, recipe, quant, "litertlm", functools.partial(
            _convert_stock, max_context=req.max_context, lengths=lengths))
    configure = recipe.configure
    model_path = float_path
    if configure is not None:
        with req.stage(Stage.QUANTIZE):
            data = lt.quantize_recipe(float_path.read_bytes(), configure, req.group_size, quant, "litertlm")
            model_path = req.workdir / "quantized.tflite"
            model_path.write_bytes(data)
    else:
        quant.update(weights="float32", activations="float32", embeddings="float32")
    meta = llm_metadata(req)
    req.out.mkdir(parents=True, exist_ok=True)
    with req.stage(Stage.SERIALIZE):  # LiteRT-LM's packer: the model, the tokenizer and the metadata in one file
        _pack(model_path, tokenizer_json, meta, req.workdir, req.out / FILE)
    kv = mcfg.block_config(0).attn_config
    runtime = {
        "kind": "litertlm", "file": FILE, "max_context": req.max_context, "vocab_size": int(hf.vocab_size),
        "runs_on": "litert-lm-api (LiteRT-LM engine, CPU backend)",
        "io": "text in, text out: the engine tokenizes with the packed tokenizer.json and exposes no logits; "
              "edgeship's teacher-forced fidelity runs the packed .tflite section on the LiteRT interpreter",
        "prefill_signatures": {str(n): f"prefill_{n}" for n in lengths}, "decode_signature": "decode",
        "kv_cache": {"layout": "K [1, kv_heads, max_context, head_dim], V [1, kv_heads, head_dim, max_context]",
                     "num_layers": int(hf.num_hidden_layers), "kv_heads": int(kv.num_query_groups),
                     "head_dim": int(kv.head_dim), "dtype": "float32"},
        "tokenizer": "hf tokenizer.json (packed)", "start_token_id": meta["start_token_id"],
        "stop_token_ids": meta["stop_token_ids"], "chat_template": meta["chat_template"] is not None,
        "runtimes": ["litert-lm-api"],
    }
    return LLMExportResult(files=[Path(FILE)], runtime=runtime, quantization=quant,
                           kv_cache_bytes_per_token=kv_cache_bytes_per_token(hf), tool=_tools(), warnings=warnings)


def llm_metadata(req: LLMExportRequest) -> dict[str, Any]:
    """Start/stop tokens and chat template from the HF directory, as LiteRT-LM's LlmMetadata wants them."""
    cfg = req.model.config
    gen: dict[str, Any] = {}
    gen_file = req.hf_dir / "generation_config.json"
    if gen_file.is_file():
        gen = json.loads(gen_file.read_text(encoding="utf-8"))
    tok_cfg: dict[str, Any] = {}
    tc_file = req.hf_dir / "tokenizer_config.json"
    if tc_file.is_file():
        tok_cfg = json.loads(tc_file.read_text(encoding="utf-8"))
    eos = gen.get("eos_token_id", getattr(cfg, "eos_token_id", None))
    stops = sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None})
    if not stops:
        raise ExportError("litertlm: the model declares no eos_token_id (config.json or generation_config.json); "
                          "LiteRT-LM needs stop tokens to end a reply")
    bos = gen.get("bos_token_id", getattr(cfg, "bos_token_id", None))
    # the engine prepends the start token to every prefill: only when the HF tokenizer itself adds one
    adds_bos = bool(tok_cfg.get("add_bos_token", False)) or _post_processor_adds(req.hf_dir, bos)
    template_file = req.hf_dir / "chat_template.jinja"
    template = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                else tok_cfg.get("chat_template") if isinstance(tok_cfg.get("chat_template"), str) else None)
    return {"start_token_id": int(bos) if adds_bos and bos is not None else None, "stop_token_ids": stops,
            "chat_template": template, "max_num_tokens": req.max_context}


def _post_processor_adds(hf_dir: Path, bos: Any) -> bool:
    """Whether tokenizer.json's post-processor inserts the BOS id (Llama 3 style TemplateProcessing)."""
    if bos is None:
        return False
    try:
        post = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")).get("post_processor") or {}
    except (OSError, ValueError):
        return False
    single = post.get("single") or []
    specials = post.get("special_tokens") or {}
    names = [s["SpecialToken"]["id"] for s in single if isinstance(s, dict) and "SpecialToken" in s]
    return any(int(bos) in (specials.get(n, {}).get("ids") or []) for n in names)


def _convert_stock(decoder: nn.Module, mcfg: Any, workdir: Path, max_context: int, lengths: list[int]) -> Path:
    import torch
    from litert_torch.generative.layers import kv_cache as kv_utils
    from litert_torch.generative.utilities import converter, export_config

    torch._dynamo.config.cache_size_limit = 64
    cfg = export_config.ExportConfig(kvcache_layout=kv_utils.KV_LAYOUT_TRANSPOSED)
    out = workdir / "stock-float"
    out.mkdir(exist_ok=True)
    try:
        path = converter.convert_to_tflite(decoder, output_path=str(out), output_name_prefix="model",
                                           prefill_seq_len=list(lengths), kv_cache_max_len=max_context,
                                           quantize="none", config=mcfg, export_config=cfg)
    except Exception as e:  # litert-torch raises plain exceptions from deep inside lowering
        raise ExportError(f"litertlm: litert-torch could not convert the decoder ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''})") from e
    return Path(path)


def _pack(model: Path, tokenizer_json: Path, meta: dict[str, Any], workdir: Path, dest: Path) -> None:
    """Write the .litertlm through litert-lm-builder; atomically (a .part renamed on success)."""
    import litert_lm_builder as lb
    from litert_lm_builder.runtime.proto import llm_metadata_pb2, llm_model_type_pb2

    proto = llm_metadata_pb2.LlmMetadata()
    if meta["start_token_id"] is not None:
        proto.start_token.token_ids.ids.append(int(meta["start_token_id"]))
    for sid in meta["stop_token_ids"]:
        proto.stop_tokens.add().token_ids.ids.append(int(sid))
    proto.max_num_tokens = int(meta["max_num_tokens"])
    proto.llm_model_type.CopyFrom(llm_model_type_pb2.LlmModelType(generic_model=llm_model_type_pb2.GenericModel()))
    if meta["chat_template"] is not None:
        proto.jinja_prompt_template = str(meta["chat_template"])
    proto_path = workdir / "llm_metadata.pb"
    proto_path.write_bytes(proto.SerializeToString())
    builder = lb.LitertLmFileBuilder()
    builder.add_system_metadata(lb.Metadata(key="Authors", value="edgeship", dtype=lb.DType.STRING))
    builder.add_llm_metadata(str(proto_path))
    builder.add_hf_tokenizer(str(tokenizer_json))
    builder.add_tflite_model(str(model), lb.TfLiteModelType.PREFILL_DECODE)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with tmp.open("wb") as f:
            builder.build(f)
        tmp.replace(dest)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"litertlm: litert-lm-builder could not pack the model ({type(e).__name__}: "
                          f"{str(e).strip()[:300]})") from e


def _tools() -> dict[str, str]:
    out = {}
    for dist in ("litert-torch", "ai-edge-quantizer", "litert-lm-builder", "litert-lm-api", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


__all__ = ["export_litertlm", "llm_metadata"]
