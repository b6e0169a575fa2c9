"""Export lanes (``--jobs``): artifacts made in other processes give the same bundle; a lane's failure fails the
export with its own error type and publishes nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.errors import ConfigError, ExportError, FidelityError
from edgeship.targets import get_profile

pytestmark = pytest.mark.needs_export


def _artifacts(bundle: Path) -> list[tuple[str, str, float]]:
    m = json.loads((bundle / "manifest.json").read_text())
    return [(a["path"], a["sha256"], a["fidelity"]["mean_cosine"]) for a in m["artifacts"]]


def test_a_lane_makes_the_same_artifacts_in_the_same_order(tiny_bert_dir: Path, tiny_onnx_bundle: Path,
                                                           tmp_path: Path) -> None:
    import torch

    from edgeship.pipeline import export

    said: list[str] = []
    threads = torch.get_num_threads()
    res = export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "B", formats=["onnx"],
                 recipes=["fp32", "int8-dynamic"], jobs=2, log=said.append)
    assert _artifacts(res.bundle) == _artifacts(tiny_onnx_bundle)  # same bytes, same numbers, plan order
    assert any(m.startswith("[2/2] onnx/int8-dynamic: ") for m in said)  # the lane's lines reach our log
    assert torch.get_num_threads() == threads  # the lanes' share of the CPUs is given back


def test_a_failing_lane_fails_the_export_with_its_error_and_publishes_nothing(tiny_bert_dir: Path,
                                                                             tmp_path: Path) -> None:
    from edgeship.pipeline import export

    strict = dataclasses.replace(get_profile("raspberry-pi-5"), fidelity_floor={"default": 0.99, "int8-dynamic": 1.0})
    out = tmp_path / "B"
    with pytest.raises(FidelityError, match=r"onnx/int8-dynamic: mean cosine .* below the raspberry-pi-5 floor 1.0"):
        # this process makes onnx/fp32 (first in the queue), the lane onnx/int8-dynamic, which misses its floor
        export(tiny_bert_dir, target=strict, out=out, formats=["onnx"], recipes=["fp32", "int8-dynamic"], jobs=2,
               log=lambda m: None)
    assert not out.exists() and not list(tmp_path.glob(".B.partial-*"))


def test_a_module_in_this_process_is_made_here(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from edgeship.pipeline import export

    said: list[str] = []
    torch.manual_seed(0)
    export(torch.nn.Linear(8, 4), example_inputs={"x": np.ones((1, 8), np.float32)}, target="raspberry-pi-5",
           out=tmp_path / "B", formats=["onnx"], recipes=["fp32", "int8-dynamic"], jobs=2, log=said.append)
    assert any("made one after another" in m for m in said)


def test_lane_errors_keep_their_type() -> None:
    from edgeship.export_lanes import _raise

    with pytest.raises(FidelityError, match="too far"):
        _raise(("FidelityError", "too far"))
    with pytest.raises(ExportError, match="boom"):
        _raise(("ValueError", "boom"))  # not one of ours: an ExportError with the message


def test_jobs_flag_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path), "--target", "raspberry-pi-5", "-o", str(tmp_path / "B"), "--jobs", "0"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["edgeship: error: --jobs takes a whole number >= 1 or 'auto', got '0'"]
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        from edgeship.pipeline import export

        export(tmp_path, out=tmp_path / "B", jobs=0)


def test_auto_starts_a_lane_per_slow_recipe_up_to_the_idle_cpus() -> None:
    import os

    from edgeship.export_lanes import auto_jobs, idle_cpus
    from edgeship.exporters import EXPORTERS, load_builtin

    load_builtin()
    onnx, pte = EXPORTERS.get("onnx"), EXPORTERS.get("pte")
    assert 0.0 <= idle_cpus(0.05) <= (os.cpu_count() or 1) + 1e-9
    assert auto_jobs([(onnx, "fp32"), (onnx, "int8-dynamic")]) == 1  # nothing slow: no lane pays its start-up
    assert auto_jobs([(pte, "fp32"), (onnx, "fp32")]) == 1  # one slow item: nothing to overlap it with
    assert 1 <= auto_jobs([(pte, "fp32"), (pte, "int8-dynamic"), (onnx, "fp32")]) <= 2


def test_auto_counts_the_lanes_that_fit_in_memory(tmp_path: Path) -> None:
    """A lane loads torch, the exporters and the model again: on a small board with a big model a second process
    would swap. Files in /proc's own format (a Pi 4 with 1 GB free and a 700 MB export process)."""
    from edgeship.export_lanes import lanes_that_fit

    status, meminfo = tmp_path / "status", tmp_path / "meminfo"
    status.write_text("Name:\tpython\nVmPeak:\t 2100000 kB\nVmHWM:\t  716800 kB\nVmRSS:\t  650000 kB\n")
    meminfo.write_text("MemTotal:        3884200 kB\nMemFree:          512000 kB\nMemAvailable:    1048576 kB\n")
    assert lanes_that_fit(str(status), str(meminfo)) == 1  # 0.8 * 1024 MB / 700 MB
    meminfo.write_text("MemTotal:        3884200 kB\nMemAvailable:     524288 kB\n")
    assert lanes_that_fit(str(status), str(meminfo)) == 0
    assert lanes_that_fit(str(tmp_path / "missing"), str(meminfo)) > 8  # no /proc: no limit from memory
    assert lanes_that_fit() >= 0  # this machine's real files parse
