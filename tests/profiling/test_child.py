"""The parent side of edgeship's isolated workers: a result, a crash and a timeout are told apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.profiling.child import run_module

CHILD = """import json, sys, time
job = json.load(open(sys.argv[1]))
if job["do"] == "sleep":
    time.sleep(60)
if job["do"] == "crash":
    sys.exit("the runtime fell over")
json.dump({"echo": job["value"]}, open(sys.argv[2], "w"))
"""


@pytest.fixture
def child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "es_test_child.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "es_test_child"


def test_result_comes_back(child: str) -> None:
    run = run_module(child, {"do": "echo", "value": [1, "two"]}, 60)
    assert run.result == {"echo": [1, "two"]} and run.returncode == 0


def test_crash_is_no_result_with_its_exit_code_and_stderr(child: str) -> None:
    run = run_module(child, {"do": "crash"}, 60, capture=True)
    assert run.result is None and run.returncode == 1 and "the runtime fell over" in run.stderr


def test_timeout_is_no_result_and_no_exit_code(child: str) -> None:
    run = run_module(child, {"do": "sleep"}, 1)
    assert run.result is None and run.returncode is None
