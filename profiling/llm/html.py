"""The HTML report of an LLM bundle's profile: TTFT per prompt length, decode tokens/s, J/token (estimates
marked), memory, and the distribution of per-token decode times from the raw samples. Same page style and
charts as :mod:`edgeship.profiling.html`; nothing fetched, no script."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from edgeship.profiling import charts
from edgeship.profiling.charts import esc
from edgeship.profiling.html import _CSS, _fig, _legend, _table
from edgeship.profiling.llm.results import LLMArtifactResult, LLMProfileResult


def _row(r: LLMArtifactResult) -> tuple[str, list[str]]:
    if r.status != "ok":
        return "bad", [esc(r.artifact), esc(r.format), "-", "-", "-", "-", "-", esc(f"ERROR: {r.error}")]
    ttft = ", ".join(f"{p.ttft_ms:.3g} ms @ {p.prompt_tokens}" for p in r.prompts)
    prefill = ", ".join(f"{p.prefill_tokens_per_s:.0f}" for p in r.prompts)
    est = r.energy_estimated
    j = "-" if not r.joules_per_token else (f'<span class="est">{r.joules_per_token * 1e3:.2f} (est.)</span>' if est
                                             else f"{r.joules_per_token * 1e3:.2f}")
    decode = "-" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}"
    return "", [esc(r.artifact), esc(r.format), esc(ttft), esc(prefill), esc(decode), j,
                esc("-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"), esc("; ".join(r.warnings))]


def _charts(ok: list[LLMArtifactResult]) -> str:
    series = [(r.artifact, [t / 1e6 for t in r.token_ns]) for r in ok if r.token_ns]
    desc = "; ".join(f"{n}: {len(s)} tokens, median {statistics.median(s):.3g} ms per token" for n, s in series)
    cdf = charts.cdf("Decode time per token", desc or "no per-token samples", series, "ms per generated token")
    out = [_fig(cdf, "Per-token decode time (raw samples of every greedy step after the first token); further "
                     "left is faster." + _legend([n for n, _ in series]))]
    lines = [(r.artifact, [(float(p.prompt_tokens), p.ttft_ms, f"{p.ttft_ms:.3g} ms") for p in r.prompts])
             for r in ok if r.prompts]
    desc = "; ".join(f"{a}: " + ", ".join(f"{lab} at {x:.0f} tokens" for x, _, lab in pts) for a, pts in lines)
    ttft = charts.curve("Time to first token", desc or "no prompts timed", lines, "prompt tokens", "TTFT, ms")
    out.append(_fig(ttft, "Time to first token by prompt length (prefill from an empty cache)."
                    + _legend([a for a, _ in lines])))
    return '<div class="grid">' + "".join(out) + "</div>"


def render_llm_html(res: LLMProfileResult) -> str:
    dev = res.device
    ok = [r for r in res.results if r.status == "ok"]
    body = [_row(r) for r in res.results]
    fastest = max(ok, key=lambda r: r.decode_tokens_per_s or 0.0, default=None)
    est = any(r.energy_estimated for r in ok)
    lead = (f"<p>Fastest decode: <b>{esc(fastest.artifact)}</b> at {fastest.decode_tokens_per_s or 0:.1f} tokens/s.</p>"
            if fastest else '<p class="warn">Nothing was measured.</p>')
    env = [("device", f"{dev.cpu_model or '?'} ({dev.arch or '?'}, {dev.logical_cpus or '?'} logical CPUs)"),
           ("host / OS", f"{dev.hostname or '?'}, {dev.os or '?'}"),
           ("timed input", "prompts of " + ", ".join(str(p) for p in res.config.prompt_lengths) + " tokens, "
            f"{res.config.new_tokens} new tokens, greedy"),
           ("threads", ", ".join(sorted({str(r.threads) for r in ok if r.threads})) or "runtime default"),
           ("runtimes", json.dumps(dict(dev.runtimes))), ("when", f"{res.created_utc} by edgeship {res.edgeship_version}")]
    parts = ['<!doctype html><html lang="en"><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             "<title>edgeship LLM report</title>", f"<style>{_CSS}</style>", "<main><h1>edgeship report</h1>",
             f'<div class="decision">{lead}</div>',
             _table("Every LLM artifact measured", ["artifact", "format", "TTFT @ prompt tokens", "prefill tok/s",
                                                    "decode tok/s", "mJ/token", "peak RSS MB", "notes"], body),
             ('<p class="est">mJ/token marked (est.) is an ESTIMATE from a power model, not a measurement.</p>'
              if est else ""),
             "<h2>Latency distributions</h2>", _charts(ok), "<h2>What was timed, and on what</h2>",
             "<dl>" + "".join(f"<dt><b>{esc(k)}</b></dt><dd class=wrap>{esc(v)}</dd>" for k, v in env) + "</dl>",
             "</main></html>"]
    return "\n".join(p for p in parts if p)


def write_llm_html(res: LLMProfileResult, path: Path) -> Path:
    from edgeship.profiling.runner import write_json_atomic

    write_json_atomic(path, render_llm_html(res))
    return path
