"""Profile the artifacts of an LLM bundle, each in a fresh process (``python -m edgeship.profiling.llm.bench``).

Per artifact: load time; TTFT and prefill tok/s at each prompt length (from an empty cache); greedy decode of
``new_tokens`` tokens after the longest prompt, timed per token (steady state: the first token came from prefill);
peak RSS of the process (weights + KV cache at the longest context reached); energy per generated token over the
decode window (an estimate is labelled so); decode throughput retained (last 10% of tokens vs first 10%: thermal
throttling shows here on real devices). Prompts are the bundle's held-out text ids, so no tokenizer is needed.

Torch-free formats run with torch made unimportable (as the encoder worker does). Device side: no torch here.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import EdgeshipError, InputError
from edgeship.manifest import Bundle, load_bundle
from edgeship.profiling import energy, resident, sysinfo
from edgeship.profiling.child import run_module
from edgeship.profiling.llm.results import LLMArtifactResult, LLMProfileResult, LLMRunConfig, PromptTiming
from edgeship.profiling.llm.runtime import get_llm_runtime
from edgeship.profiling.stats import LatencyStats
from edgeship.profiling.worker import _peak_rss_mb, _rss_mb, block_torch, torch_blocked

ARTIFACT_TIMEOUT_S = 1800  # one artifact's fresh process, load to last token


@dataclass(frozen=True)
class LLMArtifactJob:
    """One artifact to measure in a fresh process: what crosses to ``python -m edgeship.profiling.llm.bench``."""

    bundle: str
    artifact: str
    format: str
    recipe: str
    config: LLMRunConfig

    def to_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "artifact": self.artifact, "format": self.format, "recipe": self.recipe,
                "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LLMArtifactJob:
        return cls(str(d["bundle"]), str(d["artifact"]), str(d["format"]), str(d["recipe"]),
                   LLMRunConfig.from_dict(d["config"]))

    def failed(self, error: str, warnings: tuple[str, ...] = ()) -> LLMArtifactResult:
        return LLMArtifactResult(artifact=self.artifact, format=self.format, recipe=self.recipe, status="error",
                                 error=error, warnings=warnings)


def is_llm_bundle(source: str | Path) -> bool:
    p = Path(source)
    try:
        return p.is_dir() and json.loads((p / "manifest.json").read_text(encoding="utf-8")).get("llm") is not None
    except (OSError, ValueError, AttributeError):
        return False


def check_context(bundle: Bundle, keys: Sequence[str], cfg: LLMRunConfig) -> None:
    """The longest prompt plus the generated tokens must fit every artifact's static KV cache: fail before running."""
    need = max(cfg.prompt_lengths) + cfg.new_tokens
    for key in keys:
        art = bundle.manifest.artifact(key)
        limit = int(art.details.get("max_context") or art.runtime.get("max_context") or 0)
        if limit and need > limit:
            raise InputError(f"{art.key}: the longest prompt ({max(cfg.prompt_lengths)} tokens, --prompt-lengths) plus "
                             f"--new-tokens {cfg.new_tokens} = {need} tokens exceed the artifact's max context {limit}; "
                             "use shorter prompts or fewer new tokens, or re-export with a larger --max-context")


