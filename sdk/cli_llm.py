"""The LLM side of the command line: ``export`` of a causal LM, ``profile`` of an LLM bundle, ``chat``, and
``quickstart --llm``. ``edgeship.cli`` dispatches here; kept apart so the encoder CLI stays as it was."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeship import quiet
from edgeship.errors import ConfigError
from edgeship.exporters.llm_base import KV_CACHE_DTYPES

if TYPE_CHECKING:
    from edgeship.pipeline import ExportResult

EXIT_FAIL = 1


def add_export_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("--adapter", help="LLMs: a PEFT LoRA adapter directory merged into the model before export")
    e.add_argument("--max-context", type=int, help="LLMs: static KV-cache length in tokens (default: the profile's)")
    e.add_argument("--no-greedy-search", dest="greedy_search", action="store_false",
                   help="LLMs: keep int8 activations everywhere even when they change a greedy answer (faster decode; "
                        "by default the matmuls that change one get fp32 activations where the format can)")
    e.add_argument("--kv-cache", choices=list(KV_CACHE_DTYPES), default="fp32",
                   help="LLMs: the static KV cache's element type (default %(default)s); int8 holds a quarter of the "
                        "bytes (per-channel scales calibrated at export; ONNX only, its fidelity measured as always)")


def encoder_only_flags(a: argparse.Namespace) -> list[str]:
    """The encoder-only export flags ``a`` sets (a causal-LM export refuses them rather than ignore them)."""
    given = {"--heldout": a.heldout is not None, "--task": a.task is not None, "--seq-len": a.seq_len is not None,
             "--checkpoint": a.checkpoint is not None, "--jobs": a.jobs != "auto"}
    return [flag for flag, on in given.items() if on]


def llm_only_flags(a: argparse.Namespace) -> list[str]:
    """The LLM-only export flags ``a`` sets (an encoder export refuses them rather than ignore them)."""
    given = {"--adapter": a.adapter is not None, "--max-context": a.max_context is not None,
             "--no-greedy-search": not a.greedy_search, "--kv-cache": a.kv_cache != "fp32"}
    return [flag for flag, on in given.items() if on]


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lengths", default="64,256", help="LLM bundles: prompt lengths for TTFT (default 64,256)")
    p.add_argument("--new-tokens", type=int, default=128, help="LLM bundles: greedy tokens timed for decode (default 128)")


def add_report_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--max-ttft-ms", type=float, help="LLM results: time to first token at the longest prompt timed")


def report_is_llm(paths: list[str]) -> bool:
    """True when every results file is an LLM profile; a mix of encoder and LLM files is refused. Unreadable
    files are left to the loader, which says what is wrong with them."""
    from edgeship.profiling.llm.decide import is_llm_document

    kinds = {}
    for p in paths:
        try:
            kinds[p] = is_llm_document(json.loads(Path(p).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    if any(kinds.values()) and not all(kinds.values()):
        llm = ", ".join(p for p, k in kinds.items() if k)
        raise ConfigError(f"{llm}: LLM results cannot be reported with encoder results; run edgeship report on the "
                          "LLM files and on the encoder files separately")
    return any(kinds.values())


def report_llm_cmd(a: argparse.Namespace) -> int:
    """``edgeship report`` of LLM results files: the table, the pick under a budget, the LLM HTML page."""
    from edgeship.profiling.llm.decide import (
        LLMBudget,
        decide_llm,
        load_llm_documents,
        merged,
        render_llm_decision,
    )
    from edgeship.profiling.runner import write_json_atomic

    unsupported = [f for f, v in (("--min-cosine", a.min_cosine), ("--max-size-mb", a.max_size_mb),
                                  ("--record", a.record), ("--predictions", getattr(a, "predictions", None)))
                   if v is not None]
    if unsupported:
        raise ConfigError(f"{', '.join(unsupported)}: not available for LLM results (fidelity and size are in the "
                          "bundle: edgeship inspect); use --max-peak-mb, --max-mj (per token), --max-ttft-ms, "
                          "--max-p50-ms / --max-p99-ms (per token)")
    docs = load_llm_documents(a.results)
    budget = LLMBudget(max_peak_mb=a.max_peak_mb, max_mj_per_token=a.max_mj, max_ttft_ms=a.max_ttft_ms,
                       max_p50_ms=a.max_p50_ms, max_p99_ms=a.max_p99_ms)
    d = decide_llm(docs, budget, a.objective)
    print(render_llm_decision(d))
    if a.json_path:
        write_json_atomic(Path(a.json_path), json.dumps(d.to_dict(), indent=2))
    if a.html_path:
        from edgeship.profiling.llm.html import write_llm_html

        print(f"HTML report: {write_llm_html(merged(docs), Path(a.html_path))}")
    return 0 if d.pick is not None else EXIT_FAIL


def add_chat_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("chat", help="stream a reply from one artifact of an LLM bundle")
    c.add_argument("bundle")
    c.add_argument("--artifact", help="FORMAT/RECIPE (default: the first artifact)")
    c.add_argument("--prompt", help="the user message (default: read one line from stdin)")
    c.add_argument("--new-tokens", type=int, default=128, help="at most this many tokens (default 128)")
    c.add_argument("--threads", type=int)
    c.set_defaults(fn=cmd_chat)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--prompt-lengths '{text}': expected integers separated by commas, e.g. 64,256") from None


def export_llm_cmd(a: argparse.Namespace, say: Callable[[str], None]) -> ExportResult:
    """``edgeship export``'s options applied to a causal LM; ``say`` takes our progress lines (the caller diverts
    the other libraries' output to a log and prints the result)."""
    from edgeship.llm import export_llm

    if flags := encoder_only_flags(a):
        raise ConfigError(f"{' '.join(flags)}: not for causal LMs ({a.model} is one); drop the flag(s). An LLM "
                          "export measures fidelity on its own held-out text and prompts")
    return export_llm(a.model, target=a.target, out=a.output, formats=a.format or None, recipes=a.quant or None,
                      max_context=a.max_context, adapter=a.adapter, overwrite=a.overwrite,
                      allow_degraded=a.allow_degraded, greedy_search=a.greedy_search, kv_cache=a.kv_cache,
                      calibration=a.calibration, log=say)


