"""Real results files for the report tests to render (the ``browser`` fixture is in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.profiling.results import ProfileResult


@pytest.fixture(scope="session")
def profiled(tiny_onnx_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real results files: the tiny bundle profiled on this machine twice at the default threads, once at 1."""
    from edgeship.profiling.runner import profile

    out = tmp_path_factory.mktemp("results")
    files = {}
    for name, threads in (("a", None), ("b", None), ("t1", 1)):
        res: ProfileResult = profile(tiny_onnx_bundle, runs=40, min_seconds=0.0, warmup=3, progress=False,
                                     energy="estimate", threads=threads, json_path=out / f"{name}.json")
        assert res.ok, [r.error for r in res.results]
        files[name] = out / f"{name}.json"
    return files


@pytest.fixture(scope="session")
def swept(tiny_onnx_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real --sweep threads=1,2 (cores=all; big is skipped on the one-cluster Pi 5 target) results file."""
    from edgeship.cli import main

    out = tmp_path_factory.mktemp("sweep") / "sweep.json"
    assert main(["profile", str(tiny_onnx_bundle), "--sweep", "threads=1,2", "--sweep", "cores=all,big", "--runs", "30",
                 "--min-seconds", "0", "--warmup", "2", "--energy", "estimate", "--idle-seconds", "0", "--quiet",
                 "--json", str(out)]) == 0
    return out
