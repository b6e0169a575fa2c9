"""Export lanes: the artifacts of one export made side by side in processes (``edgeship export --jobs N``).

Lowering to ``.pte`` is mostly single-threaded Python (ExecuTorch's edge passes, then XNNPACK's passes once per
delegate partition): on all-MiniLM-L6-v2, ``pte/fp32`` and ``pte/int8-dynamic`` took 30 and 34 s of an 82 s
quickstart export that kept one core of two busy (wall 81.8 s, CPU 83.6 s). With ``jobs`` > 1 this process and
``jobs - 1`` spawned lanes pull (format, recipe) items from one queue, costliest first (``Exporter.relative_cost``).
A lane loads the model once and rebuilds the same calibration, held-out and reference data (:func:`prepare` is
deterministic), writes its artifact into the bundle's staging directory and hands back the manifest record and its
log lines. The records are kept in plan order, so the manifest lists the same artifacts in the same order as a
one-process export. A failing artifact stops the export as it would in one process: the lanes are terminated and
the bundle writer removes the staging directory, so nothing half-made is published.

Costs: each lane imports torch and the exporters and loads the model again (about 8 s and one more copy of the
model in memory), so lanes pay off when the plan holds more than one slow item (two ``.pte`` recipes). The
processes share the CPUs (:func:`share_cpus`: torch and the validating runtimes get CPUs / processes threads each;
without it the quickstart export in two lanes cost 102-117 CPU seconds against 75 in one). An ``nn.Module`` given
in Python exists in this process only: its artifacts are made one after another.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeship import errors
from edgeship.bundle import BundleWriter
from edgeship.errors import EdgeshipError, ExportError
from edgeship.export_steps import ExportRequest, Prepared, export_artifact, prepare
from edgeship.exporters import EXPORTERS, load_builtin
from edgeship.exporters.base import Exporter
from edgeship.manifest import ArtifactRecord

Say = Callable[[str], None]
_Outcome = tuple[int, ArtifactRecord | None, list[str], tuple[str, str] | None]  # index, record, log, (error, message)

_LANE: dict[str, Any] = {}  # in a lane process: its request and prepared inputs


def share_cpus(prep: Prepared, threads: int) -> None:
    """Give torch and the validating runtimes ``threads`` threads in this process.

    Every process of an export would otherwise run torch (calibration, the search's PyTorch side) and each
    runtime (validation) on all CPUs: on 2 CPUs two lanes ran 4 threads, and pte/int8-dynamic's quantize stage
    took 9-13 s in a lane against 1.8 s alone."""
    import torch

    torch.set_num_threads(threads)
    prep.final_check.threads = prep.evaluate.threads = threads


@contextlib.contextmanager
def cpus_shared(prep: Prepared, threads: int) -> Iterator[None]:
    """:func:`share_cpus` in this process for the block, then torch's count and the runtimes' default back."""
    import torch

    before = torch.get_num_threads()
    share_cpus(prep, threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        prep.final_check.threads = prep.evaluate.threads = None


def _lane_init(req: ExportRequest, threads: int) -> None:
    # never raise here: a Pool restarts a lane whose initializer fails, forever; the first item reports it instead
    try:
        load_builtin()
        _LANE["req"] = req
        # False: the missing-calibration warning is the parent's to give (it already did); the data is the same
        _LANE["prep"] = prepare(req, False, lambda m: None)
        share_cpus(_LANE["prep"], threads)
    except Exception as e:
        _LANE["error"] = (type(e).__name__ if isinstance(e, EdgeshipError) else "ExportError",
                          f"an export lane could not load the model again: {type(e).__name__}: {e}")


def _lane_run(index: int, fmt: str, recipe: str, staging: str, workdir: str, label: str) -> _Outcome:
    log: list[str] = []
    if "error" in _LANE:
        return index, None, log, _LANE["error"]
    try:
        wd = Path(workdir) / f"lane-{multiprocessing.current_process().pid}"
        wd.mkdir(parents=True, exist_ok=True)
        rec = export_artifact(_LANE["req"], _LANE["prep"], EXPORTERS.get(fmt), recipe, Path(staging), wd, label,
                              log.append)
        return index, rec, log, None
    except EdgeshipError as e:
        return index, None, log, (type(e).__name__, str(e))
    except Exception as e:  # an exporter's own failure type: the one-process path would show it the same way
        return index, None, log, ("ExportError", f"{fmt}/{recipe}: {type(e).__name__}: {e}")


def _raise(error: tuple[str, str]) -> None:
    """Raise a lane's error as its own EdgeshipError type where it takes one message, else as ExportError."""
    name, message = error
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, EdgeshipError):
        try:
            exc = cls(message)
        except TypeError:
            exc = ExportError(message)
        raise exc
    raise ExportError(message)


def auto_jobs(plan: Sequence[tuple[type[Exporter], str]]) -> int:
    """One process per slow item (the costliest kind in the plan, when there are several), up to the CPUs idle
    now and the copies of this process that fit in memory (:func:`lanes_that_fit`): on a busy machine a lane only
    adds its start-up cost (measured: a tiny model's onnx + pte export took 37 s in one process, 51 s in two at load
    3.5 on 2 CPUs)."""
    top = max((e.relative_cost for e, _ in plan), default=1)
    slow = sum(1 for e, _ in plan if e.relative_cost == top) if top > 1 else 1
    if slow < 2:  # nothing to overlap: no need to spend the quarter second measuring idle CPUs
        return 1
    return max(1, min(slow, round(idle_cpus()), 1 + lanes_that_fit()))


