"""Terminal tables for profile results (JSON is ``ProfileResult.to_json``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the table helpers are used by commands that never load a result
    from edgeship.profiling.energy import EnergyResult
    from edgeship.profiling.resident import Resident
    from edgeship.profiling.results import ArtifactResult, Memory, ProfileResult


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


def energy_cell(e: EnergyResult | None) -> str:
    if e is None or not e.available:
        return "n/a"
    j = e.joules_per_inference_net if e.joules_per_inference_net is not None else e.joules_per_inference_gross
    if j is None:
        return "n/a"
    return f"{j * 1000:.2f}{' (est)' if e.estimated else ''}"


def result_rows(results: Sequence[ArtifactResult], device: str | None = None) -> list[list[str]]:
    from edgeship.profiling.results import Status

    rows = []
    for r in results:
        label = f"{r.artifact} [{r.setting}]" if r.setting else r.artifact  # a sweep measures one artifact often
        name = label if device is None else f"{device}:{label}"
        if r.npu is not None and r.status in (Status.SKIPPED, Status.SIMULATED):  # no NPU here: no latency to show
            check = r.device_check
            rows.append([name, _fmt((r.size_bytes or 0) / 2**20, ".1f"), _fmt(check.mean_cosine if check else None, ".4f"),
                         "-", "-", "-", "-", "n/a", "SIMULATED: numerics only" if r.status == Status.SIMULATED
                         else "SKIPPED: no Hexagon NPU here"])
            continue
        if not r.ok:
            rows.append([name, _fmt((r.size_bytes or 0) / 2**20, ".1f"), "-", "-", "-", "-", "-", "-",
                         f"ERROR: {str(r.error or '')[:60]}"])
            continue
        lat = r.latency
        rows.append([
            name,
            _fmt((r.size_bytes or 0) / 2**20, ".1f"),
            _fmt(r.fidelity.mean_cosine if r.fidelity else None, ".4f"),
            _fmt(lat.p50_ms if lat else None, ".2f"),
            _fmt(lat.p90_ms if lat else None, ".2f"),
            _fmt(lat.p99_ms if lat else None, ".2f"),
            _fmt(r.peak_rss_mb, ".0f"),
            energy_cell(r.energy),
            ", ".join(_notes(r)),
        ])
    return rows


HEADER = ["artifact", "MB", "cosine", "p50 ms", "p90 ms", "p99 ms", "peak MB", "mJ/inf", "notes"]


def _notes(r: ArtifactResult) -> list[str]:
    notes = []
    if r.telemetry is not None and r.telemetry.throttled:
        notes.append("THROTTLED")
    if r.warnings:
        notes.append(f"{len(r.warnings)} warning(s)")
    return notes


def render(result: ProfileResult) -> str:
    dev = result.device
    emu = dev.emulated
    head = f"device: {dev.cpu_model or '?'} ({dev.arch or '?'}, {dev.logical_cpus or '?'} CPUs)"
    if emu:
        head += f"  [EMULATED by {emu}: latency and energy are not the device's]"
    inputs = {r.input.describe() for r in result.results if r.input is not None} - {""}
    head += "".join(f"\ninput: {x}" for x in sorted(inputs))
    rows = result_rows(result.results)
    if emu:
        for row in rows:
            row[-1] = ", ".join(x for x in (f"EMULATED ({emu})", row[-1]) if x)
    energy = [r.energy for r in result.results if r.energy is not None]
    srcs = sorted({f"{e.source}{' (estimated)' if e.estimated else ''}" for e in energy})
    foot = f"energy: {', '.join(srcs) or 'n/a'}"
    reasons = sorted({e.reason for e in energy if e.reason})
    if reasons:
        foot += f" - {reasons[0]}"
    lines = [head, table(rows, HEADER), *detail_lines(result.results), foot]
    lines += [f"  {r.artifact}{f' [{r.setting}]' if r.setting else ''}: {energy_detail(r.energy)}"
              for r in result.results if r.energy and r.energy.available]
    lines += [f"  {r.artifact}{f' [{r.setting}]' if r.setting else ''}: {memory_line(r.memory)}"
              for r in result.results if r.memory is not None and r.memory.resident_at_end is not None]
    lines += [f"  {r.artifact}: {delegate_line(r.delegate)}" for r in result.results if r.delegate is not None]
    lines += [f"  {r.artifact}: {npu_line(r)}" for r in result.results if r.npu is not None]
    lines += [f"  {r.artifact}{f' [{r.setting}]' if r.setting else ''}: {r.soak.describe()}"
              for r in result.results if r.soak is not None]
    lines += [f"  {r.artifact}: {per_op_line(p)}" for r in result.results if (p := r.per_op_trace) is not None]
    return "\n".join(lines + user_inputs_lines(result.results))


def memory_line(m: Memory) -> str:
    split = m.resident_at_end
    assert split is not None
    return f"peak RSS {m.peak_rss_mb:.0f} MB; at the end {resident_parts(split, 'its own', 'the model file')}"


def resident_parts(split: Resident, own: str, model: str) -> str:
    other = f" + {split.other_files_mb:.0f} of other files (a runtime's cache)" if split.other_files_mb >= 0.5 else ""
    return (f"{split.total_mb:.0f} MB = {split.anon_mb:.0f} {own} + {split.artifact_mb:.0f} mapped from {model} + "
            f"{split.libraries_mb:.0f} of shared libraries{other}")


def user_inputs_lines(results: Sequence[ArtifactResult]) -> list[str]:
    """--inputs: latency by input length per artifact, and the artifacts' agreement on those inputs."""
    rows = [[f"{r.artifact}{f' [{r.setting}]' if r.setting else ''}", b.label, str(b.inputs), str(b.runs),
             f"{b.p50_ms:.2f}", f"{b.p90_ms:.2f}"] for r in results if r.user_inputs for b in r.user_inputs.buckets]
    if not rows:
        return []
    names = sorted({r.user_inputs.describe() for r in results if r.user_inputs})
    lines = [f"latency by input length on {', '.join(names)}:",
             table(rows, ["artifact", "length", "inputs", "runs", "p50 ms", "p90 ms"])]
    held = next((r.user_inputs for r in results if r.user_inputs and r.user_inputs.prepared_mb is not None), None)
    if held is not None:
        lines.append(f"  peak MB includes the {held.count} prepared inputs ({held.prepared_mb:.1f} MB), held in memory for "
                     f"the round-robin{' with the tokenizer' if held.kind in ('txt', 'jsonl') else ''}")
    for r in results:
        u = r.user_inputs
        if u is None or (u.agreement is None and not u.agreement_note):
            continue
        a = u.agreement
        text = u.agreement_note or ""
        if a is not None:
            top1 = f", top-1 agreement {a.top1_agreement:.1%}" if a.top1_agreement is not None else ""
            text = f"mean cosine {a.mean_cosine:.4f}, min {a.min_cosine:.4f}{top1} ({text})"
        lines.append(f"  {r.artifact}: {text}")
    return lines