def _prompt(ids: Sequence[int], n: int) -> list[int]:
    reps = -(-n // len(ids))
    return (list(ids) * reps)[:n]


def _measure(job: LLMArtifactJob) -> LLMArtifactResult:
    cfg = job.config
    bundle = load_bundle(job.bundle, verify=False)  # the parent verified every checksum
    art = bundle.manifest.artifact(job.artifact)
    cls = get_llm_runtime(art.format)
    if cls.runs_torch_free():
        block_torch()
    torch_free = torch_blocked()
    threads = cfg.threads or int(bundle.manifest.target.get("threads") or 0) or None
    if threads is not None:
        threads = min(threads, os.cpu_count() or threads)
    held = json.loads((bundle.root / bundle.manifest.samples["heldout"]).read_text(encoding="utf-8"))
    text_ids = [int(i) for i in held["text_ids"]]
    prof, why = energy.power_model_profile(cfg.power_target, bundle.manifest.target.get("name"), platform.machine())
    recorder = energy.Recorder.create(cfg.energy, prof, why, idle_seconds=cfg.idle_seconds,
                                      ctx=energy.MeterContext(sample_hz=cfg.sample_hz, csv_path=cfg.energy_csv))
    t0 = time.perf_counter_ns()
    path = bundle.path_of(art)
    rt = cls(path, art.runtime, threads=threads)
    load_s = (time.perf_counter_ns() - t0) / 1e9
    rss_load = _rss_mb()
    if getattr(rt, "timed_generation", False):  # an engine that only generates (LiteRT-LM): no per-step logits
        return _measure_generation(rt, art, path, cfg, text_ids, recorder, load_s, rss_load, torch_free, threads)
    rt.append(_prompt(text_ids, min(16, rt.max_context)))  # warm-up: first-call allocations stay out of TTFT
    for _ in range(4):
        rt.append([text_ids[0]])
    timings = []
    logits = np.zeros(1, dtype=np.float32)
    for n in cfg.prompt_lengths:
        rt.reset()
        prompt = _prompt(text_ids, n)
        t = time.perf_counter_ns()
        logits = rt.append(prompt)
        ns = time.perf_counter_ns() - t
        timings.append(PromptTiming(n, ns / 1e6, n / (ns / 1e9)))
    token_ns = []
    recorder.start()
    for _ in range(cfg.new_tokens):
        nxt = int(np.argmax(logits))
        t = time.perf_counter_ns()
        logits = rt.append([nxt])
        token_ns.append(time.perf_counter_ns() - t)
    recorder.stop()
    split = resident.snapshot(path)  # before close(): the model and its KV cache still loaded
    rt.close()
    return _result(art, rt, recorder, len(token_ns), token_ns, decode_tokens_per_s=len(token_ns) / (sum(token_ns) / 1e9),
                   torch_free=torch_free, threads=threads, load_seconds=load_s, prompts=tuple(timings),
                   rss_after_load_mb=rss_load, resident_at_end=split)


def _result(art: Any, rt: Any, recorder: Any, decode_tokens: int, token_ns: Sequence[int],
            **measured: Any) -> LLMArtifactResult:
    """The figures every way of timing shares, from the per-token times and the energy window's recorder."""
    tenth = max(1, len(token_ns) // 10)
    en = recorder.result(max(1, decode_tokens))
    peak_pred = art.details.get("predicted_peak_memory_bytes")
    return LLMArtifactResult(
        artifact=art.key, format=art.format, recipe=art.recipe, status="ok", runtime=rt.info(),
        decode_tokens=decode_tokens, decode_token_ms=LatencyStats.from_ns(token_ns),
        decode_retained=float(np.sum(token_ns[:tenth]) / np.sum(token_ns[-tenth:])), token_ns=tuple(token_ns),
        peak_rss_mb=_peak_rss_mb(), max_context=rt.max_context,
        kv_cache_bytes_per_token=art.details.get("kv_cache_bytes_per_token"),
        predicted_peak_memory_mb=peak_pred / 2**20 if peak_pred else None, energy=en,
        joules_per_token=en.joules_per_inference_net or en.joules_per_inference_gross, **measured)


def _measure_generation(rt: Any, art: Any, path: Path, cfg: LLMRunConfig, text_ids: list[int], recorder: Any, load_s: float,
                        rss_load: float | None, torch_free: bool, threads: int | None) -> LLMArtifactResult:
    """The same figures from an engine that takes a prompt and streams a greedy reply (``generate_timed``).

    TTFT is prefill start to the first streamed token; the decode figures come from the chunks streamed after it
    (one per token, except where one character's bytes span tokens); the token counts are the engine's own."""
    rt.generate_timed(_prompt(text_ids, min(16, rt.max_context)), 4)  # warm-up, as for the step runtimes
    timings = []
    for n in cfg.prompt_lengths:
        g = rt.generate_timed(_prompt(text_ids, n), 1)
        timings.append(PromptTiming(g.prompt_tokens, g.ttft_ns / 1e6, g.prompt_tokens / (g.ttft_ns / 1e9)))
    recorder.start()
    g = rt.generate_timed(_prompt(text_ids, max(cfg.prompt_lengths)), cfg.new_tokens + 1)
    recorder.stop()
    split = resident.snapshot(path)  # before close(): the model and its KV cache still loaded
    rt.close()
    token_ns = list(g.chunk_ns)
    warnings = ["energy window covers the prefill of the longest prompt too (the engine runs prefill and decode "
                "in one call)", f"timed through the LiteRT-LM engine; prompts are the held-out ids detokenized and "
                f"re-tokenized by the engine ({', '.join(str(t.prompt_tokens) for t in timings)} tokens)"]
    if g.decode_tokens < cfg.new_tokens + 1:
        warnings.append(f"the engine stopped at a stop token after {g.decode_tokens} tokens")
    if not token_ns:
        raise InputError("the LiteRT-LM engine streamed a single chunk: no decode steps to time")
    return _result(art, rt, recorder, g.decode_tokens - 1, token_ns,
                   decode_tokens_per_s=(g.decode_tokens - 1) / g.decode_seconds if g.decode_seconds > 0 else None,
                   torch_free=torch_free, threads=threads, load_seconds=load_s, prompts=tuple(timings),
                   rss_after_load_mb=rss_load, resident_at_end=split, warnings=tuple(warnings))


def run_job(job: LLMArtifactJob) -> LLMArtifactResult:
    try:
        return _measure(job)
    except EdgeshipError as e:
        return job.failed(str(e))
    except Exception as e:  # a runtime crashing mid-run must not lose the other artifacts' results
        return job.failed(f"{type(e).__name__}: {e}", (traceback.format_exc()[-2000:],))


def _run_child(job: LLMArtifactJob, timeout: float) -> LLMArtifactResult:
    run = run_module("edgeship.profiling.llm.bench", job.to_dict(), timeout, prefix="edgeship-llm-job-")
    if run.returncode is None:
        return job.failed(f"timed out after {timeout:.0f} s")
    if run.result is not None:
        return LLMArtifactResult.from_dict(run.result)
    return job.failed(f"worker exited with code {run.returncode} and wrote no result (the runtime crashed)")


def profile_llm(source: str | Path, *, artifact: str | None = None, config: LLMRunConfig | None = None,
                isolate: bool = True, json_path: str | Path | None = None,
                on_result: Callable[[LLMArtifactResult], None] | None = None) -> LLMProfileResult:
    """Measure every artifact of an LLM bundle (or one) on this machine, each in a fresh process.

    ``on_result`` sees each artifact's result as soon as it is measured (the remote agent streams them)."""
    from edgeship import __version__
    from edgeship.profiling.runner import write_json_atomic

    cfg = config or LLMRunConfig()
    bundle = load_bundle(source, verify=True)
    arts = [bundle.manifest.artifact(artifact)] if artifact else list(bundle.manifest.artifacts)
    check_context(bundle, [a.key for a in arts], cfg)
    results = []
    for a in arts:
        job = LLMArtifactJob(str(bundle.root.resolve()), a.key, a.format, a.recipe, cfg)
        results.append(_run_child(job, timeout=ARTIFACT_TIMEOUT_S) if isolate else run_job(job))
        if on_result is not None:
            on_result(results[-1])
    res = LLMProfileResult(device=sysinfo.describe(), config=cfg, results=tuple(results), source=str(source),
                           target=bundle.manifest.target.get("name"),
                           created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), edgeship_version=__version__)
    if json_path is not None:
        write_json_atomic(Path(json_path), res.to_json())
    return res


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: python -m edgeship.profiling.llm.bench JOB.json RESULT.json", file=sys.stderr)
        return 2
    res = run_job(LLMArtifactJob.from_dict(json.loads(Path(args[0]).read_text())))
    Path(args[1]).write_text(json.dumps(res.to_dict()))
    return 0 if res.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
