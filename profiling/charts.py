"""Inline SVG charts for the HTML report: no JavaScript, no plotting library, nothing fetched.

Every chart is an ``<svg role="img">`` with a ``<title>`` and a ``<desc>`` that says in words what the chart
shows (the text alternative), a ``viewBox`` so that it scales down to a phone's width, and axes with real
ticks (1-2-5 steps, or decades on a log axis). Point labels are placed so that their boxes do not overlap:
the label widths are estimated from the character count (``_CHAR_W``), which the browser tests check against
the rendered boxes.
"""

from __future__ import annotations

import html
import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

COLORS = ("#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377", "#555555", "#994455", "#117733")
FONT = 13  # px in viewBox units; a 600-wide chart on a 390 px phone still shows ~8.5 px text
_CHAR_W = 0.62  # average glyph width / font size of system-ui sans, generous so estimated boxes cover real ones
_W = 600


def esc(x: object) -> str:
    return html.escape(str(x))


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def text_width(s: str, size: float = FONT) -> float:
    return len(s) * size * _CHAR_W


# --- axes ---------------------------------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k steps) covering [lo, hi]."""
    if not hi > lo:
        lo, hi = (lo - 1, hi + 1) if lo == 0 else (lo - abs(lo) * 0.1, hi + abs(hi) * 0.1)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks per decade covering [lo, hi] (lo > 0), thinned to at most ~7."""
    d0, d1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for mults in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0 ** d for d in range(d0, d1 + 1) for m in mults]
        first = max([t for t in ticks if t <= lo], default=ticks[0])
        last = min([t for t in ticks if t >= hi], default=ticks[-1])
        ticks = [t for t in ticks if first <= t <= last]
        if len(ticks) <= 7:
            return ticks
    return ticks


def tick_label(v: float, ticks: Sequence[float]) -> str:
    """Enough decimals to tell neighbouring ticks apart, no more."""
    step = min((abs(b - a) for a, b in itertools.pairwise(ticks) if b != a), default=abs(v) or 1.0)
    if step >= 1 and abs(v) < 1e6:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:g}"
    decimals = min(8, max(0, -math.floor(math.log10(step)) + (0 if _round_step(step) else 1)))
    return f"{v:.{decimals}f}"


def _round_step(step: float) -> bool:
    mant = step / 10 ** math.floor(math.log10(step))
    return abs(mant - round(mant)) < 1e-6


@dataclass(frozen=True)
class Axis:
    """A value -> pixel map with its ticks."""

    lo: float
    hi: float
    p0: float  # pixel of lo
    p1: float  # pixel of hi
    log: bool = False
    tick_values: tuple[float, ...] = ()  # from fit(): recomputing from lo/hi could pick another step

    @classmethod
    def fit(cls, values: Sequence[float], p0: float, p1: float, log: bool | None = None, pad: float = 0.05) -> Axis:
        lo, hi = min(values), max(values)
        if log is None:  # a log axis only where the spread needs it
            log = lo > 0 and hi / lo > 8
        if log:
            ticks = log_ticks(lo, hi)
            return cls(ticks[0], ticks[-1], p0, p1, True, tuple(ticks))
        span = (hi - lo) or abs(hi) or 1.0
        ticks = nice_ticks(lo - span * pad, hi + span * pad)
        return cls(ticks[0], ticks[-1], p0, p1, False, tuple(ticks))

    def ticks(self) -> list[float]:
        if self.tick_values:
            return list(self.tick_values)
        eps = (self.hi - self.lo) * 1e-6
        ticks = log_ticks(self.lo, self.hi) if self.log else nice_ticks(self.lo, self.hi)
        return [t for t in ticks if self.lo - eps <= t <= self.hi + eps]

    def __call__(self, v: float) -> float:
        if self.log:
            f = (math.log10(max(v, 1e-300)) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            f = (v - self.lo) / ((self.hi - self.lo) or 1.0)
        return self.p0 + f * (self.p1 - self.p0)


def _axes(x: Axis, y: Axis, xlab: str, ylab: str, top: float, bottom: float, left: float, right: float) -> list[str]:
    out = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#fff" stroke="#bbb"/>']
    xt, yt = x.ticks(), y.ticks()
    for v in xt:
        px = x(v)
        out.append(f'<line x1="{px:.1f}" y1="{top}" x2="{px:.1f}" y2="{bottom + 4}" stroke="#e4e4e4"/>'
                   f'<text class="tick" x="{px:.1f}" y="{bottom + 18}" text-anchor="middle">{esc(tick_label(v, xt))}'
                   "</text>")
    for v in yt:
        py = y(v)
        out.append(f'<line x1="{left - 4}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#e4e4e4"/>'
                   f'<text class="tick" x="{left - 7}" y="{py + 4:.1f}" text-anchor="end">{esc(tick_label(v, yt))}</text>')
    out.append(f'<text x="{(left + right) / 2:.0f}" y="{bottom + 38}" text-anchor="middle">{esc(xlab)}'
               f'{" (log scale)" if x.log else ""}</text>')
    out.append(f'<text x="{left}" y="{top - 8}" text-anchor="start">{esc(ylab)}{" (log scale)" if y.log else ""}</text>')
    return out


def _open(title: str, desc: str, h: float, cls: str = "chart") -> str:
    return (f'<svg class="{cls}" viewBox="0 0 {_W} {h:.0f}" role="img" aria-label="{esc(title)}" '
            f'font-size="{FONT}"><title>{esc(title)}</title><desc>{esc(desc)}</desc>')


# --- label placement ----------------------------------------------------------------------------------------------

Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _hit(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(points: Sequence[tuple[float, float, str]], bounds: Box, avoid: Sequence[Box] = ()
                 ) -> list[tuple[float, float, str, bool]]:
    """(x, y, anchor, leader) for each label of a point at (px, py): the first candidate position whose box
    stays inside ``bounds`` and overlaps no placed label (nor ``avoid``). Coincident points get labels stacked
    one line apart with a leader line back to the point."""
    placed: list[Box] = list(avoid)
    out: list[tuple[float, float, str, bool]] = []
    line = FONT + 3
    for px, py, label in points:
        w = text_width(label)
        cands: list[tuple[float, float, str, bool]] = [
            (px + 8, py + 4, "start", False), (px - 8, py + 4, "end", False),
            (px - w / 2, py - 10, "start", False), (px - w / 2, py + 20, "start", False)]
        for k in range(1, 12):
            for sign in (-1, 1):
                dy = sign * k * line
                cands += [(px + 14, py + 4 + dy, "start", True), (px - 14, py + 4 + dy, "end", True)]
        best = None
        for cx, cy, anchor, leader in cands:
            x0 = cx if anchor == "start" else cx - w
            box = (x0 - 1, cy - FONT + 1, x0 + w + 1, cy + 4)
            inside = box[0] >= bounds[0] and box[2] <= bounds[2] and box[1] >= bounds[1] and box[3] <= bounds[3]
            if inside and not any(_hit(box, b) for b in placed):
                best = (cx, cy, anchor, leader, box)
                break
        if best is None:  # nowhere free: the table below the chart still names it; keep it out of the way
            out.append((px, py, "hidden", False))
            continue
        placed.append(best[4])
        out.append(best[:4])
    return out


# --- charts -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    radius: float = 5.0
    front: bool = True  # on the Pareto front: filled; dominated: hollow


def _labels(points: Sequence[tuple[float, float, str]], bounds: Box, avoid: Sequence[Box]) -> list[str]:
    """Each point's label where :func:`place_labels` puts it, with a leader line when moved away; hidden ones left out."""
    out = []
    for (px, py, lab), (lx, ly, anchor, leader) in zip(points, place_labels(points, bounds, avoid), strict=True):
        if anchor == "hidden":
            continue
        if leader:
            out.append(f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{lx:.1f}" y2="{ly - 4:.1f}" stroke="#999"/>')
        out.append(f'<text class="label" x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}">{esc(lab)}</text>')
    return out


def scatter(title: str, desc: str, pts: Sequence[Point], xlab: str, ylab: str, front_line: bool = False) -> str:
    """A labelled scatter; ``front_line`` joins the front points in x order (a step line for a Pareto front)."""
    if not pts:
        return ""
    h, top, left, right = 380.0, 34.0, 78.0, _W - 16.0
    bottom = h - 50
    x = Axis.fit([p.x for p in pts], left + 12, right - 12)
    y = Axis.fit([p.y for p in pts], bottom - 12, top + 12)
    out = [_open(title, desc, h), *_axes(x, y, xlab, ylab, top, bottom, left, right)]
    if front_line:
        fr = sorted((p for p in pts if p.front), key=lambda p: p.x)
        if len(fr) > 1:
            path = " ".join(f"{'M' if i == 0 else 'L'}{x(p.x):.1f},{y(p.y):.1f}" for i, p in enumerate(fr))
            out.append(f'<path d="{path}" fill="none" stroke="#228833" stroke-width="1.5" stroke-dasharray="5 3"/>')
    dots = [(x(p.x), y(p.y), p) for p in pts]
    avoid = [(px - p.radius, py - p.radius, px + p.radius, py + p.radius) for px, py, p in dots]
    order = sorted(range(len(dots)), key=lambda i: (dots[i][1], dots[i][0]))
    for i, (px, py, p) in enumerate(dots):
        fill = color(i) if p.front else "#fff"
        out.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{p.radius:.1f}" fill="{fill}" fill-opacity="0.8" '
                   f'stroke="{color(i)}" stroke-width="2"><title>{esc(p.label)}</title></circle>')
    out += _labels([(dots[i][0], dots[i][1], dots[i][2].label) for i in order], (left, top, right, bottom), avoid)
    out.append("</svg>")
    return "".join(out)


