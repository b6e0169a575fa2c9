"""--soak N: N more inferences in the worker after the timed loop, with the process's RSS read along the way.

A leak of a few bytes per inference (a runtime caching something per call, a delegate that never frees
its scratch) is invisible in a 50-run profile and kills an app that embeds the model for a day. RSS is
read at ``points`` evenly spaced inference counts (plus once before the first), so the series has the
same length whatever N is. The growth figure ignores the first half of the series: allocators and
runtimes grow their arenas during the first calls and then level off, and that is no leak.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgeship.profiling.progress import Progress, bar
from edgeship.profiling.results import Soak

GROWTH_METHOD = "least-squares slope over the second half of the samples"
MIN_FIT_POINTS = 3  # a line through fewer points says nothing about a trend


def growth_per_1k(at_inference: Sequence[int], rss_mb: Sequence[float]) -> float | None:
    """RSS growth in MB per 1,000 inferences after warm-up (:data:`GROWTH_METHOD`); None with too few points."""
    half = len(at_inference) // 2
    x = np.asarray(at_inference[half:], dtype=np.float64)
    y = np.asarray(rss_mb[half:], dtype=np.float64)
    if len(x) < MIN_FIT_POINTS or np.ptp(x) == 0:
        return None
    slope = np.polyfit(x, y, 1)[0]  # MB per inference
    # a flat series fits to +-1e-15, not 0: round to a byte per 1,000 inferences (and -0.0 to 0.0)
    return round(float(slope * 1000.0), 6) + 0.0


def run_soak(model: Any, feeds: Mapping[str, np.ndarray], n: int, rss_mb: Callable[[], float], prog: Progress,
             points: int = 50) -> Soak:
    """``n`` inferences of ``model`` on ``feeds``, reading ``rss_mb()`` at ``points`` evenly spaced counts."""
    marks = sorted({max(1, round(n * k / points)) for k in range(1, points + 1)})
    at, secs, rss = [0], [0.0], [rss_mb()]
    start = time.perf_counter_ns()
    done = 0
    for mark in marks:
        while done < mark:
            model.run_timed(feeds)
            done += 1
        # read between inferences, never inside one: the series costs the run nothing but these reads
        at.append(done)
        secs.append((time.perf_counter_ns() - start) / 1e9)
        rss.append(rss_mb())
        prog.update(f"{bar(done / n)} soak {done}/{n} RSS {rss[-1]:.1f} MB")
    soak = Soak(inferences=n, at_inference=tuple(at), seconds=tuple(secs), rss_mb=tuple(rss),
                growth_mb_per_1k=growth_per_1k(at, rss), method=GROWTH_METHOD)
    prog.done(soak.describe())
    return soak
