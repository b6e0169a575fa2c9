"""Pick the artifact that meets a latency / memory / accuracy / energy budget.

Reads one or more results documents (a single ``edgeship profile --json`` result, or a
fleet document ``{"runs": [...]}``), puts every (device, artifact) side by side and keeps
the ones inside the budget. Emulated measurements are never picked for latency or energy
budgets: they do not describe the device.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError
from edgeship.profiling.report import _fmt, table
from edgeship.profiling.results import ArtifactResult, DeviceRun, FleetResult, ProfileResult

OBJECTIVES = ("latency", "energy", "size", "memory")


@dataclass(frozen=True)
class Budget:
    max_p99_ms: float | None = None
    max_p50_ms: float | None = None
    max_peak_mb: float | None = None
    min_cosine: float | None = None
    max_mj: float | None = None
    max_size_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Row:
    device: str
    artifact: str
    format: str | None
    recipe: str | None
    size_mb: float
    mean_cosine: float | None
    p50_ms: float | None
    p99_ms: float | None
    peak_mb: float | None
    mj_per_inference: float | None
    energy_estimated: bool
    emulated: str | None
    ok: bool
    error: str | None = None
    setting: str | None = None  # a sweep's configuration ("threads=2 cores=big"): the pick is (artifact, setting)

    @property
    def name(self) -> str:
        """The artifact, with its sweep configuration when there is one."""
        return f"{self.artifact} [{self.setting}]" if self.setting else self.artifact

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def cells(self) -> list[str]:
        """MB, cosine, p50, p99, peak MB and mJ as every table shows them."""
        est = self.energy_estimated and self.mj_per_inference is not None
        mj = _fmt(self.mj_per_inference, ".2f") + (" (est)" if est else "")
        return [_fmt(self.size_mb, ".1f"), _fmt(self.mean_cosine, ".4f"), _fmt(self.p50_ms, ".2f"),
                _fmt(self.p99_ms, ".2f"), _fmt(self.peak_mb, ".0f"), mj]


def load_documents(paths: Iterable[str | Path]) -> list[DeviceRun]:
    """The runs in results files: a single ``edgeship profile --json`` result or a fleet document."""
    runs: list[DeviceRun] = []
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"results file not found: {p}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not JSON ({e})") from None
        if isinstance(doc, dict) and "runs" in doc:
            runs.extend(FleetResult.from_dict(doc).runs)
        elif isinstance(doc, dict) and "results" in doc:
            runs.append(DeviceRun(ProfileResult.from_dict(doc)))
        else:
            raise ConfigError(f"{p}: not an edgeship results file (no 'results' or 'runs')")
    return runs


def _mj(r: ArtifactResult) -> float | None:
    e = r.energy
    if e is None or not e.available:
        return None
    j = e.joules_per_inference_net if e.joules_per_inference_net is not None else e.joules_per_inference_gross
    return None if j is None else j * 1000


def rows_of(runs: Sequence[DeviceRun]) -> list[Row]:
    out = []
    for run in runs:
        if run.profile is None:
            continue
        emulated = run.profile.device.emulated
        for r in run.profile.results:
            if not r.ok and not r.failed:  # an NPU job on a host without the NPU: nothing measured, nothing failed
                continue
            out.append(Row(
                device=run.name, artifact=r.artifact, format=r.format, recipe=r.recipe,
                size_mb=float(r.size_bytes or 0) / 2**20, mean_cosine=r.fidelity.mean_cosine if r.fidelity else None,
                p50_ms=r.latency.p50_ms if r.latency else None, p99_ms=r.latency.p99_ms if r.latency else None,
                peak_mb=r.peak_rss_mb, mj_per_inference=_mj(r), energy_estimated=bool(r.energy and r.energy.estimated),
                emulated=emulated, ok=r.ok, error=r.error, setting=r.setting,
            ))
    return out


def violations(row: Row, b: Budget) -> list[str]:
    if not row.ok:
        return [f"failed: {row.error}"]
    v = []
    timing_budget = any(x is not None for x in (b.max_p50_ms, b.max_p99_ms, b.max_mj))
    if row.emulated and timing_budget:
        v.append(f"emulated ({row.emulated}): timings are not the device's")
    checks = [("p99", row.p99_ms, b.max_p99_ms, "ms", True), ("p50", row.p50_ms, b.max_p50_ms, "ms", True),
              ("peak RSS", row.peak_mb, b.max_peak_mb, "MB", True), ("energy", row.mj_per_inference, b.max_mj, "mJ", True),
              ("size", row.size_mb, b.max_size_mb, "MB", True), ("cosine", row.mean_cosine, b.min_cosine, "", False)]
    for name, val, lim, unit, is_max in checks:
        if lim is None:
            continue
        if val is None:
            v.append(f"{name} not measured")
        elif (val > lim) if is_max else (val < lim):
            v.append(f"{name} {val:.4g}{unit} {'>' if is_max else '<'} {lim:g}{unit}")
    return v


def _key(row: Row, objective: str) -> float:
    val = {"latency": row.p50_ms, "energy": row.mj_per_inference, "size": row.size_mb, "memory": row.peak_mb}[objective]
    return float("inf") if val is None else float(val)


@dataclass(frozen=True)
class Spread:
    """One (device, artifact, setting) over repeated runs: the median objective and its 95% bootstrap interval."""

    name: str
    device: str
    runs: int
    median: float
    lo: float
    hi: float

    def describe(self) -> str:
        return f"{self.name}: median {self.median:.4g} [{self.lo:.4g}, {self.hi:.4g}] over {self.runs} runs"


@dataclass(frozen=True)
class Decision:
    budget: Budget
    objective: str
    rows: tuple[Row, ...]
    verdicts: tuple[tuple[str, ...], ...]  # per row: the budget violations (empty = inside the budget)
    pick: Row | None
    # under repeated runs: is the pick really ahead of the runner-up, or are their intervals overlapping?
    versus: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.to_dict(), "objective": self.objective,
                "pick": self.pick.to_dict() if self.pick else None, "versus": self.versus,
                "rows": [{**r.to_dict(), "violations": list(v)} for r, v in zip(self.rows, self.verdicts, strict=True)]}


def spreads(rows: Sequence[Row], objective: str) -> dict[tuple[str, str], Spread]:
    """Rows of the same (device, artifact [setting]) are repeated runs: their median and 95% interval."""
    from edgeship.profiling.stats import median_interval

    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        v = _key(r, objective)
        if r.ok and v != float("inf"):
            groups.setdefault((r.device, r.name), []).append(v)
    return {k: Spread(k[1], k[0], len(v), *median_interval(v)) for k, v in groups.items()}


def decide(runs: Sequence[DeviceRun], budget: Budget, objective: str = "latency") -> Decision:
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective '{objective}'; use one of {', '.join(OBJECTIVES)}")
    rows = rows_of(runs)
    if not rows:
        raise ConfigError("the results hold no measured artifacts")
    verdicts = tuple(tuple(violations(r, budget)) for r in rows)
    inside = [r for r, v in zip(rows, verdicts, strict=True) if not v]
    sp = spreads(rows, objective)
    if not inside or max((s.runs for s in sp.values()), default=1) < 2:
        pick = min(inside, key=lambda r: (_key(r, objective), -(r.mean_cosine or 0))) if inside else None
        return Decision(budget, objective, tuple(rows), verdicts, pick)
    # repeated runs: rank (device, artifact) by the median over its runs; the pick is its run nearest the median
    ranked = sorted({(r.device, r.name) for r in inside}, key=lambda k: sp[k].median if k in sp else float("inf"))
    best = sp.get(ranked[0])
    pick = min((r for r in inside if (r.device, r.name) == ranked[0]),
               key=lambda r: abs(_key(r, objective) - (best.median if best else 0.0)))
    versus = None
    if best and len(ranked) > 1 and ranked[1] in sp:
        other = sp[ranked[1]]
        overlap = best.hi >= other.lo
        versus = (f"{'indistinguishable from' if overlap else 'ahead of'} {other.name} on {objective} "
                  f"({'95% intervals overlap' if overlap else 'no overlap of 95% intervals'}): "
                  f"{best.describe()}; {other.describe()}")
    return Decision(budget, objective, tuple(rows), verdicts, pick, versus)


def render(d: Decision) -> str:
    body = []
    for r, v in zip(d.rows, d.verdicts, strict=True):
        mark = "PICK" if r is d.pick else ("ok" if not v else "no")
        body.append([mark, r.device[:28], r.name, *r.cells(), "; ".join(v)[:90]])
    lines = [table(body, ["", "device", "artifact", "MB", "cosine", "p50 ms", "p99 ms", "peak MB", "mJ/inf", "why not"])]
    budget = ", ".join(f"{k}={v:g}" for k, v in d.budget.to_dict().items()) or "none"
    if d.pick:
        lines.append(f"budget: {budget}; objective: lowest {d.objective}. Pick: {d.pick.name} on {d.pick.device}")
        if d.versus:
            lines.append(f"the pick is {d.versus}")
    else:
        lines.append(f"budget: {budget}: no artifact meets it; relax the budget or export another recipe")
    return "\n".join(lines)
