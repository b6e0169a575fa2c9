"""The HTML report a person reads: one self-contained page (inline CSS and SVG, no script, nothing fetched).

Order: the decision first (the pick, and why each other artifact lost), then the table, the latency
distributions from the raw samples, the latency-fidelity-size Pareto front, memory and energy (estimates
hatched and marked), devices side by side and intervals over repeated runs where the results have them, and
last what was timed and on what (input, CPU, governor, temperature, runtimes). Charts are
:mod:`edgeship.profiling.charts`; every chart carries a text alternative and its numbers are in a table too.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeship.profiling import charts
from edgeship.profiling.charts import esc
from edgeship.profiling.decide import Decision, Row, rows_of
from edgeship.profiling.report import _fmt
from edgeship.profiling.results import ArtifactResult, DeviceInfo, DeviceRun

_CSS = """*{box-sizing:border-box}body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;padding:12px;max-width:1200px;
color:#222}h1{font-size:1.5em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th[scope=row],td.l,th.l{text-align:left}caption{text-align:left;font-weight:600;padding:4px 0}
tr.pick{background:#e2f4e2;font-weight:600}tr.bad{color:#888}.warn{color:#a40}.est{color:#8a5a00;font-style:italic}
.scroll{max-width:100%;overflow-x:auto}.scroll:focus{outline:2px solid #4477aa}
td{white-space:nowrap}code,.wrap{overflow-wrap:anywhere;word-break:break-word;white-space:normal}code{background:#f3f3f3;padding:1px 4px}
svg.chart{width:100%;max-width:600px;height:auto;display:block;background:#fafafa}
svg text{fill:#222}svg text.tick{font-size:11px;fill:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:16px}
figure{margin:0}figcaption{font-size:.9em}.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 14px}
.sw{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.decision{border:2px solid #228833;border-radius:6px;padding:8px 12px;background:#f4fbf4}
@media (max-width:640px){table.cards,table.cards tbody,table.cards tr,table.cards td,table.cards th{display:block}
table.cards thead{position:absolute;left:-9999px}table.cards caption{display:block}table.cards tr{border:1px solid #bbb;margin:0 0 8px;border-radius:4px}
table.cards td,table.cards th{border:0;border-bottom:1px solid #eee;text-align:right;display:flex;gap:8px;
justify-content:space-between}table.cards td::before,table.cards th::before{content:attr(data-label);
font-weight:600;text-align:left;flex:0 0 38%;overflow-wrap:anywhere}table.cards td{white-space:normal;text-align:right}.scroll{overflow-x:visible}}"""


_TEXT_COLUMNS = {"device", "notes", "fit error", "target", "mean / min cosine on your inputs"}  # may wrap; numbers never break across lines


@dataclass(frozen=True)
class Entry:
    """One (device run, artifact) line of the report: the decision's row and the full result behind it."""

    run: int  # index into the runs
    device: str  # the run's name, made unique when two devices share one
    row: Row
    result: ArtifactResult

    repeat: int = 0  # > 0: the n-th repeated run of this artifact on this device

    @property
    def label(self) -> str:
        return f"{self.row.name} (run {self.repeat + 1})" if self.repeat else self.row.name


def entries(runs: Sequence[DeviceRun], rows: Sequence[Row] | None = None) -> list[Entry]:
    """The rows of :func:`rows_of` (or a decision's, which are the same rows), with their results."""
    it = iter(rows if rows is not None else rows_of(runs))
    seen: dict[tuple[str, str], int] = defaultdict(int)
    out = []
    for i, run in enumerate(runs):
        if run.profile is None:
            continue
        for r in run.profile.results:
            if r.ok or r.failed:
                row = next(it)
                out.append(Entry(i, run.name, row, r, seen[(run.name, row.name)]))
                seen[(run.name, row.name)] += 1
    return out


def _table(caption: str, head: Sequence[str], body: Sequence[tuple[str, Sequence[str]]], cards: bool = True) -> str:
    """A keyboard-reachable table (the scroll region takes focus); the first cell of a row is its header.
    On a phone a ``cards`` table shows each row as a card of label: value lines instead of overflowing."""
    th = "".join(f'<th scope="col"{" class=l" if i == 0 else ""}>{esc(h)}</th>' for i, h in enumerate(head))
    rows = []
    for cls, cells in body:
        tds = [f'<th scope="row" class="l wrap" data-label="{esc(head[0])}">{cells[0]}</th>']
        tds += [f'<td data-label="{esc(h)}"{" class=wrap" if h in _TEXT_COLUMNS else ""}>{c}</td>'
                for h, c in zip(head[1:], cells[1:], strict=True)]
        rows.append(f'<tr class="{cls}">{"".join(tds)}</tr>')
    return (f'<div class="scroll" tabindex="0" role="region" aria-label="{esc(caption)}">'
            f'<table class="{"cards" if cards else ""}"><caption>{esc(caption)}</caption><thead><tr>{th}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _legend(names: Sequence[str]) -> str:
    return '<ul class="legend">' + "".join(f'<li><span class="sw" style="background:{charts.color(i)}"></span>'
                                           f"{esc(n)}</li>" for i, n in enumerate(names)) + "</ul>"


def _fig(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>" if svg else ""


# --- the decision ---------------------------------------------------------------------------------------------------

def _why_lost(e: Entry, d: Decision, verdict: Sequence[str]) -> str:
    if e.row is d.pick:
        return "PICK"
    if verdict:
        return "; ".join(verdict)
    key = {"latency": "p50_ms", "energy": "mj_per_inference", "size": "size_mb", "memory": "peak_mb"}[d.objective]
    mine, best = getattr(e.row, key), getattr(d.pick, key) if d.pick else None
    unit = {"latency": "ms p50", "energy": "mJ", "size": "MB", "memory": "MB peak"}[d.objective]
    if mine is None or best is None:
        return f"inside the budget; {d.objective} not measured"
    return f"inside the budget, but {d.objective} {mine:.3g} {unit} vs the pick's {best:.3g}"


def _decision_block(es: Sequence[Entry], d: Decision | None, many: bool) -> str:
    if d is None:
        ok = [e for e in es if e.row.ok and e.row.p50_ms is not None]
        if not ok:
            return '<p class="warn">Nothing was measured.</p>'
        fast = min(ok, key=lambda e: e.row.p50_ms or 0.0)
        return (f'<div class="decision"><p>No budget given (<code>edgeship report --max-p99-ms X --min-cosine Y</code> '
                f"picks one). Fastest measured: <b>{esc(fast.label)}</b>"
                f"{' on ' + esc(fast.device) if many else ''} at {fast.row.p50_ms:.3g} ms p50.</p></div>")
    budget = ", ".join(f"{k} = {v:g}" for k, v in d.budget.to_dict().items()) or "none"
    verdicts = dict(zip(d.rows, d.verdicts, strict=True))
    if d.pick:
        head = (f"<p><b>Pick: {esc(d.pick.name)}</b>{' on ' + esc(d.pick.device) if many else ''} "
                f"(lowest {esc(d.objective)} inside the budget: {esc(budget)}).</p>")
    else:
        head = f'<p class="warn"><b>Nothing meets the budget</b> ({esc(budget)}): relax it or export another recipe.</p>'
    items = "".join(f"<li><b>{esc(e.label)}</b>{' on ' + esc(e.device) if many else ''}: "
                    f"{esc(_why_lost(e, d, verdicts.get(e.row, ())))}</li>" for e in es if e.row is not d.pick)
    return f'<div class="decision">{head}<p>Why the others lost:</p><ul class="wrap">{items}</ul></div>'


def _main_table(es: Sequence[Entry], d: Decision | None) -> str:
    verdicts = dict(zip(d.rows, d.verdicts, strict=True)) if d else {}
    body = []
    for e in es:
        r = e.row
        cls = "pick" if d and r is d.pick else ("bad" if not r.ok else "")
        mark = "PICK: " if cls == "pick" else ""
        notes = "; ".join(verdicts.get(r, ())) if d else (r.error or "")
        if r.emulated:
            notes = f"EMULATED ({r.emulated}); {notes}".rstrip("; ")
        cells = r.cells()
        if r.energy_estimated and r.mj_per_inference is not None:
            cells[5] = f'<span class="est">{esc(cells[5])}</span>'
        else:
            cells[5] = esc(cells[5])
        body.append((cls, [f"{mark}{esc(r.name)}", esc(r.device), *(esc(c) for c in cells[:5]), cells[5],
                           esc(e.result.threads if e.result.threads is not None else "-"), esc(notes)]))
    return _table("Every artifact measured", ["artifact", "device", "MB", "mean cosine", "p50 ms", "p99 ms", "peak MB",
                                              "mJ/inference", "threads", "notes"], body)


# --- charts per device ------------------------------------------------------------------------------------------------

def _by_device(es: Sequence[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = defaultdict(list)
    for e in es:
        out[e.device].append(e)
    return out


def _latency_cdf(device: str, es: Sequence[Entry], many: bool) -> str:
    series = [(e.label, [s / 1e6 for s in e.result.samples_ns]) for e in es if e.result.ok and e.result.samples_ns]
    if not series:
        return ""
    desc = "; ".join(f"{n}: {len(s)} runs, min {min(s):.3g} ms, median {statistics.median(s):.3g} ms, "
                     f"max {max(s):.3g} ms" for n, s in series)
    title = f"Latency distribution{' on ' + device if many else ''}"
    svg = charts.cdf(title, desc, series, "latency per inference, ms")
    missing = [e.label for e in es if e.result.ok and not e.result.samples_ns]
    note = f" No raw samples kept for {esc(', '.join(missing))}." if missing else ""
    return _fig(svg, f"{esc(title)}: empirical CDF of every timed run (raw perf_counter_ns samples after warm-up); "
                     f"further left is faster, a steep line is steady.{note}" + _legend([n for n, _ in series]))


def pareto_front(es: Sequence[Entry]) -> set[int]:
    """Indices of the entries no other entry beats on latency (p50), fidelity (mean cosine) and size at once."""
    pts = [(e.row.p50_ms, -(e.row.mean_cosine or 0.0), e.row.size_mb) for e in es]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return {i for i, p in enumerate(pts) if not any(dominates(q, p) for j, q in enumerate(pts) if j != i)}  # type: ignore[arg-type]


def _pareto(device: str, es: Sequence[Entry], many: bool) -> str:
    es = [e for e in es if e.row.ok and e.row.p50_ms is not None and e.row.mean_cosine is not None]
    if not es:
        return ""
    front = pareto_front(es)
    smax = max(e.row.size_mb for e in es) or 1.0
    pts = [charts.Point(f"{e.label} ({e.row.size_mb:.3g} MB)", float(e.row.p50_ms or 0), float(e.row.mean_cosine or 0),
                        4 + 8 * (e.row.size_mb / smax) ** 0.5, i in front) for i, e in enumerate(es)]
    on = [es[i].label for i in sorted(front)]
    title = f"Latency, fidelity and size{' on ' + device if many else ''}"
    desc = ("Pareto front (no other artifact is at least as fast, as faithful and as small, and better in one): "
            + ", ".join(on) + ". " + "; ".join(f"{p.label}: p50 {p.x:.3g} ms, mean cosine {p.y:.6f}" for p in pts))
    svg = charts.scatter(title, desc, pts, "p50 latency, ms", "mean cosine vs PyTorch", front_line=True)
    return _fig(svg, f"{esc(title)}: filled points are on the Pareto front ({esc(', '.join(on))}), hollow ones are "
                     "beaten by another artifact on all three; the point's area grows with the file size.")


def _memory_energy(device: str, es: Sequence[Entry], many: bool) -> str:
    ok = [e for e in es if e.row.ok]
    suffix = f" on {device}" if many else ""
    mem = charts.hbars(f"Peak memory (RSS){suffix}", "; ".join(f"{e.label}: {_fmt(e.row.peak_mb, '.0f')} MB" for e in ok),
                       [(e.label, e.row.peak_mb, False, "") for e in ok], "MB")
    parts = [_fig(mem, f"Peak resident memory of each artifact's own worker process{esc(suffix)}.")]
    if any(e.row.mj_per_inference is not None for e in ok):
        est = [e for e in ok if e.row.energy_estimated and e.row.mj_per_inference is not None]
        energy = charts.hbars(f"Energy per inference{suffix}",
                              "; ".join(f"{e.label}: {_fmt(e.row.mj_per_inference, '.3g')} mJ"
                                        f"{' (estimate)' if e.row.energy_estimated else ''}" for e in ok),
                              [(e.label, e.row.mj_per_inference, e.row.energy_estimated, "n/a") for e in ok], "mJ")
        why = {str(e.result.energy.reason) for e in est if e.result.energy and e.result.energy.reason}
        note = (f' <span class="est">Hatched bars marked (est.) are ESTIMATES from a power model, not measurements'
                f"{': ' + esc('; '.join(sorted(why))) if why else ''}.</span>") if est else " Measured by a power meter."
        parts.append(_fig(energy, f"Energy per inference{esc(suffix)} (net of idle where idle was measured).{note}"))
    return "".join(parts)


def _sweep(device: str, es: Sequence[Entry], many: bool) -> str:
    """Latency against energy per artifact across a sweep's settings: the frugal end is bottom-left."""
    pts: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for e in es:
        if e.row.setting and e.row.ok and e.row.p99_ms is not None and e.row.mj_per_inference is not None:
            pts[e.row.artifact].append((e.row.p99_ms, e.row.mj_per_inference, e.row.setting.replace("threads=", "t")))
    if not pts:
        return ""
    est = any(e.row.energy_estimated for e in es if e.row.setting)
    title = f"Latency vs energy per setting{' on ' + device if many else ''}"
    desc = "; ".join(f"{a}: " + ", ".join(f"{lab} p99 {x:.3g} ms {y:.3g} mJ" for x, y, lab in p) for a, p in pts.items())
    svg = charts.curve(title, desc, list(pts.items()), "p99 latency, ms", "mJ per inference" + (" (est.)" if est else ""))
    note = (' <span class="est">Energy here is ESTIMATED from a power model and CPU time, not measured.</span>'
            if est else "")
    return _fig(svg, f"{esc(title)}: each point is one (threads, cores) setting (t = threads); lower is more frugal, "
                     f"further left is faster.{note}" + _legend(list(pts)))


def _notes(runs: Sequence[DeviceRun]) -> str:
    notes = [f"{run.name}: {n}" for run in runs if run.profile for n in run.profile.notes]
    return f'<ul class="warn wrap">{"".join(f"<li>{esc(n)}</li>" for n in notes)}</ul>' if notes else ""


# --- fleet, intervals, environment --------------------------------------------------------------------------------------

def _side_by_side(groups: dict[str, list[Entry]]) -> str:
    devices = list(groups)
    arts = list(dict.fromkeys(e.row.name for es in groups.values() for e in es))
    body = []
    for a in arts:
        cells = []
        for dev in devices:
            mine = [e.row for e in groups[dev] if e.row.name == a and e.row.ok]
            if not mine:
                cells.append("-")
                continue
            r = mine[0]
            emu = ' <span class="warn">EMULATED</span>' if r.emulated else ""
            mj = "" if r.mj_per_inference is None else (f", {r.mj_per_inference:.3g} mJ"
                                                        f"{'<span class=est> (est.)</span>' if r.energy_estimated else ''}")
            cells.append(f"{_fmt(r.p50_ms, '.3g')} / {_fmt(r.p99_ms, '.3g')} ms{mj}{emu}")
        body.append(("", [esc(a), *cells]))
    return "<h2>Devices side by side</h2>" + _table("p50 / p99 latency and energy per inference, one column per device",
                                                    ["artifact", *devices], body)


def _intervals(es: Sequence[Entry]) -> str:
    """Spread between repeated runs of one artifact on one device (several results files or runs)."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for e in es:
        if e.row.ok and e.row.p50_ms is not None:
            groups[(e.device, e.row.name)].append(e.row)
    rep = {k: v for k, v in groups.items() if len(v) > 1}
    if not rep:
        return ""
    body = []
    for (dev, art), rows in rep.items():
        p50 = [r.p50_ms or 0.0 for r in rows]
        p99 = [r.p99_ms or 0.0 for r in rows]
        sd = statistics.stdev(p50)
        body.append(("", [esc(art), esc(dev), str(len(rows)), f"{statistics.mean(p50):.3g}",
                          f"{min(p50):.3g} - {max(p50):.3g}", f"{sd:.2g} ({sd / statistics.mean(p50):.0%})",
                          f"{min(p99):.3g} - {max(p99):.3g}"]))
    return ("<h2>Between repeated runs</h2><p>The same artifact on the same device in several results: the range says "
            "how much a single run's number can move.</p>"
            + _table("p50 and p99 over repeated runs", ["artifact", "device", "runs", "mean p50 ms", "p50 range ms",
                                                         "p50 std dev", "p99 range ms"], body))


def _user_inputs(runs: Sequence[DeviceRun]) -> str:
    """--inputs: latency by input length per artifact, and agreement on those inputs with the run's fp32 artifact."""
    many = len(runs) > 1
    body, names = [], set()
    for run in runs:
        for r in run.profile.results if run.profile else ():
            u = r.user_inputs
            if u is None:
                continue
            names.add(u.describe())
            a = u.agreement
            agree = f"{a.mean_cosine:.4f} / {a.min_cosine:.4f} vs {u.agreement_vs}" if a else (u.agreement_note or "-")
            for b in u.buckets:
                body.append(("", [esc(f"{run.name}: {r.artifact}" if many else r.artifact), esc(b.label),
                                  str(b.inputs), str(b.runs), f"{b.p50_ms:.3g}", f"{b.p90_ms:.3g}", esc(agree)]))
    if not body:
        return ""
    return ("<h2>Your inputs</h2><p class=wrap>Timed round-robin on " + esc(", ".join(sorted(names))) + ". Agreement "
            "is with another artifact of this run on your inputs, not with PyTorch (there is no PyTorch on the "
            "device); the checks against PyTorch are those on the bundle's held-out samples.</p>"
            + _table("latency by input length", ["artifact", "length", "inputs", "runs", "p50 ms", "p90 ms",
                                                 "mean / min cosine on your inputs"], body))


def _telemetry_text(results: Sequence[ArtifactResult]) -> tuple[str, str]:
    temps, gov = [], set()
    for r in results:
        if r.telemetry is None:
            continue
        t = r.telemetry.readings.get("temperature") or {}
        temps += [f"{z} {v.get('max_c', v.get('max', '?'))} °C max" if isinstance(v, dict) else f"{z} {v}"
                  for z, v in (t.items() if isinstance(t, dict) else ())]
        g = r.telemetry.readings.get("governor")
        if g:
            gov.add(str(g))
    return (", ".join(sorted(gov)) or "not recorded (no cpufreq governor in sysfs, or results from an older edgeship)",
            "; ".join(sorted(set(temps))[:4]) or "no temperature sensor")


def _environment(runs: Sequence[DeviceRun]) -> str:
    parts = ["<h2>What was timed, and on what</h2>"]
    for run in runs:
        prof = run.profile
        dev = prof.device if prof else DeviceInfo()
        results = prof.results if prof else ()
        inputs = sorted({r.input.describe() for r in results if r.input is not None} - {""})
        threads = sorted({str(r.threads) for r in results if r.threads is not None})
        gov, temps = _telemetry_text(results)
        cfg = prof.config if prof else None
        loop = (f"{cfg.warmup} warm-up then at least {cfg.runs} runs and {cfg.min_seconds:g} s" if cfg else "unknown")
        items = [("device", f"{dev.cpu_model or '?'} ({dev.arch or '?'}, {dev.logical_cpus or '?'} logical CPUs)"
                  f"{', board ' + dev.board if dev.board else ''}"),
                 ("host / OS", f"{dev.hostname or '?'}, {dev.os or '?'}, Python {dev.python or '?'}"),
                 ("timed input", "; ".join(inputs) or "not recorded"), ("timing loop", loop),
                 ("threads", ", ".join(threads) or "runtime default"), ("CPU governor", gov),
                 ("temperature", temps), ("runtimes", json.dumps(dict(dev.runtimes)) if dev.runtimes else "-"),
                 ("when", f"{prof.created_utc if prof else '?'} by edgeship {prof.edgeship_version if prof else '?'}")]
        warn = (f'<p class="warn">EMULATED by {esc(dev.emulated)}: these timings are the emulator\'s, not the device\'s.'
                "</p>" if dev.emulated else "") + (f'<p class="warn wrap">{esc(run.error)}</p>' if run.error else "")
        dl = "".join(f"<dt><b>{esc(k)}</b></dt><dd class=wrap>{esc(v)}</dd>" for k, v in items)
        parts.append(f"<h3 class=wrap>{esc(run.name)}</h3>{warn}<dl>{dl}</dl>")
    return "".join(parts)


def _errors_block(runs: Sequence[DeviceRun]) -> str:
    """Every failed artifact's whole error, below the table (the table's notes cell is cut to fit)."""
    many = len(runs) > 1
    items = [f"<li><b>{esc(f'{run.name}: ' if many else '')}{esc(r.artifact)}</b>: "
             f"<code>{esc(' '.join((r.error or 'failed with no message').split()))}</code></li>"
             for run in runs if run.profile for r in run.profile.results if r.failed]
    return f"<h2>Errors</h2><ul class=warn>{''.join(items)}</ul>" if items else ""


def render_html(runs: Sequence[DeviceRun], decision: Decision | None = None, extra: Sequence[str] = ()) -> str:
    """The report page for these runs (and the budget decision over them, when there is one).

    ``extra``: further HTML sections (a sweep's latency-energy curve, predictions) placed after the charts."""
    es = entries(runs, decision.rows if decision else None)
    groups = _by_device(es)
    many = len(groups) > 1
    parts = ['<!doctype html><html lang="en"><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width,initial-scale=1">',
             "<title>edgeship report</title>", f"<style>{_CSS}</style>", "<main><h1>edgeship report</h1>",
             _decision_block(es, decision, many), _main_table(es, decision), _errors_block(runs),
             "<h2>Latency distributions</h2>"]
    parts.append('<div class="grid">' + "".join(_latency_cdf(d, g, many) for d, g in groups.items()) + "</div>")
    parts.append("<h2>Latency, fidelity and size</h2>")
    parts.append('<div class="grid">' + "".join(_pareto(d, g, many) for d, g in groups.items()) + "</div>")
    parts.append("<h2>Memory and energy</h2>")
    parts.append('<div class="grid">' + "".join(_memory_energy(d, g, many) for d, g in groups.items()) + "</div>")
    if any(e.row.setting for e in es):
        parts.append("<h2>Threads and cores</h2>" + _notes(runs))
        parts.append('<div class="grid">' + "".join(_sweep(d, g, many) for d, g in groups.items()) + "</div>")
    parts += list(extra)
    if many:
        parts.append(_side_by_side(groups))
    parts.append(_intervals(es))
    parts.append(_user_inputs(runs))
    parts.append(_environment(runs))
    parts.append("<p>Latencies come from raw perf_counter_ns samples after warm-up. Energy marked (est.) is a model "
                 "(power model x CPU time), not a measurement.</p></main></html>")
    return "\n".join(p for p in parts if p)


def write_html(runs: Sequence[DeviceRun], path: Path, decision: Decision | None = None,
               extra: Sequence[str] = ()) -> Path:
    from edgeship.profiling.runner import write_json_atomic  # any text, written atomically

    write_json_atomic(path, render_html(runs, decision, extra))
    return path
