"""``edgeship report`` of LLM results files: every artifact side by side (TTFT per prompt length, prefill and decode
tokens/s, peak RSS, J/token with estimates marked) and the one that meets a budget. Torch-free.

The objectives an LLM is picked on differ from an encoder's: "latency" is the highest steady-state decode rate
(what a chat user waits on), "ttft" the lowest time to first token at the longest prompt timed, "memory" the lowest
peak RSS, "energy" the lowest J/token. An encoder budget's cosine and size limits have no LLM counterpart in a
results file (fidelity lives in the bundle: ``edgeship inspect``), so they are refused rather than ignored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError
from edgeship.profiling.llm.results import LLMArtifactResult, LLMProfileResult, llm_documents

# objective -> (what the pick line says, the value to maximise; None when the artifact lacks it)
OBJECTIVES: dict[str, tuple[str, Callable[[LLMArtifactResult], float | None]]] = {
    "latency": ("highest decode tok/s", lambda r: r.decode_tokens_per_s),
    "ttft": ("lowest TTFT at the longest prompt", lambda r: None if (t := _ttft(r)) is None else -t),
    "memory": ("lowest peak RSS", lambda r: None if r.peak_rss_mb is None else -r.peak_rss_mb),
    "energy": ("lowest J/token", lambda r: None if r.joules_per_token is None else -r.joules_per_token),
}


def _ttft(r: LLMArtifactResult) -> float | None:
    longest = max(r.prompts, key=lambda p: p.prompt_tokens, default=None)
    return None if longest is None else longest.ttft_ms


@dataclass(frozen=True)
class LLMBudget:
    max_peak_mb: float | None = None
    max_mj_per_token: float | None = None
    max_ttft_ms: float | None = None  # at the longest prompt timed
    max_p50_ms: float | None = None  # per generated token
    max_p99_ms: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def misses(self, r: LLMArtifactResult) -> list[str]:
        """Why ``r`` does not meet the budget (empty: it does). A limit on something not measured is a miss."""
        mj = None if r.joules_per_token is None else r.joules_per_token * 1e3
        p50, p99 = (r.decode_token_ms.p50_ms, r.decode_token_ms.p99_ms) if r.decode_token_ms else (None, None)
        checks = [("peak RSS", r.peak_rss_mb, self.max_peak_mb, " MB"), ("mJ/token", mj, self.max_mj_per_token, ""),
                  ("TTFT", _ttft(r), self.max_ttft_ms, " ms"),
                  ("p50/token", p50, self.max_p50_ms, " ms"), ("p99/token", p99, self.max_p99_ms, " ms")]
        out = []
        for name, value, limit, unit in checks:
            if limit is None:
                continue
            if value is None:
                out.append(f"{name} not measured")
            elif value > limit:
                out.append(f"{name} {value:.3g}{unit} > {limit:g}{unit}")
        return out


@dataclass(frozen=True)
class LLMDecision:
    rows: tuple[tuple[str, LLMArtifactResult], ...]  # (label, result)
    verdicts: tuple[tuple[str, ...], ...]
    pick: int | None  # index into rows
    budget: LLMBudget
    objective: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "llm", "objective": self.objective, "budget": self.budget.to_dict(),
                "pick": None if self.pick is None else self.rows[self.pick][0],
                "rows": [{"artifact": label, "why_not": list(v), **_summary(r)}
                         for (label, r), v in zip(self.rows, self.verdicts, strict=True)]}


def _summary(r: LLMArtifactResult) -> dict[str, Any]:
    return {"status": r.status, "error": r.error, "decode_tokens_per_s": r.decode_tokens_per_s,
            "ttft_ms": {str(p.prompt_tokens): p.ttft_ms for p in r.prompts}, "peak_rss_mb": r.peak_rss_mb,
            "joules_per_token": r.joules_per_token, "energy_estimated": r.energy_estimated}


def is_llm_document(d: Any) -> bool:
    return isinstance(d, dict) and d.get("kind") == "llm"


def load_llm_documents(paths: Iterable[str | Path]) -> list[tuple[str, LLMProfileResult]]:
    out = []
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"results file not found: {p}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: cannot read it as JSON ({e})") from None
        if not is_llm_document(doc):
            raise ConfigError(f"{p}: not an LLM results file from edgeship profile --json of an LLM bundle")
        out += [(str(p), res) for res in llm_documents(doc)]  # a fleet's file holds one profile per device
    return out


def labelled(docs: Sequence[tuple[str, LLMProfileResult]]) -> list[tuple[str, LLMArtifactResult]]:
    """Each artifact with a label that stays unique across files: the device when they differ, else the file."""
    hosts = {res.device_name for _, res in docs}
    rows = []
    for path, res in docs:
        for r in res.results:
            if len(docs) == 1:
                label = r.artifact
            elif len(hosts) > 1:
                label = f"{r.artifact} on {res.device_name}"
            else:
                label = f"{r.artifact} ({Path(path).stem})"
            rows.append((label, r))
    return rows


def decide_llm(docs: Sequence[tuple[str, LLMProfileResult]], budget: LLMBudget, objective: str) -> LLMDecision:
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective {objective!r} for LLM results: choose one of {', '.join(OBJECTIVES)}")
    _, value = OBJECTIVES[objective]
    rows = labelled(docs)
    verdicts: list[tuple[str, ...]] = []
    for _, r in rows:
        if r.status != "ok":
            verdicts.append(("not measured: " + (r.error or r.status),))
            continue
        v = budget.misses(r)
        if value(r) is None:
            v.append(f"no {objective} measurement")
        verdicts.append(tuple(v))
    fits = [i for i, v in enumerate(verdicts) if not v]
    pick = max(fits, key=lambda i: value(rows[i][1]) or 0.0, default=None)
    return LLMDecision(tuple(rows), tuple(verdicts), pick, budget, objective)


def _cells(r: LLMArtifactResult) -> list[str]:
    if r.status != "ok":
        return ["-"] * 6
    j = "-" if r.joules_per_token is None else (f"{r.joules_per_token * 1e3:.2f}"
                                                + (" (est.)" if r.energy_estimated else ""))
    p50 = r.decode_token_ms.p50_ms if r.decode_token_ms else None
    return [", ".join(f"{p.ttft_ms:.3g}@{p.prompt_tokens}" for p in r.prompts) or "-",
            ", ".join(f"{p.prefill_tokens_per_s:.0f}" for p in r.prompts) or "-",
            "-" if r.decode_tokens_per_s is None else f"{r.decode_tokens_per_s:.1f}",
            "-" if p50 is None else f"{p50:.3g}", "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}", j]


def render_llm_decision(d: LLMDecision) -> str:
    from edgeship.profiling.report import table

    body = []
    for i, ((label, r), v) in enumerate(zip(d.rows, d.verdicts, strict=True)):
        mark = "PICK" if i == d.pick else ("ok" if not v else "no")
        body.append([mark, label, *_cells(r), "; ".join(v)[:90]])
    lines = [table(body, ["", "artifact", "TTFT ms@tokens", "prefill tok/s", "decode tok/s", "ms/token p50",
                          "peak RSS MB", "mJ/token", "why not"])]
    budget = ", ".join(f"{k}={v:g}" for k, v in d.budget.to_dict().items()) or "none"
    if d.pick is not None:
        lines.append(f"budget: {budget}; objective: {OBJECTIVES[d.objective][0]}. Pick: {d.rows[d.pick][0]}")
    else:
        lines.append(f"budget: {budget}: no artifact meets it; relax the budget or export another recipe")
    if any(r.status == "ok" and r.energy_estimated for _, r in d.rows):
        lines.append("mJ/token marked (est.) is an ESTIMATE from the target power model, not a measurement")
    return "\n".join(lines)


def merged(docs: Sequence[tuple[str, LLMProfileResult]]) -> LLMProfileResult:
    """One document for the HTML page: the first file's device and config, every artifact under its label."""
    first = docs[0][1]
    if len(docs) == 1:
        return first
    results = tuple(dataclasses.replace(r, artifact=label) for label, r in labelled(docs))
    return dataclasses.replace(first, results=results)
