"""A quiet terminal: other libraries' output (C++ straight to fd 2, Python warnings, logging) goes to a log file;
our progress and results stay on the terminal, also from the profiling worker processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SNIPPET = r'''
import logging, os, subprocess, sys, warnings
from edgeship.quiet import diverted, pass_fds
with diverted(sys.argv[1]) as q:
    os.write(2, b"[cpuinfo_utils.cpp:71] C++ noise on fd 2\n")
    os.write(1, b"C++ noise on fd 1\n")
    warnings.warn("a FutureWarning from a library", FutureWarning)
    logging.getLogger("torchao").warning("Failed to load _C_mxfp8.so")
    q.say("[onnx/fp32] lower...")
    print("bundle: B")
    subprocess.run([sys.executable, "-c", "import os; os.write(2, b'child noise\\n'); "
                    "from edgeship.quiet import terminal_err; print('[onnx/fp32] 3 runs', file=terminal_err())"],
                   check=True, pass_fds=pass_fds())
print(q.note())
os.write(2, b"after: back on the terminal\n")
'''


def test_diverted_sends_other_output_to_the_log_and_keeps_ours(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "x.log"
    r = subprocess.run([sys.executable, "-c", SNIPPET, str(log)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    text = log.read_text()
    n = len(text.splitlines())
    assert r.stdout.splitlines() == ["bundle: B", f"other libraries' output ({n} lines): {log} (--verbose shows it here)"]
    assert r.stderr.splitlines() == ["[onnx/fp32] lower...", "[onnx/fp32] 3 runs", "after: back on the terminal"]
    for noise in ("C++ noise on fd 2", "C++ noise on fd 1", "FutureWarning", "Failed to load _C_mxfp8.so",
                  "child noise"):
        assert noise in text


def test_verbose_diverts_nothing(tmp_path: Path) -> None:
    code = SNIPPET.replace("diverted(sys.argv[1])", "diverted(sys.argv[1], verbose=True)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.log")], capture_output=True, text=True,
                       timeout=60, check=False)
    assert "C++ noise on fd 2" in r.stderr and "child noise" in r.stderr and "None" in r.stdout
    assert not (tmp_path / "x.log").exists()


MUTED = r"""
import os, sys
from edgeship.quiet import mute_stderr_at_exit, muted_stderr
with muted_stderr():
    os.write(2, b"INFO: [environment.cc:36] native chatter\n")
os.write(2, b"after the block\n")
mute_stderr_at_exit()
import atexit
atexit.register(lambda: os.write(2, b"an earlier exit handler\n"))  # registered after: runs before the mute


class Teardown:  # torn down with the module, after the exit handlers, as LiteRT's own environment is
    def __del__(self, write=os.write):
        write(2, b"teardown chatter\n")


keep = Teardown()
print("done")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_muted_stderr_drops_native_chatter_for_the_block_and_at_exit(verbose: bool) -> None:
    import os

    env = {**os.environ, "EDGESHIP_VERBOSE": "1" if verbose else ""}
    r = subprocess.run([sys.executable, "-c", MUTED], capture_output=True, text=True, timeout=60, check=False, env=env)
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr
    lines = r.stderr.splitlines()
    assert ("INFO: [environment.cc:36] native chatter" in lines) is verbose
    assert ("teardown chatter" in lines) is verbose
    assert "after the block" in lines and "an earlier exit handler" in lines


# Every line the CLI prints for an export + profile: progress, tables, results, where the log went.
OURS = [re.compile(p) for p in (
    r"loading model .*\.\.\.$",
    r"\[\d+/\d+\] (onnx|tflite|pte)/[\w-]+(: .*)?$",
    r"\[(onnx|tflite|pte)/[\w-]+\] .*$",
    r"WARNING: no --calibration given: .*$",
    r"artifact +MB +.*$",
    r"-+( +-+)+$",
    r"(onnx|tflite|pte)/[\w-]+ +\d.*$",
    r"bundle: .*$",
    r"other libraries' output \(\d+ lines\): \S+\.log \(--verbose shows it here\)$",
    r"device: .*$",
    r"input: .*$",
    r"energy: .*$",
    r"  (onnx|tflite|pte)/[\w-]+: gross .*$",
    r"  (onnx|tflite|pte)/[\w-]+: peak RSS \d+ MB; at the end .*$",  # what the memory was made of (report.py)
    r"  (onnx|tflite|pte)/[\w-]+: note: .*$",  # the report's per-artifact notes (profiling/report.py)
    r"history: run [\d, ]+ in \S+$",  # where the run was recorded (sdk/cli_history.py)
)]


def _cli(*argv: str) -> tuple[list[str], Path]:
    r = subprocess.run([sys.executable, "-m", "edgeship", *argv], capture_output=True, text=True, timeout=900,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    logs = [Path(m.group(1)) for ln in lines if (m := re.search(r": (\S+\.log) \(--verbose", ln))]
    assert len(logs) == 1, lines
    return lines, logs[0]


@pytest.mark.needs_export
def test_export_and_profile_print_only_our_lines(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """What a first quickstart shows, on the tiny model: all three formats, int8 through onnxruntime's quantizer."""
    out = tmp_path / "B"
    lines, export_log = _cli("export", str(tiny_bert_dir), "--target", "raspberry-pi-5", "-o", str(out),
                             "--format", "onnx", "--format", "tflite", "--format", "pte", "--quant", "fp32")
    more, int8_log = _cli("export", str(tiny_bert_dir), "--target", "raspberry-pi-5", "-o", str(tmp_path / "B8"),
                          "--format", "onnx", "--quant", "int8-dynamic")
    prof, profile_log = _cli("profile", str(out), "--runs", "3", "--min-seconds", "0", "--warmup", "1",
                             "--energy", "estimate")
    theirs = [ln for ln in lines + more + prof if not any(p.match(ln) for p in OURS)]
    assert not theirs, theirs
    assert any(ln.startswith("[pte/fp32] 3 runs") for ln in prof)  # the worker's progress reached the terminal
    # the noise existed and went to the logs (so the check above had something to filter)
    assert "FutureWarning" in export_log.read_text()
    assert "pre-processing" in int8_log.read_text()
    assert "XNNPACK" in profile_log.read_text() or "cpuinfo" in profile_log.read_text()


def test_quickstart_keeps_one_line_per_artifact_and_logs_the_stages() -> None:
    from edgeship.quiet import Diversion

    seen: list[tuple[str, str]] = []

    class Q(Diversion):
        def say(self, m: str) -> None:
            seen.append(("terminal", m))

        def log(self, m: str) -> None:
            seen.append(("log", m))

    q = Q(None)
    for m in ("loading model x...", "[1/6] onnx/fp32", "[onnx/fp32] lower...", "[pte/int4-weight] prepare...",
              "[1/6] onnx/fp32: 86.1 MB, mean cosine 1.0000 (min 1.0000), 2.8 s", "WARNING: no --calibration given"):
        q.brief(m)
    assert [m for where, m in seen if where == "terminal"] == [
        "loading model x...", "[1/6] onnx/fp32: 86.1 MB, mean cosine 1.0000 (min 1.0000), 2.8 s",
        "WARNING: no --calibration given"]
