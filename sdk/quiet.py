"""A quiet terminal: other libraries' output goes to a log file, ours stays on the terminal.

An export loads torch, torchao, ExecuTorch, LiteRT and onnxruntime; between them they print hundreds of lines
(torchao's failed CUDA kernels, absl/XNNPACK INFO lines, ExecuTorch's cpuinfo probes, a torch FutureWarning per
exported graph, onnxruntime's quantization advice). Many come from C++ straight to file descriptors 1 and 2, so a
Python logging filter cannot catch them. While :func:`diverted` is active:

* fd 1 and fd 2 point at the log file: C/C++ libraries and child processes write there;
* ``sys.stderr`` still writes to fd 2, so Python warnings, ``logging`` and progress bars of other libraries land
  in the log too;
* ``sys.stdout`` is re-bound to the real terminal: results printed with ``print`` stay visible;
* our own progress goes to :func:`terminal_err` (the real stderr), also from the profiling worker processes, which
  get the terminal's descriptor through ``EDGESHIP_TERMINAL_FD`` (see :func:`pass_fds`).

Torch-free: the device-side worker uses :func:`terminal_err` too.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

TERMINAL_FD_ENV = "EDGESHIP_TERMINAL_FD"
VERBOSE_ENV = "EDGESHIP_VERBOSE"

_terminal: TextIO | None = None  # the real stderr while diverted (this process or, via the env, our parent's)
_terminal_fd: int | None = None


def terminal_err() -> TextIO:
    """Where our progress lines go: the real stderr, even while other output is diverted to the log."""
    global _terminal, _terminal_fd
    if _terminal is not None:
        return _terminal
    fd = os.environ.get(TERMINAL_FD_ENV)
    if fd and fd.isdigit():  # a worker process started while the parent was diverted
        try:
            _terminal_fd = int(fd)
            _terminal = io.TextIOWrapper(os.fdopen(_terminal_fd, "wb", closefd=False), line_buffering=True)
            return _terminal
        except OSError:  # the descriptor was not passed on: fall back to stderr
            pass
    return sys.stderr


def pass_fds() -> tuple[int, ...]:
    """Descriptors a child process needs to reach the terminal (for ``subprocess``'s ``pass_fds``)."""
    terminal_err()
    return (_terminal_fd,) if _terminal_fd is not None else ()


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def muted_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block (a native library's INFO chatter), unless ``$EDGESHIP_VERBOSE``.

    Errors still reach the caller as exceptions; only what the library prints is dropped."""
    if verbose_requested():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def mute_stderr_at_exit() -> None:
    """Drop what native libraries print while the process tears down (after Python's own exit handlers: those
    registered before this call run after it, so call it last), unless ``$EDGESHIP_VERBOSE``."""
    if verbose_requested():
        return
    import atexit

    def mute() -> None:
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)

    atexit.register(mute)


@dataclass
class Diversion:
    log_path: Path | None  # None when nothing was diverted (--verbose)

    def say(self, message: str) -> None:
        """Our own progress line, on the terminal."""
        print(message, file=terminal_err(), flush=True)

    def log(self, message: str) -> None:
        """A line of ours only worth keeping in the log (per-stage detail); on the terminal with --verbose."""
        print(message, file=sys.stderr if self.log_path is not None else terminal_err(), flush=True)

    def brief(self, message: str) -> None:
        """A finished step's line on the terminal (:meth:`say`); a per-stage detail line ("[onnx/fp32] lower...",
        "[1/6] onnx/fp32") only in the log (:meth:`log`): what ``edgeship quickstart`` shows of an export."""
        detail = re.match(r"\[[a-z][\w.-]*/[\w.-]+\] ", message) or re.fullmatch(r"\[\d+/\d+\] \S+", message)
        (self.log if detail else self.say)(message)

    def lines(self) -> int:
        if self.log_path is None or not self.log_path.is_file():
            return 0
        with open(self.log_path, "rb") as f:
            return sum(1 for _ in f)

    def note(self) -> str | None:
        """One line saying where the other libraries' output went, or None if they wrote nothing."""
        n = self.lines()
        if not n:
            return None
        return f"other libraries' output ({n} lines): {self.log_path} (--verbose shows it here)"


@contextmanager
def diverted(log_path: str | Path, verbose: bool = False) -> Iterator[Diversion]:
    """Send fd 1/2, Python warnings and other libraries' logging to ``log_path`` (appended) for the block.

    With ``verbose`` (or ``$EDGESHIP_VERBOSE``) nothing changes. An empty log is removed at the end."""
    global _terminal, _terminal_fd
    if verbose or verbose_requested() or _terminal is not None:  # nested: the outer diversion already holds
        yield Diversion(None)
        return
    log = Path(log_path)
    log.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    old_stdout = sys.stdout
    os.set_inheritable(saved_err, True)
    os.environ[TERMINAL_FD_ENV] = str(saved_err)
    _terminal_fd = saved_err
    _terminal = io.TextIOWrapper(os.fdopen(saved_err, "wb", closefd=False), line_buffering=True)
    term_out = io.TextIOWrapper(os.fdopen(saved_out, "wb", closefd=False), line_buffering=True)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        sys.stdout = term_out
        yield Diversion(log)
    finally:
        for s in (sys.stdout, sys.stderr, term_out, _terminal):
            try:
                s.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        sys.stdout = old_stdout
        os.environ.pop(TERMINAL_FD_ENV, None)
        _terminal, _terminal_fd = None, None
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        if log.is_file() and log.stat().st_size == 0:
            log.unlink()


@contextmanager
def for_command(command: str, verbose: bool = False) -> Iterator[Diversion]:
    """:func:`diverted` into ``$TMPDIR/edgeship-logs/COMMAND-YYYYmmdd-HHMMSS-PID.log`` (outside the bundle, so it is
    never packed or signed); at the end, also when the block failed (the log may say why), says where it went."""
    import tempfile

    log = Path(tempfile.gettempdir()) / "edgeship-logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    note = None
    try:
        with diverted(log, verbose) as q:
            try:
                yield q
            finally:
                note = q.note()
    finally:
        if note:
            print(note, file=sys.stderr)
