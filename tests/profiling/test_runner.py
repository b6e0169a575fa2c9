"""The torch-free runner: bundles and bare files, metrics, and the bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError, InputError, UnknownKeyError
from edgeship.profiling.report import render
from edgeship.profiling.runner import ProfileResult, RunConfig, profile

FAST = {"runs": 5, "min_seconds": 0.0, "warmup": 1, "progress": False, "energy": "estimate"}
LATENCY_KEYS = {"count", "mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms", "throughput_per_s"}


def test_profile_bundle_fills_every_field(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    res = profile(tiny_onnx_bundle, json_path=tmp_path / "r.json", **FAST)
    assert res.ok and res.target == "raspberry-pi-5" and len(res.results) == 2
    for r in res.results:
        assert r.ok and r.torch_free is True and r.latency is not None and r.memory is not None
        assert set(r.to_dict()["latency"]) == LATENCY_KEYS and r.latency.count == len(r.samples_ns) >= 5
        assert r.latency.min_ms <= r.latency.p50_ms <= r.latency.p99_ms <= r.latency.max_ms
        assert r.load_seconds and r.load_seconds > 0 and r.first_inference_ms and r.first_inference_ms > 0
        assert r.memory.peak_rss_mb >= r.memory.rss_after_load_mb > 0
        split = r.memory.resident_at_end  # onnxruntime's library pages are most of a tiny model's runner
        assert split is not None and split.libraries_mb > 5 and split.anon_mb > 5 and split.artifact_mb >= 0
        assert split.total_mb <= r.memory.peak_rss_mb + 0.5
        assert f"{r.artifact}: peak RSS {r.memory.peak_rss_mb:.0f} MB; at the end {split.total_mb:.0f} MB = " \
               f"{split.anon_mb:.0f} its own + {split.artifact_mb:.0f} mapped from the model file" in render(res)
        assert r.runtime["providers_used"] == ["CPUExecutionProvider"]
        assert r.fidelity is not None and r.fidelity.passed is True
        assert r.input is not None and r.input.real_tokens is not None
        with np.load(tiny_onnx_bundle / "samples/inputs.npz") as z:  # timed on held-out sample 0, as labelled
            assert r.input.real_tokens == int(z["attention_mask"][0].sum()) < r.input.shapes["attention_mask"][1]
        assert r.input.source == "bundle held-out sample 0"
        assert f"input: bundle held-out sample 0: input_ids 1x128, attention_mask 1x128 ({r.input.real_tokens} " \
               "real tokens)" in render(res)
        # held-out samples re-run here vs PyTorch's outputs
        assert r.device_check is not None and r.device_check.mean_cosine > 0.99
        e = r.energy
        assert e is not None and e.estimated is True and e.source == "estimate"
        assert e.joules_per_inference_gross is not None and e.joules_per_inference_gross > 0
    assert res.device.arch and res.device.cpu_model and "onnxruntime" in res.device.runtimes
    doc = json.loads((tmp_path / "r.json").read_text())
    assert set(doc["results"][0]["resident_at_end"]) == {"anon_mb", "artifact_mb", "libraries_mb", "other_files_mb"}
    assert ProfileResult.from_dict(doc) == res  # the file holds everything the call returned
    assert json.loads(ProfileResult.from_dict(doc).to_json()) == doc


def test_min_seconds_extends_the_run(tiny_onnx_bundle: Path) -> None:
    res = profile(tiny_onnx_bundle, artifact="onnx/int8-dynamic", **{**FAST, "runs": 1, "min_seconds": 0.3})
    (r,) = res.results
    assert r.measured_seconds and r.measured_seconds >= 0.3 and r.latency and r.latency.count > 1


def test_bare_onnx_file_with_shapes(tiny_onnx_bundle: Path) -> None:
    f = tiny_onnx_bundle / "onnx/fp32.onnx"
    res = profile(f, shapes={"input_ids": (1, 16), "attention_mask": (1, 16)}, **FAST)
    (r,) = res.results
    assert r.ok and r.input and r.input.shapes == {"input_ids": (1, 16), "attention_mask": (1, 16)}
    assert str(r.input.source).startswith("synthesized")
    # an unbound dynamic dim is an error that says how to bind it
    res = profile(f, **FAST)
    assert res.results[0].status == "error" and "--shape input_ids=" in str(res.results[0].error)


def test_corrupt_and_truncated_onnx(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    data = (tiny_onnx_bundle / "onnx/fp32.onnx").read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 3])
    res = profile(bad, **FAST)
    assert res.results[0].status == "error" and "corrupt, truncated" in str(res.results[0].error)
    from edgeship.profiling import backends

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactLoadError, match="cannot load it"):
        backends.load(junk)
    with pytest.raises(ArtifactLoadError, match="unknown model file type"):
        backends.load(tmp_path.joinpath("m.xyz").resolve() if (tmp_path / "m.xyz").write_text("x") else junk)


def test_wrong_input_shape_and_dtype(tiny_onnx_bundle: Path) -> None:
    from edgeship.profiling import backends

    b = backends.load(tiny_onnx_bundle / "onnx/fp32.onnx")
    with pytest.raises(InputError, match="dtype int32"):
        b.adapt_feeds({"input_ids": np.ones((1, 8), np.int32), "attention_mask": np.ones((1, 8), np.int64)})
    with pytest.raises(InputError, match="shape"):
        b.adapt_feeds({"input_ids": np.ones((8,), np.int64), "attention_mask": np.ones((1, 8), np.int64)})


def test_unknown_artifact_and_bad_config(tiny_onnx_bundle: Path) -> None:
    with pytest.raises(UnknownKeyError, match="onnx/int8-dynamic"):
        profile(tiny_onnx_bundle, artifact="onnx/int9", **FAST)
    with pytest.raises(ValueError, match="--runs"):
        RunConfig(runs=0)


def test_cli_profile_with_torch_unimportable(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    """The whole device path (CLI -> runner -> worker -> onnxruntime) runs where torch cannot be imported."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgeship.cli import main\n"
            f"rc = main(['profile', {str(tiny_onnx_bundle)!r}, '--runs', '3', '--min-seconds', '0', '--quiet',"
            f" '--json', {str(tmp_path / 'r.json')!r}, '--no-isolate'])\n"
            "assert 'torch' in sys.modules and sys.modules['torch'] is None\n"
            "sys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "onnx/int8-dynamic" in proc.stdout and "mJ/inf" in proc.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert all(r["status"] == "ok" for r in doc["results"])


