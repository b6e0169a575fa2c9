"""``edgeship.export`` for decoder LLMs: a causal LM (HF dir, GGUF, + LoRA adapter) to a checked bundle.

Per (format, recipe): stage a directory, call the format's exporter through ``LLM_EXPORTERS``, checksum every file,
and measure fidelity through the *device* runtime (``open_llm``) against PyTorch fp32. A format whose tool refuses
is recorded (which tool, why) and the others continue; a format whose module is not in this build is reported as
such. Nothing here knows a format by name.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgeship.bundle import BundleWriter, check_output_dir
from edgeship.errors import (
    CalibrationError,
    ConfigError,
    EdgeshipError,
    ExportError,
    FidelityError,
    UnknownKeyError,
)
from edgeship.exporters.base import Stage, StageClock
from edgeship.exporters.llm_base import (
    KV_CACHE_DTYPES,
    LLM_EXPORTER_MODULES,
    LLM_EXPORTERS,
    LLMExportRequest,
    LLMExportResult,
    kv_cache_bytes_per_token,
)
from edgeship.llm_fidelity import (
    MIN_TEXT_TOKENS,
    LLMReference,
    measure,
    measure_as_on_device,
    save_reference,
    torch_reference,
)
from edgeship.llm_models import LoadedLLM, load_llm
from edgeship.manifest import ArtifactRecord, LLMFidelity, Manifest, checksum_tree, tree_digest
from edgeship.pipeline import ExportResult
from edgeship.targets import TargetProfile, get_profile
from edgeship.vocab import LLM_RECIPES

TASK = "text-generation"
DEFAULT_RECIPES = ("int8-dynamic", "int4-weight")
GREEDY_NEW_TOKENS = 24
CALIBRATION_TOKENS = 1024
#: bytes per weight the recipe's quantized matmuls keep, counting one fp32 scale per block (for the estimate made
#: before export; the recorded prediction uses the real artifact size)
_BYTES_PER_WEIGHT = {"fp32": lambda g: 4.0, "int8-dynamic": lambda g: 1.0 + 4.0 / 32, "int4-weight": lambda g: 0.5 + 4.0 / g}

Log = Callable[[str], None]


def _data_lines(name: str) -> list[str]:
    text = resources.files("edgeship").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [t.strip() for t in text.splitlines() if t.strip()]


def plan(target: TargetProfile, formats: Sequence[str] | None, recipes: Sequence[str] | None,
         kv_cache: str = "fp32") -> list[tuple[str, str]]:
    problems = [str(UnknownKeyError("LLM format", f, LLM_EXPORTER_MODULES)) for f in formats or ()
                if f not in LLM_EXPORTER_MODULES]
    problems += [str(UnknownKeyError("LLM recipe", r, LLM_RECIPES)) for r in recipes or () if r not in LLM_RECIPES]
    if kv_cache not in KV_CACHE_DTYPES:
        problems.append(str(UnknownKeyError("KV-cache type", kv_cache, KV_CACHE_DTYPES)))
    if problems:
        raise ConfigError("; ".join(problems))
    fmts = list(formats) if formats else [f for f in target.formats if f in LLM_EXPORTER_MODULES]
    can = KV_CACHE_DTYPES[kv_cache].formats
    if can is not None and (cannot := [f for f in fmts if f not in can]):
        raise ConfigError(f"--kv-cache {kv_cache}: the {', '.join(cannot)} runtime keeps no {kv_cache} KV cache (only "
                          f"{', '.join(can)} does); export those formats in a separate call without --kv-cache, or "
                          f"pick --format {' --format '.join(can)}")
    return [(f, r) for f in fmts for r in (recipes or DEFAULT_RECIPES)]


def predicted_peak_bytes(weights_bytes: int, kv_per_token: int, max_context: int, vocab: int, overhead_mb: float,
                         logit_positions: int = 1) -> int:
    """Weights + full KV cache + the fp32 logits a prefill returns + the runtime's own overhead. Every format's
    prefill returns the last position's logits (``logit_positions`` 1); a graph that returns every position's
    holds a prompt filling the context's at once (201 MB for SmolLM2 at 1024 tokens)."""
    return int(weights_bytes + kv_per_token * max_context + 4 * vocab * logit_positions + overhead_mb * 2**20)


def estimated_weight_bytes(llm: LoadedLLM, recipe: str, group: int) -> int:
    """Before export: fp32 embeddings (no builder quantizes the gather) + quantized matmuls (+ a tied lm_head copy)."""
    cfg = llm.config
    embed = int(cfg.vocab_size) * int(cfg.hidden_size)
    per_weight = _BYTES_PER_WEIGHT[recipe](group)
    matmuls = llm.parameters - embed + (embed if getattr(cfg, "tie_word_embeddings", False) else 0)
    return int(embed * 4 + matmuls * per_weight)


