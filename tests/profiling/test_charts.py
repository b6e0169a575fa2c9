"""The report's SVG charts without a browser: ticks, label placement, the Pareto front."""

from __future__ import annotations

import re

import pytest

from edgeship.profiling import charts
from edgeship.profiling.html import Entry, pareto_front


@pytest.mark.parametrize(("lo", "hi"), [(94.8, 94.8), (0.99998, 1.0), (0.0, 86.0), (3.0, 3.4), (-2.0, 7.0)])
def test_ticks_cover_the_range_with_distinct_labels(lo: float, hi: float) -> None:
    ax = charts.Axis.fit([lo, hi], 0.0, 100.0, log=False)
    ticks = ax.ticks()
    assert len(ticks) >= 3 and ticks[0] <= lo and ticks[-1] >= hi
    labels = [charts.tick_label(t, ticks) for t in ticks]
    assert len(set(labels)) == len(labels), labels


def test_log_axis_where_the_spread_needs_it() -> None:
    ax = charts.Axis.fit([0.1, 40.0], 0.0, 100.0)
    assert ax.log and ax.ticks()[0] <= 0.1 and ax.ticks()[-1] >= 40 and len(ax.ticks()) <= 7
    assert not charts.Axis.fit([5.0, 6.0], 0.0, 100.0).log


def test_coincident_points_get_boxes_that_do_not_overlap() -> None:
    names = ["onnx/fp32 (86 MB)", "tflite/fp32 (86 MB)", "pte/fp32 (86 MB)"]
    spots = charts.place_labels([(300.0, 100.0, n) for n in names], (0.0, 0.0, 600.0, 300.0))
    boxes = []
    for (x, y, anchor, _), n in zip(spots, names, strict=True):
        assert anchor != "hidden"
        w = charts.text_width(n)
        x0 = x if anchor == "start" else x - w
        boxes.append((x0, y - charts.FONT, x0 + w, y))
    assert not any(charts._hit(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_scatter_has_title_desc_and_escapes() -> None:
    svg = charts.scatter("<t>", "d", [charts.Point("<b>", 1.0, 2.0)], "x", "y")
    assert "<title>&lt;t&gt;</title>" in svg and "<desc>d</desc>" in svg and "<b>" not in svg
    assert len(re.findall(r'class="tick"', svg)) >= 6


def _entry(name: str, p50: float, cos: float, mb: float) -> Entry:
    from edgeship.profiling.decide import Row
    from edgeship.profiling.results import ArtifactResult

    row = Row("d", name, None, None, mb, cos, p50, p50, None, None, False, None, True)
    return Entry(0, "d", row, ArtifactResult(artifact=name))


def test_pareto_front() -> None:
    es = [_entry("fp32", 10.0, 1.0, 86.0), _entry("int8", 5.0, 0.994, 22.0), _entry("int4", 6.0, 0.97, 14.0),
          _entry("worse", 7.0, 0.99, 30.0)]
    assert pareto_front(es) == {0, 1, 2}  # "worse" is slower, less faithful and bigger than int8
