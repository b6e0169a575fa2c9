"""The HTML report in real headless Chromium, at a phone's width (390 px) and a desktop's (1300 px).

Rendered from real results files (the tiny bundle profiled on this machine); the DOM is checked for what a
person needs (every artifact, the pick marked, text alternatives, keyboard reach) and for layout faults a
string search cannot see (overlapping chart labels, anything wider than the viewport); no request may leave
the page. Screenshots land in test-artifacts/browser/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeship.profiling import charts
from edgeship.profiling.decide import Budget, decide, load_documents
from edgeship.profiling.html import write_html
from edgeship.profiling.results import DeviceRun, FleetResult

pytestmark = pytest.mark.browser
WIDTHS = (390, 1300)

# Label boxes per chart that intersect another label (by more than half a pixel each way).
OVERLAPS = """[...document.querySelectorAll('svg')].flatMap(svg => {
  const r = [...svg.querySelectorAll('text.label')].map(t => [t.textContent, t.getBoundingClientRect()]);
  const out = [];
  for (let i = 0; i < r.length; i++) for (let j = i + 1; j < r.length; j++) {
    const a = r[i][1], b = r[j][1];
    if (Math.min(a.right, b.right) - Math.max(a.left, b.left) > 0.5 &&
        Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top) > 0.5) out.push(r[i][0] + ' / ' + r[j][0]);
  }
  return out;
})"""
# Elements sticking out of a W px viewport (off-screen hidden ones, right edge <= 0, excepted). W, not innerWidth:
# a phone browser widens its layout viewport to fit a too-wide page.
TOO_WIDE = """((W) => [...document.body.querySelectorAll('*')].filter(e => {
  const r = e.getBoundingClientRect();
  return r.width > 0 && r.right > 0 && (r.right > W + 0.5 || r.left < -0.5);
}).map(e => e.tagName + ' ' + (typeof e.className === 'string' ? e.className : '') + ' ' + e.textContent.slice(0, 40))
  .concat(document.documentElement.scrollWidth > W || innerWidth > W ? ['page wider than the screen'] : []))"""
LABELS_OUTSIDE_CHART = """[...document.querySelectorAll('svg')].flatMap(svg => {
  const s = svg.getBoundingClientRect();
  return [...svg.querySelectorAll('text')].filter(t => { const r = t.getBoundingClientRect();
    return r.width > 0 && (r.left < s.left - 0.5 || r.right > s.right + 0.5); }).map(t => t.textContent);
})"""
CHART_ALTS = """[...document.querySelectorAll('svg')].map(s => [s.getAttribute('role'),
  (s.querySelector('title') || {}).textContent || '', (s.querySelector('desc') || {}).textContent || ''])"""


def _check_page(browser: Any, page: Path, width: int, shots: Path, name: str) -> dict[str, Any]:
    browser.open(page.as_uri(), width)
    assert browser.eval("document.querySelector('h1').textContent") == "edgeship report"  # the page, not an error page
    assert browser.eval(OVERLAPS) == []
    assert browser.eval(f"{TOO_WIDE}({width})") == []
    assert browser.eval(LABELS_OUTSIDE_CHART) == []
    alts = browser.eval(CHART_ALTS)
    assert alts and all(role == "img" and title and len(desc) > 20 for role, title, desc in alts)
    assert browser.requests() == [page.as_uri()]  # nothing fetched: no CDN, no font, no script
    shot = browser.screenshot(shots / f"{name}-{width}.png")
    assert shot.stat().st_size > 10_000
    return {"text": browser.eval("document.body.innerText"),
            "pick": browser.eval("[...document.querySelectorAll('tr.pick')].map(r => r.innerText)")}


def _tab_stops(browser: Any, n: int) -> list[str]:
    """What Tab reaches, in order: the focused element's aria-label (or tag) after each press."""
    stops = []
    for _ in range(n):
        for kind in ("rawKeyDown", "keyUp"):
            browser.page("Input.dispatchKeyEvent", type=kind, key="Tab", code="Tab", windowsVirtualKeyCode=9)
        stops.append(browser.eval("document.activeElement.getAttribute('aria-label') || document.activeElement.tagName"))
    return stops


@pytest.mark.parametrize("width", WIDTHS)
def test_single_device_report_with_a_pick(browser: Any, profiled: dict[str, Path], shots_dir: Path, tmp_path: Path,
                                          width: int) -> None:
    runs = load_documents([profiled["a"]])
    d = decide(runs, Budget(min_cosine=0.9, max_p99_ms=1000))
    assert d.pick is not None
    page = write_html(runs, tmp_path / "report.html", d)
    got = _check_page(browser, page, width, shots_dir, "single", )
    for r in d.rows:
        assert r.artifact in got["text"]
    assert len(got["pick"]) == 1 and d.pick.artifact in got["pick"][0] and "PICK" in got["pick"][0]
    assert got["text"].index("Pick: ") < got["text"].index("Every artifact measured")  # the decision first
    assert "Why the others lost" in got["text"] and "(est" in got["text"] and "ESTIMATES" in got["text"]
    assert "timed input" in got["text"] and "bundle held-out sample 0" in got["text"]
    stops = _tab_stops(browser, 3)
    assert "Every artifact measured" in stops  # the table region takes keyboard focus (arrow keys scroll it)


