"""Keep a runtime's floating-point mode (flush-to-zero) from leaking into the rest of the process.

onnxruntime's ``session.set_denormal_as_zero`` turns on flush-to-zero and denormals-are-zero (MXCSR on x86) on
the thread that creates the session, and never turns them off: every later numpy or torch computation on that
thread flushes tiny floats to 0 (``1e-39 * 1.0 == 0``). An export validates its ONNX artifact in-process and
then computes the next format's float reference, so the leak changed reference numbers. The fix saves the
C floating-point environment (glibc ``fegetenv``/``fesetenv``: on x86-64 it holds both the x87 control word and
MXCSR, on aarch64 FPCR/FPSR) around session creation, and applies the mode itself around each run.

ORT sets the mode on the creating thread only for the *first* session in the process (a ``std::call_once`` in
``InferenceSession::Initialize``; its intra-op pool threads get it per session). So a second session that asks
for flush-to-zero never got it on the calling thread, which does its share of the work: ``flush_to_zero()``
builds the mode ourselves instead of trusting what creation left behind. ORT flushes only on x86 (SSE3); so do we.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

# fenv_t is 32 bytes on x86-64 (glibc and musl) and 8 on aarch64; a larger buffer is safe for any libc layout
_FENV_BYTES = 128
_X86_64_MXCSR_OFFSET = 28  # fenv_t.__mxcsr, after the 28-byte x87 environment (fnstenv's layout)
_MXCSR_FTZ_DAZ = (1 << 15) | (1 << 6)


@cache
def _libm() -> ctypes.CDLL | None:
    """The C library's fenv functions: from this process's own symbols first (Python links libm), the found libm
    second (``ctypes.util`` imports subprocess, 0.7 MB of the device runner's peak RSS, so only when needed)."""
    with contextlib.suppress(OSError, AttributeError):
        return _with_fenv(ctypes.CDLL(None))
    from ctypes.util import find_library

    name = find_library("m")
    try:
        return _with_fenv(ctypes.CDLL(name)) if name else None
    except (OSError, AttributeError):  # no C99 fenv in this libc (e.g. a static musl build): nothing to guard
        return None


def _with_fenv(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.fegetenv.argtypes = lib.fesetenv.argtypes = [ctypes.c_void_p]
    return lib


def get_env() -> ctypes.Array[ctypes.c_char] | None:
    """The calling thread's floating-point environment, or None where libc does not expose it."""
    lib = _libm()
    if lib is None:
        return None
    buf = ctypes.create_string_buffer(_FENV_BYTES)
    return buf if lib.fegetenv(buf) == 0 else None


def set_env(env: ctypes.Array[ctypes.c_char] | None) -> None:
    lib = _libm()
    if lib is not None and env is not None:
        lib.fesetenv(env)


def flush_to_zero() -> ctypes.Array[ctypes.c_char] | None:
    """The calling thread's environment with flush-to-zero and denormals-are-zero on (what ORT sets on x86), or
    None where that is not done (not x86-64 Linux, or libc without fenv)."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    env = get_env()
    if env is None:
        return None
    mxcsr = ctypes.c_uint32.from_buffer(env, _X86_64_MXCSR_OFFSET)
    mxcsr.value |= _MXCSR_FTZ_DAZ
    return env


@contextmanager
def preserved() -> Iterator[None]:
    """Whatever runs inside may change the thread's float mode; it is put back on the way out."""
    saved = get_env()
    try:
        yield
    finally:
        set_env(saved)


@contextmanager
def applied(env: ctypes.Array[ctypes.c_char] | None) -> Iterator[None]:
    """Run with ``env`` (captured from a runtime) as the float mode, then restore the caller's."""
    if env is None:
        yield
        return
    saved = get_env()
    set_env(env)
    try:
        yield
    finally:
        set_env(saved)
