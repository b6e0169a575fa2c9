"""Run one job in a fresh Python process: ``python -m MODULE JOB.json RESULT.json``.

The parent side of edgeship's isolated workers (the profiler's per-artifact worker, the LLM profiler's, the LLM
export's device-like fidelity check): the job goes in as JSON, the child writes its result as JSON, and a crash or
a timeout is told apart from a result. Kept out of :mod:`edgeship.profiling.worker`, which a child imports and which
stays free of ``subprocess`` and ``tempfile`` (its own RSS is measured).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ChildRun:
    result: dict[str, Any] | None  # what the child wrote; None when it wrote nothing (crashed, or timed out)
    returncode: int | None  # None: killed at the timeout
    stderr: str = ""  # only with capture=True


def run_module(module: str, job: dict[str, Any], timeout: float, *, pass_fds: Sequence[int] = (),
               capture: bool = False, prefix: str = "edgeship-job-") -> ChildRun:
    """Run ``python -m module JOB.json RESULT.json`` on ``job``; ``capture`` keeps the child's stderr (else it
    shares ours)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as td:
        jpath, rpath = Path(td, "job.json"), Path(td, "result.json")
        jpath.write_text(json.dumps(job), encoding="utf-8")
        try:
            proc = subprocess.run([sys.executable, "-m", module, str(jpath), str(rpath)], stdin=subprocess.DEVNULL,
                                  timeout=timeout, check=False, pass_fds=tuple(pass_fds),
                                  stderr=subprocess.PIPE if capture else None, text=True)
        except subprocess.TimeoutExpired:
            return ChildRun(None, None)
        result = json.loads(rpath.read_text(encoding="utf-8")) if rpath.is_file() else None
        return ChildRun(result, proc.returncode, proc.stderr or "")


__all__ = ["ChildRun", "run_module"]