def check_memory(llm: LoadedLLM, todo: Sequence[tuple[str, str]], prof: TargetProfile, max_context: int,
                 kv_cache: str = "fp32") -> None:
    """Refuse before any export when the predicted peak at max context exceeds the target's RAM."""
    kv = kv_cache_bytes_per_token(llm.config, KV_CACHE_DTYPES[kv_cache].bytes_per_element)
    ram = int(prof.ram_gb * 2**30)
    for recipe in dict.fromkeys(r for _, r in todo):
        w = estimated_weight_bytes(llm, recipe, prof.llm.int4_group_size)
        vocab = int(llm.config.vocab_size)
        peak = predicted_peak_bytes(w, kv, max_context, vocab, prof.llm.runtime_overhead_mb)
        if peak > ram:
            raise ExportError(
                f"{recipe}: predicted peak memory {peak / 2**20:.0f} MB (weights {w / 2**20:.0f} MB + KV cache "
                f"{kv} B/token x {max_context} tokens = {kv * max_context / 2**20:.0f} MB + prefill logits "
                f"{4 * vocab / 2**20:.0f} MB + runtime {prof.llm.runtime_overhead_mb:.0f} MB) exceeds {prof.name}'s {prof.ram_gb:g} GB RAM; lower "
                "--max-context or use a smaller recipe" + (" or --kv-cache int8 (ONNX)" if kv_cache == "fp32" else ""))


