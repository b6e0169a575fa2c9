"""Shared checks for the profiling tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edgeship.profiling.results import ArtifactResult

LATENCY_KEYS = {"count", "mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "throughput_per_s"}


def check_measured(r: ArtifactResult, runs: int) -> None:
    """Every latency and memory field of one profiled artifact is there and sane."""
    assert r.ok, r.error
    lat, mem = r.latency, r.memory
    assert lat is not None and mem is not None
    assert set(r.to_dict()["latency"]) == LATENCY_KEYS and lat.count == len(r.samples_ns) >= runs
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
    assert lat.min_ms <= lat.mean_ms <= lat.max_ms and lat.std_ms >= 0 and lat.throughput_per_s > 0
    assert (r.load_seconds or 0) > 0 and (r.first_inference_ms or 0) > 0 and (r.measured_seconds or 0) > 0
    assert mem.peak_rss_mb >= mem.rss_after_load_mb > 0 and mem.rss_before_load_mb > 0
    split = mem.resident_at_end  # what the memory was made of at the end, the model loaded (Linux: always there)
    assert split is not None and 0 < split.total_mb <= mem.peak_rss_mb + 0.5 and split.anon_mb > 0
    assert (r.size_bytes or 0) > 0 and r.output_shapes and r.input is not None and r.input.shapes


@pytest.fixture
def measured() -> Callable[[ArtifactResult, int], None]:
    return check_measured