def test_profile_packed_zip(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    from edgeship.bundle import pack

    z = pack(tiny_onnx_bundle, tmp_path / "b.zip")
    res = profile(z, artifact="onnx/fp32", **FAST)
    assert res.ok and res.results[0].artifact == "onnx/fp32" and res.target == "raspberry-pi-5"


def test_peak_rss_is_the_workers_own(tiny_onnx_bundle: Path) -> None:
    """Trap: Linux keeps ru_maxrss across execve, so a worker forked from a big parent inherited its peak."""
    before = profile(tiny_onnx_bundle, artifact="onnx/fp32", **FAST).results[0].memory
    assert before is not None
    baseline = before.peak_rss_mb
    ballast = np.ones(400 * 2**20 // 8)  # 400 MB resident in the parent
    res = profile(tiny_onnx_bundle, artifact="onnx/fp32", **FAST)
    assert ballast.sum() > 0
    m = res.results[0].memory
    assert m is not None
    # Relative to the same worker without the ballast, not an absolute MB figure the machine's libraries decide:
    # an inherited peak would add the whole 400 MB.
    assert m.peak_rss_mb < baseline + 200, (m.peak_rss_mb, baseline)
    assert m.peak_rss_mb >= m.rss_after_load_mb


def test_runtime_options_apply_per_format(tiny_onnx_bundle: Path) -> None:
    from edgeship.errors import ConfigError

    res = profile(tiny_onnx_bundle, artifact="onnx/fp32", options={"delegate": "/nonexistent/libdelegate.so"}, **FAST)
    r = res.results[0]
    assert r.ok and "option delegate does not apply to onnx artifacts (ignored)" in r.warnings
    res = profile(tiny_onnx_bundle, artifact="onnx/fp32", options={"graph_optimization": "all"}, **FAST)
    assert res.results[0].runtime["graph_optimization"] == "all"
    with pytest.raises(ConfigError, match="unknown runtime option.*bogus"):
        profile(tiny_onnx_bundle, options={"bogus": "1"}, **FAST)


def test_progress_bar_redraws_on_a_terminal_and_logs_lines_otherwise() -> None:
    import io

    from edgeship.profiling.progress import Progress, bar

    assert bar(0.0) == "[--------------------]   0%" and bar(0.4) == "[########------------]  40%"
    assert bar(1.7) == bar(1.0) == "[####################] 100%"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Tty(), io.StringIO()
    for stream in (tty, log):
        p = Progress("onnx/fp32", stream=stream, every_s=0.0)
        p.update(f"{bar(0.5)} run 5")
        p.done("10 runs")
    assert tty.getvalue() == "[onnx/fp32] [##########----------]  50% run 5\x1b[K\r[onnx/fp32] 10 runs\x1b[K\n"
    assert log.getvalue() == "[onnx/fp32] 10 runs\n"  # a log gets a line per 5 s, and the last one
