"""Headless Chromium (Debian's ``chromium``) for the report tests, and real results files to render."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeship.profiling.results import ProfileResult

ARTIFACTS_DIR = Path(os.environ.get("EDGESHIP_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))


def cdp_module() -> Any:
    spec = importlib.util.spec_from_file_location("edgeship_tests_cdp", Path(__file__).with_name("cdp.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def browser(unavailable: Callable[[str, str], None]) -> Iterator[Any]:
    cdp = cdp_module()
    exe = cdp.find_chromium()
    if exe is None:
        unavailable("browser", "needs headless Chromium: apt-get install chromium")
    b = cdp.Browser(str(exe))
    yield b
    b.close()


@pytest.fixture(scope="session")
def shots_dir() -> Path:
    """Screenshots are kept as test artifacts (gitignored) for a person to look at."""
    d = ARTIFACTS_DIR / "browser"
    d.mkdir(parents=True, exist_ok=True)
    return d


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
