"""A self-contained HTML report (inline SVG plots, no JavaScript, no plotting library on the device)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgeship.profiling.decide import Decision, Row, rows_of
from edgeship.profiling.results import DeviceInfo, DeviceRun

_CSS = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child,td.l{text-align:left}
.warn{color:#a40}.pick{background:#e6f6e6}.bad{color:#999}svg{margin:1em 0;background:#fafafa}
h2{margin-top:2em}code{background:#f3f3f3;padding:1px 4px}"""
_COLORS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#bbbbbb")


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _bars(title: str, labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]], unit: str) -> str:
    """Grouped horizontal bars: one group per label, one bar per series."""
    vals = [v for _, s in series for v in s if v is not None]
    if not vals:
        return f"<p class=warn>{_esc(title)}: nothing measured</p>"
    vmax = max(vals) * 1.1 or 1.0
    bar_h, gap, left, width = 12, 10, 260, 460
    group_h = bar_h * len(series) + gap
    h = 40 + group_h * len(labels) + 20 * len(series)
    out = [f'<svg width="{left + width + 90}" height="{h}" role="img" aria-label="{_esc(title)}">',
           f'<text x="10" y="20" font-weight="bold">{_esc(title)}</text>']
    for i, lab in enumerate(labels):
        y0 = 35 + i * group_h
        out.append(f'<text x="{left - 8}" y="{y0 + bar_h * len(series) / 2 + 4}" text-anchor="end">{_esc(lab[:40])}</text>')
        for j, (_, s) in enumerate(series):
            v = s[i]
            if v is None:
                continue
            w = max(1.0, v / vmax * width)
            y = y0 + j * bar_h
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{_COLORS[j % len(_COLORS)]}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" font-size="11">{v:.3g} {unit}</text>')
    ly = 35 + group_h * len(labels) + 5
    for j, (name, _) in enumerate(series):
        out.append(f'<rect x="{left + j * 110}" y="{ly}" width="10" height="10" fill="{_COLORS[j % len(_COLORS)]}"/>'
                   f'<text x="{left + j * 110 + 14}" y="{ly + 9}" font-size="11">{_esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _scatter(title: str, pts: Sequence[tuple[str, float, float]], xlab: str, ylab: str) -> str:
    if not pts:
        return ""
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.1 or 1.0
    y0, y1 = min(ys) - 0.002, max(ys) + 0.002
    w, h, m = 680, 300, 50
    sx = lambda x: m + (x - x0) / (x1 - x0) * (w - 2 * m - 120)  # noqa: E731  (room for labels on the right)
    sy = lambda y: h - m - (y - y0) / ((y1 - y0) or 1) * (h - 2 * m)  # noqa: E731
    out = [f'<svg width="{w}" height="{h}" role="img" aria-label="{_esc(title)}">',
           f'<text x="10" y="20" font-weight="bold">{_esc(title)}</text>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#888"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#888"/>',
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">{_esc(xlab)}</text>',
           f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle">{_esc(ylab)}</text>',
           f'<text x="{m - 4}" y="{sy(y0) + 4}" text-anchor="end" font-size="10">{y0:.3f}</text>',
           f'<text x="{m - 4}" y="{sy(y1) + 4}" text-anchor="end" font-size="10">{y1:.3f}</text>',
           f'<text x="{sx(x1)}" y="{h - m + 14}" text-anchor="end" font-size="10">{x1:.3g}</text>']
    for i, (lab, x, y) in enumerate(pts):
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{_COLORS[i % len(_COLORS)]}"/>'
                   f'<text x="{sx(x) + 7:.1f}" y="{sy(y) + 4:.1f}" font-size="11">{_esc(lab)}</text>')
    out.append("</svg>")
    return "".join(out)


def _row_label(r: Row, many_devices: bool) -> str:
    return f"{r.device[:18]}: {r.artifact}" if many_devices else r.artifact


