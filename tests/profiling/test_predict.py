"""``edgeship predict``: roofline per operator from the exported graph, efficiency per runtime fitted on a
measured device, every number labelled a prediction with its fit error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.profiling.predict import GraphCost, OpCost, fit

pytestmark = pytest.mark.needs_export  # the onnx package reads the graph
BUILD_VM = Path(__file__).parents[2] / "benchmarks" / "data" / "build-vm.toml"


def test_roofline_takes_the_slower_of_compute_and_memory() -> None:
    g = GraphCost("a", "onnxruntime", (OpCost("MatMul", 2e9, 1e6, False), OpCost("Add", 1e3, 4e9, False),
                                       OpCost("MatMulInteger", 4e9, 1e6, True)), "a")
    # 2 GFLOP at 100 GFLOPS = 20 ms; 4 GB at 10 GB/s = 400 ms; 4 GOP at 400 GOPS = 10 ms
    assert g.roofline_ms(100.0, 400.0, 10.0) == pytest.approx(20 + 400 + 10, rel=1e-3)


def test_fit_is_the_geometric_mean_with_its_spread() -> None:
    pts = [("ort", "dev", "a", 1.0, 4.0), ("ort", "dev", "b", 1.0, 1.0), ("litert", "dev", "c", 2.0, 4.0)]
    f = fit(pts)
    assert f["ort"].efficiency == pytest.approx(0.5) and f["ort"].fit_error == pytest.approx(math.exp(math.log(2)))
    assert f["litert"].efficiency == pytest.approx(0.5) and f["litert"].fit_error == pytest.approx(1.0)


def test_predict_cli_on_a_measured_bundle(tiny_onnx_bundle: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    res = tmp_path / "r.json"
    assert main(["profile", str(tiny_onnx_bundle), "--runs", "30", "--min-seconds", "0", "--warmup", "3", "--quiet",
                 "--energy", "off", "--json", str(res)]) == 0
    capsys.readouterr()
    out_json, page = tmp_path / "p.json", tmp_path / "p.html"
    assert main(["predict", str(tiny_onnx_bundle), "--target", "raspberry-pi-5", "--fit", str(res), "--fit-profile",
                 str(BUILD_VM), "--json", str(out_json), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "PREDICTION for raspberry-pi-5" in out and "x/÷" in out
    doc = json.loads(out_json.read_text())
    preds = doc["predictions"]
    assert {p["artifact"] for p in preds} == {"onnx/fp32", "onnx/int8-dynamic"}
    for p in preds:
        assert p["kind"] == "prediction" and p["gflop"] > 0 and p["mbytes"] > 0 and p["roofline_ms"] > 0
        assert p["predicted_ms"] > p["roofline_ms"] and p["fit_error"] >= 1.0 and p["fit_points"] == 2
        assert p["measured_p50_ms"] is None  # nothing measured on a Pi here
    eff = doc["efficiency"]["onnxruntime"]
    assert 0 < eff["efficiency"] <= 1 and eff["n_points"] == 2  # no runtime beats the roofline
    assert "Predicted latency" in page.read_text() and "(PREDICTED)" in page.read_text()
    # the same device's own profile: predicted next to measured (the bundle packed, as an app ships it)
    from edgeship.bundle import pack

    assert main(["predict", str(pack(tiny_onnx_bundle, tmp_path / "b.zip")), "--target", str(BUILD_VM), "--fit", str(res), "--fit-profile",
                 str(BUILD_VM), "--json", str(out_json)]) == 0
    preds = json.loads(out_json.read_text())["predictions"]
    # how close it gets is benchmarks/bench_predict.py's business (timings are not unit-tested); here: both shown
    assert all(p["measured_p50_ms"] > 0 and p["predicted_ms"] > 0 for p in preds)
    assert main(["report", str(res), "--html", str(page), "--predictions", str(out_json)]) == 0
    assert "Predicted vs measured p50" in page.read_text()
