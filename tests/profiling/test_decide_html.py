from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgeship.cli import main
from edgeship.errors import ConfigError
from edgeship.profiling.decide import Budget, decide, load_documents
from edgeship.profiling.html import render_html
from edgeship.profiling.results import DeviceRun, ProfileResult


def _run(device: str, emulated: str | None, arts: list[tuple[str, float, float, float, float]]) -> dict[str, Any]:
    """A results document as a file holds it; arts: (key, MB, cosine, p50 ms, mJ)."""
    def fid(cos: float) -> dict[str, Any]:
        return {"output": "y", "n_samples": 8, "max_abs_err": 0.1, "mean_abs_err": 0.01, "mean_cosine": cos,
                "min_cosine": cos, "top1_agreement": None, "floor_mean_cosine": 0.9, "passed": True}

    def lat(p50: float) -> dict[str, Any]:
        return {"count": 5, "mean_ms": p50, "std_ms": 0.0, "min_ms": p50, "p50_ms": p50, "p90_ms": p50 * 1.2,
                "p99_ms": p50 * 1.5, "max_ms": p50 * 1.5, "throughput_per_s": 1000 / p50}

    return {"schema_version": 1,
            "device": {"hostname": device, "cpu_model": device, "arch": "x86_64", "emulated": emulated},
            "results": [{"status": "ok", "artifact": k, "format": k.split("/")[0], "recipe": k.split("/")[1],
                         "size_bytes": int(mb * 2**20), "fidelity": fid(cos), "latency": lat(p50),
                         "peak_rss_mb": 100 + mb, "rss_before_load_mb": 50, "rss_after_load_mb": 90 + mb,
                         "energy": {"source": "estimate", "reason": "test", "available": True, "estimated": True,
                                    "joules_per_inference_net": mj / 1000}}
                        for k, mb, cos, p50, mj in arts]}


def _dev(device: str, emulated: str | None, arts: list[tuple[str, float, float, float, float]]) -> DeviceRun:
    return DeviceRun.from_dict(_run(device, emulated, arts))


ARTS = [("onnx/fp32", 86.0, 1.0, 10.0, 50.0), ("onnx/int8-dynamic", 22.0, 0.994, 5.0, 25.0),
        ("onnx/int4-weight", 14.0, 0.972, 6.0, 30.0)]


def test_budget_picks_fastest_inside() -> None:
    d = decide([_dev("laptop", None, ARTS)], Budget(min_cosine=0.99))
    assert d.pick is not None and d.pick.artifact == "onnx/int8-dynamic"
    d = decide([_dev("laptop", None, ARTS)], Budget(max_size_mb=15), objective="size")
    assert d.pick is not None and d.pick.artifact == "onnx/int4-weight"
    d = decide([_dev("laptop", None, ARTS)], Budget(max_p99_ms=1))
    assert d.pick is None and all("p99" in v[0] for v in d.verdicts)


def test_emulated_runs_never_win_on_timing() -> None:
    runs = [_dev("virtual-pi", "qemu-user", [("onnx/int8-dynamic", 22.0, 0.994, 0.1, 1.0)]), _dev("laptop", None, ARTS)]
    d = decide(runs, Budget(max_p50_ms=8))
    assert d.pick is not None and d.pick.device == "laptop"
    assert any("emulated" in v for vs in d.verdicts for v in vs)


def test_bad_documents(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_documents([tmp_path / "nope.json"])
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(ConfigError, match="not an edgeship results file"):
        load_documents([tmp_path / "x.json"])
    with pytest.raises(ConfigError, match="objective"):
        decide([_dev("l", None, ARTS)], Budget(), objective="beauty")


def test_cli_report_and_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"schema_version": 1, "runs": [_run("laptop", None, ARTS), _run("pi", "qemu-user", ARTS)]}))
    rc = main(["report", str(f), "--min-cosine", "0.99", "--max-p99-ms", "20", "--html", str(tmp_path / "r.html"),
               "--json", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "Pick: onnx/int8-dynamic on laptop" in out
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") >= 3 and "EMULATED" in page and "Pick: onnx/int8-dynamic" in page
    assert json.loads((tmp_path / "d.json").read_text())["pick"]["artifact"] == "onnx/int8-dynamic"
    assert main(["report", str(f), "--max-p99-ms", "0.001"]) == 1


def test_html_escapes_device_names() -> None:
    page = render_html([_dev("<script>x</script>", None, ARTS)])
    assert "<script>x" not in page and "&lt;script&gt;" in page


def test_report_shows_per_op_lines() -> None:
    from edgeship.profiling.report import per_op_line, render

    p = {"available": True, "delegate_share": 0.9, "ops": [{"op": "native_layer_norm", "kernel": "portable",
                                                            "calls": 13, "mean_ms": 0.5}]}
    assert per_op_line(p) == "per-op (delegate 90% of time; top 5): native_layer_norm (portable) 0.500 ms x13"
    assert "per-op: no tracer" in per_op_line({"available": False, "note": "no tracer"})
    run = _run("laptop", None, ARTS[:1])
    run["results"][0]["runtime"] = {"per_op": p}
    assert "native_layer_norm (portable)" in render(ProfileResult.from_dict(run))