def lanes_that_fit(status: str = "/proc/self/status", meminfo: str = "/proc/meminfo") -> int:
    """How many more processes the size of this one (its peak RSS so far: torch, the exporters and the loaded model)
    fit in 80% of the memory available now; a lane that swaps costs more than it saves. Linux; elsewhere no limit."""

    def kib(path: str, key: str) -> int:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    try:
        peak, avail = kib(status, "VmHWM:"), kib(meminfo, "MemAvailable:")
    except (OSError, ValueError, IndexError, StopIteration):
        return 1 << 16
    return int(avail * 0.8) // peak if peak > 0 else 1 << 16


def idle_cpus(window_s: float = 0.25) -> float:
    """How many CPUs are idle right now: /proc/stat's idle share over ``window_s`` times the CPU count (Linux).
    Elsewhere the CPU count minus the 1-minute load average, which lags: right after `./run.sh`'s pip installs a
    quiet 2-CPU machine still showed 1.5, which made a quickstart export run in one process."""
    import os
    import time

    cpus = os.cpu_count() or 1

    def times() -> list[int]:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal

    try:
        a = times()
        time.sleep(window_s)
        b = times()
    except (OSError, ValueError):
        return float(cpus - os.getloadavg()[0]) if hasattr(os, "getloadavg") else float(cpus)
    d = [y - x for x, y in zip(a, b, strict=True)]
    total = sum(d)
    return cpus * (d[3] + d[4]) / total if total > 0 else float(cpus)


def export_all(req: ExportRequest, prep: Prepared, plan: Sequence[tuple[type[Exporter], str]], writer: BundleWriter,
               workdir: Path, jobs: int | None, say: Say) -> list[ArtifactRecord]:
    """Every (format, recipe) of ``plan`` into ``writer``'s staging directory; the records in plan order.
    ``jobs`` None: :func:`auto_jobs`."""
    n = len(plan)
    jobs = auto_jobs(plan) if jobs is None else jobs
    labels = [f"[{i}/{n}]" for i in range(1, n + 1)]
    lanes = min(jobs, n) - 1
    if lanes > 0 and not req.reloadable:
        say("--jobs: the model is a Python object of this process, so its artifacts are made one after another")
        lanes = 0
    if lanes <= 0:
        return [export_artifact(req, prep, e, r, writer.staging, workdir, labels[i], say) for i, (e, r) in enumerate(plan)]
    return _Lanes(req, prep, plan, writer.staging, workdir, labels, lanes, say).run()


class _Lanes:
    """This process plus ``lanes`` spawned ones pulling items from one queue, costliest first."""

    def __init__(self, req: ExportRequest, prep: Prepared, plan: Sequence[tuple[type[Exporter], str]],
                 staging: Path, workdir: Path, labels: list[str], lanes: int, say: Say) -> None:
        self.req, self.prep, self.plan, self.staging, self.workdir = req, prep, plan, staging, workdir
        self.labels, self.lanes, self.say = labels, lanes, say
        self.pending = deque(sorted(range(len(plan)), key=lambda i: (-plan[i][0].relative_cost, i)))
        self.records: dict[int, ArtifactRecord] = {}
        self.failure: tuple[str, str] | None = None
        self.busy = 0
        self.cond = threading.Condition()
        self.pool: Any = None

    def run(self) -> list[ArtifactRecord]:
        ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools mid-state
        threads = max(1, (os.cpu_count() or 1) // (self.lanes + 1))
        with cpus_shared(self.prep, threads):
            self._run_lanes(ctx, threads)
        if self.failure is not None:
            _raise(self.failure)
        return [self.records[i] for i in range(len(self.plan))]

    def _run_lanes(self, ctx: Any, threads: int) -> None:
        try:
            self.pool = ctx.Pool(self.lanes, _lane_init, (self.req, threads))
            first = self.pending.popleft()  # this process is ready now: it takes the costliest item
            with self.cond:
                self._submit()
            self._here(first)
            while True:
                with self.cond:
                    if self.failure is not None or not self.pending:
                        break
                    i = self.pending.popleft()
                self._here(i)
            with self.cond:
                self.cond.wait_for(lambda: self.busy == 0 or self.failure is not None)
        finally:  # a failure or Ctrl-C here leaves no lane running (and none still writing into the staging dir)
            if self.pool is not None:
                self.pool.terminate()
                self.pool.join()

    def _here(self, i: int) -> None:
        exp, recipe = self.plan[i]
        rec = export_artifact(self.req, self.prep, exp, recipe, self.staging, self.workdir, self.labels[i], self.say)
        with self.cond:
            self.records[i] = rec

    def _submit(self) -> None:
        """Hand queued items to idle lanes (called with the condition held)."""
        while self.busy < self.lanes and self.pending and self.failure is None:
            i = self.pending.popleft()
            exp, recipe = self.plan[i]
            self.busy += 1
            self.pool.apply_async(_lane_run, (i, exp.format, recipe, str(self.staging), str(self.workdir),
                                              self.labels[i]), callback=self._done, error_callback=self._crashed)

    def _done(self, out: _Outcome) -> None:
        i, rec, log, error = out
        with self.cond:
            self.busy -= 1
            for line in log:
                self.say(line)
            if error is not None:
                self.failure = self.failure or error
            elif rec is not None:
                self.records[i] = rec
            self._submit()
            self.cond.notify_all()

    def _crashed(self, e: BaseException) -> None:
        with self.cond:
            self.busy -= 1
            self.failure = self.failure or ("ExportError", f"an export lane process failed: {type(e).__name__}: {e}; "
                                            "run again with --jobs 1 to see it in this process")
            self.cond.notify_all()