def profile_llm_cmd(a: argparse.Namespace) -> int:
    from edgeship.profiling.llm.bench import LLMRunConfig, profile_llm
    from edgeship.profiling.llm.results import render

    if getattr(a, "farm", None):
        raise ConfigError("--farm does not take LLM bundles yet: profile them on devices with --device ssh://... or "
                          "--inventory FILE")
    cfg = LLMRunConfig(prompt_lengths=_lengths(a.prompt_lengths), new_tokens=a.new_tokens, threads=a.threads,
                       energy=a.energy, idle_seconds=a.idle_seconds, sample_hz=a.sample_hz, energy_csv=a.energy_csv,
                       power_target=a.target)
    if a.device or a.inventory:
        return _profile_llm_remote(a, cfg)
    res = profile_llm(a.source, artifact=a.artifact, config=cfg, isolate=not a.no_isolate, json_path=a.json_path)
    print(render(res))
    from edgeship.cli_history import record_llm_profile

    record_llm_profile(a, res, a.source)
    if getattr(a, "html_path", None):
        from edgeship.profiling.llm.html import write_llm_html

        print(f"HTML report: {write_llm_html(res, Path(a.html_path))}")
    _estimate_note([res])
    return 0 if res.ok else EXIT_FAIL


def _profile_llm_remote(a: argparse.Namespace, cfg: Any) -> int:
    """``--device`` / ``--inventory``: one document per device (a fleet's in one file), each device recorded."""
    from edgeship.bundle import check_signed
    from edgeship.cli_history import record_llm_profile
    from edgeship.profiling.llm.remote import profile_llm_remote
    from edgeship.profiling.llm.results import fleet_to_dict, render
    from edgeship.profiling.runner import write_json_atomic

    check_signed(a.source, a.pubkey)  # before anything is copied to a device
    runs = profile_llm_remote(a.source, devices=a.device, inventory=a.inventory, config=cfg, artifact=a.artifact,
                              identity=a.identity, accept_new_host_key=a.accept_new_host_key)
    if a.json_path:
        text = runs[0].to_json() if len(runs) == 1 else json.dumps(fleet_to_dict(runs), indent=2)
        write_json_atomic(Path(a.json_path), text)
    for res in runs:
        print(f"== {res.device_name}")
        if res.results:  # a device that failed mid-run still shows what it measured
            print(render(res))
        if res.error:
            print(f"{res.device_url}: ERROR {res.error}")
        print()
        record_llm_profile(a, res, a.source)
    if getattr(a, "html_path", None):
        from edgeship.profiling.llm.decide import merged
        from edgeship.profiling.llm.html import write_llm_html

        print(f"HTML report: {write_llm_html(merged([(r.device_name, r) for r in runs]), Path(a.html_path))}")
    _estimate_note(runs)
    return 0 if all(r.ok for r in runs) else EXIT_FAIL


