"""Terminal tables for profile results (JSON is ``ProfileResult.to_json``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _fmt(v: float | None, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def _numeric(cell: object) -> bool:
    text = str(cell).split(" ")[0]
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    right = [bool(rows) and all(_numeric(r[i]) for r in rows) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if r else str(c).ljust(w) for c, w, r in zip(cells, widths, right, strict=True))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def energy_cell(e: Mapping[str, Any] | None) -> str:
    if not e or not e.get("available"):
        return "n/a"
    j = e.get("joules_per_inference_net")
    if j is None:
        j = e.get("joules_per_inference_gross")
    if j is None:
        return "n/a"
    return f"{j * 1000:.2f}{' (est)' if e.get('estimated') else ''}"


def result_rows(results: Sequence[Mapping[str, Any]], device: str | None = None) -> list[list[str]]:
    rows = []
    for r in results:
        fid = r.get("fidelity") or {}
        lat = r.get("latency") or {}
        name = r.get("artifact", "?") if device is None else f"{device}:{r.get('artifact', '?')}"
        if r.get("status") != "ok":
            rows.append([name, _fmt((r.get("size_bytes") or 0) / 2**20, ".1f"), "-", "-", "-", "-", "-", "-",
                         f"ERROR: {str(r.get('error', ''))[:60]}"])
            continue
        rows.append([
            name,
            _fmt(r.get("size_bytes", 0) / 2**20, ".1f"),
            _fmt(fid.get("mean_cosine"), ".4f"),
            _fmt(lat.get("p50_ms"), ".2f"),
            _fmt(lat.get("p90_ms"), ".2f"),
            _fmt(lat.get("p99_ms"), ".2f"),
            _fmt(r.get("peak_rss_mb"), ".0f"),
            energy_cell(r.get("energy")),
            ", ".join(_notes(r)),
        ])
    return rows


HEADER = ["artifact", "MB", "cosine", "p50 ms", "p90 ms", "p99 ms", "peak MB", "mJ/inf", "notes"]


def _notes(r: Mapping[str, Any]) -> list[str]:
    notes = []
    if r.get("emulated"):
        notes.append(f"EMULATED ({r['emulated']}): not device latency")
    tele = r.get("telemetry") or {}
    if tele.get("throttled"):
        notes.append("THROTTLED")
    if r.get("warnings"):
        notes.append(f"{len(r['warnings'])} warning(s)")
    return notes


def input_line(r: Mapping[str, Any]) -> str:
    """'bundle held-out sample 0, input_ids 1x128 (17 real tokens)': what the latency was measured on."""
    shapes = r.get("input_shapes") or {}
    if not shapes:
        return ""
    desc = ", ".join(f"{k} {'x'.join(str(d) for d in v)}" for k, v in shapes.items())
    if r.get("input_real_tokens") is not None:
        desc += f" ({r['input_real_tokens']} real tokens)"
    return f"{r['input_source']}: {desc}" if r.get("input_source") else desc


def render(result: Mapping[str, Any]) -> str:
    dev = result.get("device", {})
    emu = dev.get("emulated")
    head = f"device: {dev.get('cpu_model', '?')} ({dev.get('arch', '?')}, {dev.get('logical_cpus', '?')} CPUs)"
    if emu:
        head += f"  [EMULATED by {emu}: latency and energy are not the device's]"
    head += "".join(f"\ninput: {x}" for x in sorted({input_line(r) for r in result.get("results", [])} - {""}))
    rows = result_rows(result.get("results", []))
    if emu:
        for row in rows:
            row[-1] = ", ".join(x for x in (f"EMULATED ({emu})", row[-1]) if x)
    energy = [r.get("energy") or {} for r in result.get("results", [])]
    srcs = sorted({f"{e.get('source')}{' (estimated)' if e.get('estimated') else ''}" for e in energy if e})
    foot = f"energy: {', '.join(srcs) or 'n/a'}"
    reasons = sorted({e.get("reason", "") for e in energy if e.get("reason")})
    if reasons:
        foot += f" - {reasons[0]}"
    lines = [head, table(rows, HEADER), *detail_lines(result.get("results", [])), foot]
    lines += [f"  {r.get('artifact', '?')}: {energy_detail(r['energy'])}" for r in result.get("results", [])
              if (r.get("energy") or {}).get("available")]
    lines += [f"  {r.get('artifact', '?')}: {delegate_line(d)}" for r in result.get("results", [])
              if isinstance(d := (r.get("runtime") or {}).get("delegate"), dict)]
    for r in result.get("results", []):
        p = (r.get("runtime") or {}).get("per_op") or r.get("per_op")
        if isinstance(p, dict):
            lines.append(f"  {r.get('artifact', '?')}: {per_op_line(p)}")
    return "\n".join(lines)


def detail_lines(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """Below the table: each failed artifact's whole error (the table cell is cut to fit), and the runtime's
    notes on what it did with a file (no SignatureDef, anonymous dims, methods of a foreign .pte)."""
    lines = []
    for r in results:
        name = r.get("artifact", "?")
        if r.get("status") != "ok":
            lines.append(f"  {name}: ERROR: {one_line(r.get('error') or 'failed with no message')}")
        lines += [f"  {name}: note: {one_line(n)}" for n in (r.get("runtime") or {}).get("notes") or []]
    return lines


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def per_op_line(p: Mapping[str, Any], top: int = 5) -> str:
    """The slowest operators from a --per-op trace, or why there is none."""
    if not p.get("available"):
        return f"per-op: {p.get('note', 'not available')}"
    ops = ", ".join(f"{o['op']} ({o.get('kernel', '?')}) {o['mean_ms']:.3f} ms x{o.get('calls', 1)}"
                    for o in list(p.get("ops", []))[:top])
    share = p.get("delegate_share")
    lead = f"per-op ({'delegate ' + format(share, '.0%') + ' of time; ' if share is not None else ''}top {top}): "
    return lead + ops


def delegate_line(d: Mapping[str, Any]) -> str:
    """What an external delegate (--delegate PATH) took, or why it failed and what ran instead."""
    if d.get("loaded"):
        return f"delegate {d.get('note') or d.get('path')}"
    return f"delegate {d.get('path')} FAILED ({d.get('error')}); {d.get('ran_on', 'the CPU')} ran the model instead"


def energy_detail(e: Mapping[str, Any]) -> str:
    """Gross and net mJ/inference, average and idle watts: the figures behind the table's one energy cell."""
    text = f"gross {_fmt(_mj(e.get('joules_per_inference_gross')), '.2f')} mJ"
    if e.get("joules_per_inference_net") is not None:
        text += f", net {_fmt(_mj(e.get('joules_per_inference_net')), '.2f')} mJ"
    text += f", {_fmt(e.get('avg_watts'), '.2f')} W avg"
    if e.get("idle_watts") is not None:
        text += f" (idle {e['idle_watts']:.2f} W, {e.get('idle_source') or '?'})"
    if e.get("samples") and not e.get("estimated"):
        text += f", {e['samples']} samples"
    return text + (" [estimate]" if e.get("estimated") else "")


def _mj(j: float | None) -> float | None:
    return None if j is None else j * 1000
