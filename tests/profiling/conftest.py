"""Shared checks for the profiling tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

LATENCY_KEYS = {"count", "mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "throughput_per_s"}


def check_measured(r: Mapping[str, Any], runs: int) -> None:
    """Every latency and memory field of one profiled artifact is there and sane."""
    assert r["status"] == "ok", r.get("error")
    lat = r["latency"]
    assert set(lat) == LATENCY_KEYS and lat["count"] == len(r["samples_ns"]) >= runs
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["min_ms"] <= lat["mean_ms"] <= lat["max_ms"] and lat["std_ms"] >= 0 and lat["throughput_per_s"] > 0
    assert r["load_seconds"] > 0 and r["first_inference_ms"] > 0 and r["measured_seconds"] > 0
    assert r["peak_rss_mb"] >= r["rss_after_load_mb"] > 0 and r["rss_before_load_mb"] > 0
    assert r["size_bytes"] > 0 and r["output_shapes"] and r["input_shapes"]


@pytest.fixture
def measured() -> Callable[[Mapping[str, Any], int], None]:
    return check_measured