def _estimate_note(runs: Any) -> None:
    for res in runs:
        for r in res.results:
            if r.status == "ok" and r.energy_estimated:
                print("mJ/token marked (est.) is an ESTIMATE from the target power model, not a measurement "
                      f"({r.energy.source if r.energy else '?'}: no real power meter on the device that ran it)")
                return


def cmd_chat(a: argparse.Namespace) -> int:
    from edgeship.bundle import opened
    from edgeship.profiling.backends.pte_lean import runs_models_only
    from edgeship.profiling.llm.chat import chat

    runs_models_only()  # a .pte replies through the kernels the profiler measures (no torch library mapped)

    prompt = a.prompt if a.prompt is not None else sys.stdin.readline().strip()
    if not prompt:
        raise ConfigError("give a message with --prompt TEXT (or one line on stdin)")

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with opened(a.bundle) as root:
        chat(root, a.artifact, prompt, a.new_tokens, a.threads, write)
    print()
    return 0


def quickstart_llm(a: argparse.Namespace) -> int:
    from edgeship.llm import export_llm
    from edgeship.llm_models import default_llm_gguf
    from edgeship.profiling.llm.bench import LLMRunConfig, profile_llm
    from edgeship.profiling.llm.results import render

    out = Path(a.output)
    print(f"edgeship quickstart --llm: SmolLM2-135M-Instruct -> {a.target} -> {out}", flush=True)
    json_path = out.with_name(out.name + "-profile.json")
    with quiet.for_command("quickstart", a.verbose) as q:  # the converters' and runtimes' chatter to a log
        res = export_llm(default_llm_gguf(), target=a.target, out=out, formats=a.format or ["onnx"],
                         recipes=a.quant or None, overwrite=True, log=q.brief)
        print(res.summary(), flush=True)
        prof = profile_llm(out, config=LLMRunConfig(), json_path=json_path)
    print()
    print(render(prof))
    print(f"\nbundle: {out}   results: {json_path}   chat: edgeship chat {out} --prompt 'What is the capital of France?'")
    return 0 if prof.ok else EXIT_FAIL


def inspect_llm(bundle: Any) -> int:
    """``edgeship inspect`` of an LLM bundle: per artifact its fidelity, KV cache and predicted peak memory."""
    from edgeship.profiling.report import table

    m = bundle.manifest
    gen = m.llm["generation"]
    print(f"model {m.model['name']} ({m.model['architecture']}, {m.model['parameters'] / 1e6:.1f} M parameters), "
          f"target {m.target['name']}, max context {gen['max_context']}, EOS {gen['eos_token_ids']}, "
          f"chat template {m.llm['chat_template']}")
    rows = []
    for a in m.artifacts:
        f = a.llm_fidelity
        rows.append([a.key, f"{a.size_bytes / 2**20:.1f}", f"{f.top1_agreement:.3f}" if f else "-",
                     f"{f.mean_kl:.4f}" if f else "-", f"{f.greedy_identical}/{f.n_prompts}" if f else "-",
                     f"{a.details.get('kv_cache_bytes_per_token', '-')} "
                     f"({(a.quantization.get('kv_cache') or {}).get('dtype', 'fp32')})",
                     f"{a.details.get('predicted_peak_memory_bytes', 0) / 2**20:.0f}", a.sha256[:12]])
    print(table(rows, ["artifact", "MB", "top-1", "mean KL", "greedy same", "KV B/token", "peak MB@ctx", "sha256"]))
    for r in m.llm.get("refused", []):
        print(f"{r['format']}/{r['recipe']}: refused by {r['tool']}: {r['reason']}")
    for a in m.artifacts:
        for w in a.warnings:
            print(f"{a.key}: warning: {w}")
    print("checksums: all artifacts verified")
    from edgeship.signing import describe

    print(describe(bundle.root))
    return 0