def cdf(title: str, desc: str, series: Sequence[tuple[str, Sequence[float]]], xlab: str) -> str:
    """Empirical CDF per series (fraction of runs at or below x), one colour each, log x where the spread needs
    it. The legend is HTML next to the chart (see the caller), so long names wrap instead of overflowing."""
    series = [(n, sorted(v)) for n, v in series if len(v)]
    if not series:
        return ""
    h, top, left, right = 300.0, 30.0, 60.0, _W - 16.0
    bottom = h - 50
    x = Axis.fit([v for _, s in series for v in (s[0], s[-1])], left + 6, right - 6, pad=0.02)
    y = Axis(0.0, 1.0, bottom, top)
    out = [_open(title, desc, h), *_axes(x, y, xlab, "fraction of runs at or below", top, bottom, left, right)]
    for i, (_, s) in enumerate(series):
        n = len(s)
        pts = [f"{x(s[0]):.1f},{y(0):.1f}"]
        for k, v in enumerate(s):
            pts += [f"{x(v):.1f},{y(k / n):.1f}", f"{x(v):.1f},{y((k + 1) / n):.1f}"]
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color(i)}" stroke-width="2"/>')
    out.append("</svg>")
    return "".join(out)


def hbars(title: str, desc: str, rows: Sequence[tuple[str, float | None, bool, str]], unit: str) -> str:
    """Horizontal bars (label, value, estimated, note); estimates are hatched and say "(est.)" in the value."""
    vals = [v for _, v, _, _ in rows if v is not None]
    if not vals:
        return ""
    bar, gap, top = 18.0, 8.0, 28.0
    label_w = min(230.0, max(text_width(r[0]) for r in rows) + 10)
    left, right = label_w + 6, _W - 110.0
    h = top + len(rows) * (bar + gap) + 34
    x = Axis(0.0, nice_ticks(0.0, max(vals))[-1], left, right)
    hatch = f"hatch-{zlib.crc32(title.encode()):08x}"  # one pattern id per chart: ids are page-wide
    out = [_open(title, desc, h),
           f'<defs><pattern id="{hatch}" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff"/>'
           '<rect width="3" height="6" fill="#aa7733"/></pattern></defs>']
    for t in x.ticks():
        out.append(f'<line x1="{x(t):.1f}" y1="{top - 4}" x2="{x(t):.1f}" y2="{h - 30}" stroke="#e4e4e4"/>'
                   f'<text class="tick" x="{x(t):.1f}" y="{h - 14}" text-anchor="middle">{esc(tick_label(t, x.ticks()))}'
                   "</text>")
    for i, (label, v, est, note) in enumerate(rows):
        y0 = top + i * (bar + gap)
        shown = label if text_width(label) <= label_w else label[: int(label_w / (FONT * _CHAR_W)) - 1] + "…"
        out.append(f'<text class="label" x="{left - 6}" y="{y0 + bar - 5}" text-anchor="end">{esc(shown)}'
                   f"<title>{esc(label)}</title></text>")
        if v is None:
            out.append(f'<text x="{left + 4}" y="{y0 + bar - 5}" fill="#777">{esc(note or "not measured")}</text>')
            continue
        w = max(1.0, x(v) - left)
        fill = f"url(#{hatch})" if est else color(0)
        out.append(f'<rect x="{left}" y="{y0}" width="{w:.1f}" height="{bar}" fill="{fill}" stroke="{color(0)}"/>'
                   f'<text x="{left + w + 4:.1f}" y="{y0 + bar - 5}">{v:.3g} {esc(unit)}{" (est.)" if est else ""}'
                   "</text>")
    out.append(f'<text x="{(left + right) / 2:.0f}" y="{h - 1}" text-anchor="middle" font-size="11">{esc(unit)}</text>')
    out.append("</svg>")
    return "".join(out)