def npu_line(r: ArtifactResult) -> str:
    """A compiled NPU model's job: why it did not run, what the simulator said, or where it ran."""
    if r.npu is not None and r.npu.note:
        return r.npu.note
    if r.ok:
        return f"ran on {r.runtime.get('backend_ran', 'the NPU')}"
    return f"NPU job {r.status}: {r.error or (r.npu.presence if r.npu else '')}"


def detail_lines(results: Sequence[ArtifactResult]) -> list[str]:
    """Below the table: each failed artifact's whole error (the table cell is cut to fit), and the runtime's
    notes on what it did with a file (no SignatureDef, anonymous dims, methods of a foreign .pte)."""
    lines = []
    for r in results:
        if r.failed:
            lines.append(f"  {r.artifact}: ERROR: {one_line(r.error or 'failed with no message')}")
        lines += [f"  {r.artifact}: note: {one_line(n)}" for n in r.notes]
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


def energy_detail(e: EnergyResult) -> str:
    """Gross and net mJ/inference, average and idle watts: the figures behind the table's one energy cell."""
    text = f"gross {_fmt(_mj(e.joules_per_inference_gross), '.2f')} mJ"
    if e.joules_per_inference_net is not None:
        text += f", net {_fmt(_mj(e.joules_per_inference_net), '.2f')} mJ"
    text += f", {_fmt(e.avg_watts, '.2f')} W avg"
    if e.idle_watts is not None:
        text += f" (idle {e.idle_watts:.2f} W, {e.idle_source or '?'})"
    if e.samples and not e.estimated:
        text += f", {e.samples} samples"
    return text + (" [estimate]" if e.estimated else "")


def _mj(j: float | None) -> float | None:
    return None if j is None else j * 1000