@pytest.mark.parametrize("width", WIDTHS)
def test_fleet_and_repeated_runs(browser: Any, profiled: dict[str, Path], shots_dir: Path, tmp_path: Path,
                                 width: int) -> None:
    """Two settings of this machine as two fleet entries side by side, and a repeated run's spread."""
    docs = {k: json.loads(p.read_text()) for k, p in profiled.items()}
    fleet = FleetResult((DeviceRun.from_dict({**docs["a"], "device_url": "this-host-default-threads"}),
                         DeviceRun.from_dict({**docs["t1"], "device_url": "this-host-1-thread"})))
    f = tmp_path / "fleet.json"
    f.write_text(fleet.to_json())
    runs = load_documents([f])
    page = write_html(runs, tmp_path / "fleet.html", decide(runs, Budget(max_p99_ms=1000), "energy"))
    got = _check_page(browser, page, width, shots_dir, "fleet")
    assert "Devices side by side" in got["text"]
    assert "this-host-default-threads" in got["text"] and "this-host-1-thread" in got["text"]
    runs = load_documents([profiled["a"], profiled["b"]])
    page = write_html(runs, tmp_path / "repeated.html")
    got = _check_page(browser, page, width, shots_dir, "repeated")
    assert "Between repeated runs" in got["text"] and "(run 2)" in got["text"]


@pytest.mark.parametrize("width", WIDTHS)
def test_coincident_points_get_separate_labels(browser: Any, shots_dir: Path, tmp_path: Path, width: int) -> None:
    """Three fp32 artifacts of one model share size and fidelity (the case that printed labels on top of each
    other): each label gets its own box, and the x axis has several ticks."""
    pts = [charts.Point(f"{fmt}/fp32 (86 MB)", 10.0 + i * 0.01, 1.0) for i, fmt in enumerate(("onnx", "tflite", "pte"))]
    pts += [charts.Point("onnx/int8-dynamic (22 MB)", 5.0, 0.994), charts.Point("tflite/int8 (22 MB)", 5.2, 0.993)]
    svg = charts.scatter("t", "five points, three on top of each other", pts, "p50 latency, ms", "mean cosine")
    page = tmp_path / "chart.html"
    page.write_text('<!doctype html><meta name="viewport" content="width=device-width,initial-scale=1">'
                    f"<h1>edgeship report</h1><style>svg{{width:100%;max-width:600px}}</style>{svg}")
    _check_page(browser, page, width, shots_dir, "coincident")
    assert browser.eval("document.querySelectorAll('text.label').length") == 5
    assert browser.eval("document.querySelectorAll('text.tick').length") >= 6


@pytest.mark.parametrize("width", WIDTHS)
def test_sweep_report_with_the_energy_pick(browser: Any, swept: Path, shots_dir: Path, tmp_path: Path,
                                           width: int) -> None:
    runs = load_documents([swept])
    d = decide(runs, Budget(max_p99_ms=1000), "energy")
    assert d.pick is not None and d.pick.setting is not None
    page = write_html(runs, tmp_path / "sweep.html", d)
    got = _check_page(browser, page, width, shots_dir, "sweep")
    assert "Latency vs energy per setting" in got["text"] and "ESTIMATED" in got["text"]
    assert "cores=big skipped" in got["text"]
    assert len(got["pick"]) == 1 and d.pick.setting in got["pick"][0]
    assert browser.eval("document.querySelectorAll('text.label').length") >= 4  # every setting's point is named


@pytest.mark.needs_export  # predict reads the graph with the onnx package
@pytest.mark.parametrize("width", WIDTHS)
def test_predictions_next_to_measured(browser: Any, profiled: dict[str, Path], tiny_onnx_bundle: Path,
                                      shots_dir: Path, tmp_path: Path, width: int) -> None:
    from edgeship.cli import main

    vm = Path(__file__).parents[2] / "benchmarks" / "data" / "build-vm.toml"
    pred, page = tmp_path / "pred.json", tmp_path / "pred.html"
    assert main(["predict", str(tiny_onnx_bundle), "--target", str(vm), "--fit", str(profiled["a"]),
                 "--fit-profile", str(vm), "--json", str(pred)]) == 0
    assert main(["report", str(profiled["a"]), "--html", str(page), "--predictions", str(pred)]) == 0
    got = _check_page(browser, page, width, shots_dir, "predicted")
    assert "Predicted vs measured p50" in got["text"] and "PREDICTIONS, not measurements" in got["text"]
    assert got["text"].count("(PREDICTED)") == 2