def curve(title: str, desc: str, lines: Sequence[tuple[str, Sequence[tuple[float, float, str]]]], xlab: str,
          ylab: str) -> str:
    """One polyline per series through (x, y, point label) points, each point labelled (non-overlapping)."""
    allp = [(px, py) for _, s in lines for px, py, _ in s]
    if not allp:
        return ""
    h, top, left, right = 340.0, 34.0, 70.0, _W - 16.0
    bottom = h - 50
    x = Axis.fit([p[0] for p in allp], left + 12, right - 12)
    y = Axis.fit([p[1] for p in allp], bottom - 12, top + 12)
    out = [_open(title, desc, h), *_axes(x, y, xlab, ylab, top, bottom, left, right)]
    labels: list[tuple[float, float, str]] = []
    for i, (_, s) in enumerate(lines):
        pts = sorted(s)
        out.append(f'<polyline points="{" ".join(f"{x(a):.1f},{y(b):.1f}" for a, b, _ in pts)}" fill="none" '
                   f'stroke="{color(i)}" stroke-width="2"/>')
        for a, b, lab in pts:
            out.append(f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="4" fill="{color(i)}"/>')
            labels.append((x(a), y(b), lab))
    out += _labels(labels, (left, top, right, bottom), [(px - 4, py - 4, px + 4, py + 4) for px, py, _ in labels])
    out.append("</svg>")
    return "".join(out)