def _errors_block(runs: Sequence[DeviceRun]) -> str:
    """Every failed artifact's whole error, below the table (the table's notes cell is cut to fit)."""
    many = len(runs) > 1
    items = [f"<li><b>{_esc(f'{run.name}: ' if many else '')}{_esc(r.artifact)}</b>: "
             f"<code>{_esc(' '.join((r.error or 'failed with no message').split()))}</code></li>"
             for run in runs if run.profile for r in run.profile.results if r.failed]
    return f"<h2>Errors</h2><ul class=warn>{''.join(items)}</ul>" if items else ""


def render_html(runs: Sequence[DeviceRun], decision: Decision | None = None) -> str:
    rows = rows_of(runs)
    many = len({r.device for r in rows}) > 1
    ok = [r for r in rows if r.ok]
    labels = [_row_label(r, many) for r in ok]
    parts = ["<!doctype html><meta charset=utf-8><title>edgeship report</title>", f"<style>{_CSS}</style>",
             "<h1>edgeship report</h1>"]
    for run in runs:
        dev = run.profile.device if run.profile else DeviceInfo()
        emu = dev.emulated
        parts.append(f"<p><b>{_esc(run.url or dev.hostname or 'local')}</b>: "
                     f"{_esc(dev.cpu_model)} ({_esc(dev.arch)}, {_esc(dev.logical_cpus)} CPUs), "
                     f"{_esc(dev.os)}; runtimes {_esc(json.dumps(dict(dev.runtimes)))}"
                     + (f" <span class=warn>EMULATED by {_esc(emu)}: timings are not the device's</span>" if emu else "")
                     + (f" <span class=warn>{_esc(run.error)}</span>" if run.error else "") + "</p>")
    head = "<tr><th>device</th><th>artifact</th><th>MB</th><th>mean cos</th><th>p50 ms</th><th>p99 ms</th>" \
           "<th>peak MB</th><th>mJ/inf</th><th>notes</th></tr>"
    body = []
    verdict = dict(zip(decision.rows, decision.verdicts, strict=True)) if decision else {}
    for r in rows:
        cls = "pick" if decision and r is decision.pick else ("bad" if not r.ok else "")
        notes = "; ".join(verdict.get(r, ())) if decision else (r.error or "")
        if r.emulated:
            notes = f"EMULATED; {notes}" if notes else "EMULATED"
        cells = [r.device, r.artifact, *r.cells(), notes]
        body.append(f"<tr class='{cls}'>" + "".join(
            f"<td{' class=l' if i in (0, 1, 8) else ''}>{_esc(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    parts.append(f"<table>{head}{''.join(body)}</table>")
    parts.append(_errors_block(runs))
    if decision:
        pick = decision.pick
        budget = ", ".join(f"{k} = {v:g}" for k, v in decision.budget.to_dict().items()) or "none"
        parts.append(f"<p><b>Budget</b> {_esc(budget)}; objective: lowest "
                     f"{_esc(decision.objective)}: "
                     + (f"<b>pick {_esc(pick.artifact)} on {_esc(pick.device)}</b>" if pick else "nothing meets it")
                     + "</p>")
    parts.append(_bars("Latency per inference", labels, [("p50", [r.p50_ms for r in ok]), ("p99", [r.p99_ms for r in ok])],
                       "ms"))
    parts.append(_bars("Peak memory (RSS)", labels, [("peak", [r.peak_mb for r in ok])], "MB"))
    if any(r.mj_per_inference is not None for r in ok):
        est = any(r.energy_estimated for r in ok)
        parts.append(_bars("Energy per inference" + (" (estimates where marked (est))" if est else ""), labels,
                           [("mJ", [r.mj_per_inference for r in ok])], "mJ"))
    parts.append(_scatter("Size vs fidelity", [(lab, r.size_mb, r.mean_cosine) for lab, r in zip(labels, ok, strict=True)
                                               if r.mean_cosine is not None], "MB", "mean cosine vs PyTorch"))
    parts.append("<p>Latencies from raw perf_counter_ns samples after warm-up; energy marked (est) is a model "
                 "(power model x CPU time), not a measurement.</p>")
    return "\n".join(parts)


def write_html(runs: Sequence[DeviceRun], path: Path, decision: Decision | None = None) -> Path:
    from edgeship.profiling.runner import write_json_atomic  # any text, written atomically

    write_json_atomic(path, render_html(runs, decision))
    return path