def calibration_sequences(llm: LoadedLLM, max_context: int, texts: Sequence[str] | None = None
                          ) -> tuple[tuple[int, ...], ...]:
    """Token sequences for an exporter that calibrates scales (the int8 KV cache): the user's texts, else the first
    half of the built-in corpus (the held-out check reads the other half), in the two shapes the runtime sees: plain
    text, and a chat-templated conversation (its special tokens and the template's system prompt carry K/V up to
    2.7x larger than plain text does in SmolLM2: a cache calibrated on plain text alone clips them)."""
    if not texts:
        corpus = _data_lines("corpus.txt")
        texts = corpus[: len(corpus) // 2]
    plain = llm.tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    if len(turns) == 1:  # one text: the user's turn and a short reply
        turns.append({"role": "assistant", "content": "OK."})
    turns = turns[: len(turns) // 2 * 2]  # a conversation ends with the assistant's turn
    chat = llm.tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
    n = min(max_context, CALIBRATION_TOKENS)
    return tuple(tuple(int(i) for i in ids[:n]) for ids in (plain, chat))


def build_reference(llm: LoadedLLM, max_context: int, say: Log) -> tuple[LLMReference, dict[str, Any]]:
    """Held-out text (the second half of the built-in corpus) and chat-templated prompts, with PyTorch's answers."""
    corpus = _data_lines("corpus.txt")
    text = " ".join(corpus[len(corpus) // 2:])
    ids = list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    n = min(MIN_TEXT_TOKENS, max_context - 1)
    if len(ids) < n + 1:
        raise ConfigError(f"the held-out text is only {len(ids)} tokens for this tokenizer; need {n + 1}")
    ids = ids[: n + 1]
    prompts = _data_lines("llm_prompts.txt")
    prompt_ids = [list(llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                          tokenize=True, return_dict=True)["input_ids"]) for p in prompts]
    new_tokens = max(1, min(GREEDY_NEW_TOKENS, max_context - max(len(p) for p in prompt_ids)))
    say(f"PyTorch fp32 reference: {n} teacher-forced tokens, {len(prompts)} prompts x {new_tokens} greedy tokens")
    ref = torch_reference(llm.model, ids, prompt_ids, new_tokens)
    kept = {"text": text, "text_ids": ids, "prompts": prompts, "prompt_ids": prompt_ids,
            "reference_continuations": [list(c) for c in ref.continuations], "new_tokens": new_tokens,
            "note": "held-out text and chat-templated prompts; PyTorch fp32 greedy continuations (EOS ignored)"}
    return ref, kept


def _exporter(fmt: str) -> tuple[Any, str | None]:
    """The format's exporter, or why this build has none."""
    mod = LLM_EXPORTER_MODULES[fmt]
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:
            return None, f"not available in this build (no module {mod})"
        return None, f"{mod} needs {e.name}, which is not installed: pip install 'edgeship[export,llm]'"
    except EdgeshipError as e:
        return None, str(e)
    if fmt not in LLM_EXPORTERS:
        return None, f"{mod} registered no LLM exporter for '{fmt}'"
    return LLM_EXPORTERS.get(fmt), None


def _export_one(fn: Any, req: LLMExportRequest, dest: Path) -> LLMExportResult:
    res: LLMExportResult = fn(req)
    if not req.out.is_dir() or not any(req.out.iterdir()):
        raise ExportError(f"the exporter wrote nothing into {req.out.name}")
    os.replace(req.out, dest)  # staged: a failed export never leaves a half-written artifact in the bundle
    return res


def _tool_name(fmt: str, err: BaseException) -> str:
    return f"{LLM_EXPORTER_MODULES[fmt]} ({type(err).__name__})"


@dataclass(frozen=True)
class _Ctx:
    llm: LoadedLLM
    prof: TargetProfile
    max_context: int
    ref: LLMReference
    threads: int
    allow_degraded: bool
    workdir: Path
    say: Log
    greedy_search: bool = True  # hand the exporters the scorer their keep-in-higher-precision search needs
    kv_cache: str = "fp32"
    options: Mapping[str, Any] = field(default_factory=dict)  # the caller's exporter options
    calibration: tuple[tuple[int, ...], ...] = ()  # for the exporters that calibrate (the int8 KV cache)


def _score(ctx: _Ctx, fmt: str, path: Path, runtime: dict[str, Any], floor: float
           ) -> tuple[LLMFidelity, dict[str, Any]]:
    """The fidelity of one candidate, through the device runtime; and what ran it. A runtime whose kernels depend
    on the process is measured in a fresh process that runs like a device's (torch blocked), not in this one."""
    from edgeship.profiling.llm.runtime import get_llm_runtime, open_llm
    from edgeship.profiling.worker import torch_blocked

    cls = get_llm_runtime(fmt)
    if cls.kernels_follow_process and cls.runs_torch_free():
        ref = ctx.workdir / "reference.npz"
        if not ref.is_file():
            save_reference(ctx.ref, ref)
        fid, info = measure_as_on_device(fmt, path, runtime, ref, floor, ctx.threads)
    else:
        rt = open_llm(fmt, path, runtime, threads=ctx.threads)
        try:
            fid = measure(rt, ctx.ref, floor)
            info = {**rt.info(), "torch_blocked": torch_blocked()}
        finally:
            rt.close()
    return fid, {k: info[k] for k in ("runtime", "runtime_path", "executes", "torch_blocked") if k in info}


def _artifact(ctx: _Ctx, fn: Any, fmt: str, recipe: str, writer: BundleWriter) -> ArtifactRecord:
    rel = f"{fmt}/{recipe}"
    dest = writer.path(rel)  # makes the parent only: the staged export is renamed onto it
    stage = writer.staging / f".stage-{fmt}-{recipe}"
    work = ctx.workdir / f"{fmt}-{recipe}"
    work.mkdir()
    floor = ctx.prof.llm.top1_floor(recipe)

    clock = StageClock(rel, ctx.say)

    def score(path: Path, runtime: dict[str, Any]) -> LLMFidelity:  # an exporter's search scoring a candidate
        with clock.stage(Stage.VALIDATE):
            return _score(ctx, fmt, path, runtime, floor)[0]

    req = LLMExportRequest(model=ctx.llm.model, hf_dir=ctx.llm.hf_dir, recipe=recipe, max_context=ctx.max_context,
                           group_size=ctx.prof.llm.int4_group_size, out=stage, workdir=work,
                           options={**ctx.options, "target": ctx.prof.name, "target_arch": ctx.prof.arch},
                           score=score if ctx.greedy_search else None, reference=ctx.ref, kv_cache=ctx.kv_cache,
                           calibration=ctx.calibration, clock=clock)
    t0 = time.perf_counter()
    res = _export_one(fn, req, dest)
    files = checksum_tree(dest)
    size = sum(int(v["size_bytes"]) for v in files.values())
    with req.stage(Stage.VALIDATE):  # the device runtime against PyTorch fp32
        fid, measured_on = _score(ctx, fmt, dest, res.runtime, floor)
    warnings = list(res.warnings)
    if not fid.passed:
        msg = (f"{rel}: teacher-forced top-1 agreement {fid.top1_agreement:.3f} with PyTorch fp32 is below the "
               f"{ctx.prof.name} floor {fid.floor_top1_agreement}; use a higher-precision recipe, or pass "
               "--allow-degraded to keep it")
        if not ctx.allow_degraded:
            raise FidelityError(msg)
        warnings.append("DEGRADED: " + msg)
    vocab = int(ctx.llm.config.vocab_size)
    logit_positions = ctx.max_context if res.runtime.get("logits") == "every position" else 1
    peak = predicted_peak_bytes(size, res.kv_cache_bytes_per_token, ctx.max_context, vocab,
                                ctx.prof.llm.runtime_overhead_mb, logit_positions)
    ctx.say(f"  {rel}: {size / 2**20:.1f} MB, top-1 {fid.top1_agreement:.3f}, KL {fid.mean_kl:.4f}, greedy identical "
            f"{fid.greedy_identical}/{fid.n_prompts}, {time.perf_counter() - t0:.1f} s")
    return ArtifactRecord(
        path=rel, format=fmt, recipe=recipe, sha256=tree_digest(files), size_bytes=size,
        export_seconds=round(time.perf_counter() - t0, 3), fidelity=None, runtime=res.runtime,
        stages={str(k): round(v, 3) for k, v in req.clock.stages.items()},
        quantization=res.quantization,
        details={"kv_cache_bytes_per_token": res.kv_cache_bytes_per_token, "max_context": ctx.max_context,
                 "predicted_peak_memory_bytes": peak,
                 "predicted_peak_memory": {"weights_bytes": size,
                                           "kv_cache_bytes": res.kv_cache_bytes_per_token * ctx.max_context,
                                           "prefill_logits_bytes": 4 * vocab * logit_positions,
                                           "runtime_overhead_bytes": int(ctx.prof.llm.runtime_overhead_mb * 2**20)},
                 "tool": res.tool, "fidelity_measured_on": measured_on},
        warnings=tuple(warnings), files=files, llm_fidelity=fid)


def _bundle_llm_files(llm: LoadedLLM, writer: BundleWriter, kept: dict[str, Any]) -> tuple[dict[str, str], str]:
    """Tokenizer, chat template, generation config and the held-out data; returns (samples, chat template path)."""
    tok_dir = writer.path("tokenizer/x").parent
    llm.tokenizer.save_pretrained(tok_dir)
    if getattr(llm.model, "generation_config", None) is not None:
        llm.model.generation_config.save_pretrained(tok_dir)
    template = tok_dir / "chat_template.jinja"
    if not template.is_file():  # older transformers keep it inside tokenizer_config.json
        template.write_text(llm.tokenizer.chat_template, encoding="utf-8")
    writer.path("llm/heldout.json").write_text(json.dumps(kept), encoding="utf-8")
    return {"heldout": "llm/heldout.json"}, "tokenizer/chat_template.jinja"


def _calibration_texts(path: str | Path | None, kv_cache: str) -> list[str] | None:
    """The user's calibration texts, read before the model loads; refused when nothing would use them."""
    if path is None:
        return None
    if not KV_CACHE_DTYPES[kv_cache].calibrated:
        raise ConfigError(f"--calibration {path}: an LLM export calibrates only the int8 KV cache (--kv-cache int8); "
                          "its weights are quantized without data. Drop --calibration or add --kv-cache int8")
    from edgeship.models import read_texts

    p = Path(path)
    if p.suffix not in (".txt", ".jsonl") or not p.is_file():
        raise CalibrationError(f"--calibration {p}: give an existing .txt (one text per line) or .jsonl (a 'text' "
                               "field per line) file of texts like the ones the model will read")
    return read_texts(p)


def export_llm(source: str | Path, *, target: str | TargetProfile = "raspberry-pi-5", out: str | Path,
               formats: Sequence[str] | None = None, recipes: Sequence[str] | None = None,
               max_context: int | None = None, adapter: str | Path | None = None, overwrite: bool = False,
               allow_degraded: bool = False, greedy_search: bool = True, kv_cache: str = "fp32",
               calibration: str | Path | None = None, options: Mapping[str, Any] | None = None,
               log: Log | None = None) -> ExportResult:
    """Export a causal LM for ``target`` in every (format, recipe); see the module docstring.

    ``greedy_search``: a format that can keep some matmuls at higher precision (ONNX int4: fp32 activations) does
    so for the fewest that keep the greedy answers int8 activations change; False keeps the fastest kernels.
    ``kv_cache``: the static cache's element type (:data:`KV_CACHE_DTYPES`): ``int8`` holds a quarter of fp32's
    bytes, for the formats whose runtime reads it; its scales are calibrated on ``calibration`` (texts: .txt one
    per line, .jsonl a "text" field), else on built-in text. ``options``: exporter options (ONNX:
    ``max_fp32_share``)."""
    from edgeship import __version__

    t_start = time.perf_counter()
    say = log or (lambda m: print(m, file=sys.stderr))
    prof = target if isinstance(target, TargetProfile) else get_profile(target)
    out_dir = Path(out)
    check_output_dir(out_dir.resolve(), overwrite)
    todo = plan(prof, formats, recipes, kv_cache)
    texts = _calibration_texts(calibration, kv_cache)
    ctx_len = max_context or prof.llm.max_context
    if ctx_len < 64:
        raise ConfigError(f"--max-context must be >= 64, got {ctx_len}")
    with tempfile.TemporaryDirectory(prefix="edgeship-llm-") as tmp:
        say(f"loading {source}...")
        llm = load_llm(source, workdir=Path(tmp), adapter=adapter, log=say)
        limit = int(getattr(llm.config, "max_position_embeddings", ctx_len) or ctx_len)
        if ctx_len > limit:
            raise ConfigError(f"--max-context {ctx_len} exceeds the model's max_position_embeddings {limit}")
        check_memory(llm, todo, prof, ctx_len, kv_cache)
        ref, kept = build_reference(llm, ctx_len, say)
        calib = calibration_sequences(llm, ctx_len, texts) if KV_CACHE_DTYPES[kv_cache].calibrated else ()
        ctx = _Ctx(llm, prof, ctx_len, ref, min(prof.threads, os.cpu_count() or 1), allow_degraded, Path(tmp), say,
                   greedy_search, kv_cache, dict(options or {}), calib)
        records, refused = _export_all(ctx, todo, out_dir, overwrite, kept, __version__)
        if records is None:
            raise ExportError("no artifact was written: " + "; ".join(
                f"{r['format']}/{r['recipe']}: {r['reason']}" for r in refused))
    bundle, manifest = records
    return ExportResult(bundle, manifest, time.perf_counter() - t_start)


def _export_all(ctx: _Ctx, todo: Sequence[tuple[str, str]], out_dir: Path, overwrite: bool, kept: dict[str, Any],
                version: str) -> tuple[tuple[Path, Manifest] | None, list[dict[str, str]]]:
    records: list[ArtifactRecord] = []
    refused: list[dict[str, str]] = []
    with BundleWriter(out_dir, overwrite=overwrite) as writer:
        for i, (fmt, recipe) in enumerate(todo, 1):
            ctx.say(f"[{i}/{len(todo)}] {fmt}/{recipe}")
            fn, why = _exporter(fmt)
            if fn is None:
                refused.append({"format": fmt, "recipe": recipe, "tool": LLM_EXPORTER_MODULES[fmt], "reason": str(why)})
                ctx.say(f"  {fmt}/{recipe}: {why}")
                continue
            try:
                records.append(_artifact(ctx, fn, fmt, recipe, writer))
            except FidelityError:
                raise
            except Exception as e:  # a converter refusing one artifact must not lose the others
                reason = str(e).splitlines()[0][:400] if str(e) else type(e).__name__
                refused.append({"format": fmt, "recipe": recipe, "tool": _tool_name(fmt, e), "reason": reason})
                ctx.say(f"  {fmt}/{recipe}: REFUSED by {_tool_name(fmt, e)}: {reason}")
                shutil.rmtree(writer.staging / f".stage-{fmt}-{recipe}", ignore_errors=True)
                shutil.rmtree(writer.staging / fmt / recipe, ignore_errors=True)
        if not records:
            return None, refused
        samples, template = _bundle_llm_files(ctx.llm, writer, kept)
        manifest = _manifest(ctx, records, refused, samples, template, version)
        return (writer.commit(manifest), manifest), refused


def _manifest(ctx: _Ctx, records: list[ArtifactRecord], refused: list[dict[str, str]], samples: dict[str, str],
              template: str, version: str) -> Manifest:
    llm = ctx.llm
    return Manifest(
        model={"name": llm.name, "task": TASK, "source": llm.source, "source_sha256": llm.source_sha256,
               "parameters": llm.parameters, "architecture": llm.architecture, "adapter": llm.adapter},
        target={"name": ctx.prof.name, "display_name": ctx.prof.display_name, "arch": ctx.prof.arch,
                "threads": ctx.prof.threads, "ram_gb": ctx.prof.ram_gb},
        inputs=(), outputs=(), dims={}, preprocessing={}, artifacts=tuple(records), samples=samples, labels=None,
        edgeship_version=version, created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        llm={"tokenizer": "tokenizer", "chat_template": template,
             "generation": {"eos_token_ids": llm.eos_token_ids, "bos_token_id": llm.bos_token_id,
                            "max_context": ctx.max_context},
             "int4_group_size": ctx.prof.llm.int4_group_size, "refused": refused,
             "fidelity_reference": "PyTorch fp32 (transformers) on the held-out text and prompts in llm/heldout.json"},
    )

