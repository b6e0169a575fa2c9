"""--repeat K: K fresh processes per artifact, interleaved; the median p50 with its bootstrap interval, and a pick
that says when it cannot be told apart from the runner-up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ConfigError
from edgeship.profiling.decide import Budget, decide, render, rows_of, spreads
from edgeship.profiling.results import ArtifactResult, DeviceInfo, DeviceRun, ProfileResult, RunConfig, Status
from edgeship.profiling.runner import profile
from edgeship.profiling.stats import LatencyStats, median_interval


def test_median_interval() -> None:
    assert median_interval([3.0]) == (3.0, 3.0, 3.0)
    assert median_interval([2.0] * 5) == (2.0, 2.0, 2.0)
    med, lo, hi = median_interval([1.0, 1.1, 0.9, 1.05, 0.95, 3.0])
    assert lo <= med <= hi and med == pytest.approx(1.025) and hi < 3.0  # the median shrugs off one slow run
    assert median_interval([1.0, 2.0, 3.0]) == median_interval([1.0, 2.0, 3.0])  # seeded: the same every time
    with pytest.raises(ValueError):
        median_interval([])


def test_repeat_is_bounded() -> None:
    with pytest.raises(ConfigError, match="--repeat must be between 1 and 100"):
        RunConfig(repeat=0)


def _runs(p50s: dict[str, list[float]]) -> list[DeviceRun]:
    """Repeated results as the runner writes them (round by round), from given p50s in ms."""
    results = []
    k = len(next(iter(p50s.values())))
    for i in range(k):
        for name, vals in p50s.items():
            ns = np.full(20, int(vals[i] * 1e6), dtype=np.int64)
            results.append(ArtifactResult(artifact=name, status=Status.OK, format="onnx", recipe=name.split("/")[1],
                                          size_bytes=1000, latency=LatencyStats.from_ns(list(ns)), repeat_index=i))
    return [DeviceRun(ProfileResult.new(DeviceInfo(hostname="h"), RunConfig(repeat=k), results, source="b", target=None))]


def test_overlapping_intervals_are_called_indistinguishable() -> None:
    runs = _runs({"onnx/fp32": [1.00, 1.04, 0.97, 1.02, 0.99], "onnx/int8": [1.01, 0.98, 1.03, 1.00, 0.96]})
    d = decide(runs, Budget())
    assert d.pick is not None and d.versus is not None and d.versus.startswith("indistinguishable from")
    assert "95% intervals overlap" in render(d)


def test_separated_intervals_name_the_faster() -> None:
    runs = _runs({"onnx/fp32": [2.0, 2.1, 1.9, 2.05, 1.95], "onnx/int8": [1.0, 1.02, 0.99, 1.01, 0.98]})
    d = decide(runs, Budget())
    assert d.pick is not None and d.pick.artifact == "onnx/int8"
    assert d.versus is not None and d.versus.startswith("ahead of onnx/fp32")
    sp = spreads(rows_of(runs), "latency")
    assert {s.runs for s in sp.values()} == {5}


def test_single_runs_keep_the_plain_pick() -> None:
    d = decide(_runs({"onnx/fp32": [2.0], "onnx/int8": [1.0]}), Budget())
    assert d.pick is not None and d.pick.artifact == "onnx/int8" and d.versus is None


def test_profile_repeat_interleaves_fresh_processes(tiny_onnx_bundle: Path) -> None:
    res = profile(tiny_onnx_bundle, repeat=2, runs=3, min_seconds=0, warmup=1, energy="off", idle_seconds=0,
                  progress=False)
    order = [(r.artifact, r.repeat_index) for r in res.results]
    arts = list(dict.fromkeys(a for a, _ in order))
    assert order == [(a, k) for k in range(2) for a in arts]  # round by round, not one artifact's runs together
    assert all(r.ok for r in res.results)
    back = ProfileResult.from_dict(res.to_dict())
    assert [r.repeat_index for r in back.results] == [k for k in range(2) for _ in arts]
    assert back.config.repeat == 2
