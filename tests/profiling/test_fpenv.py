"""onnxruntime's flush-to-zero must stay inside the session's runs, not leak into the rest of the process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeship.profiling import fpenv
from edgeship.profiling.backends.onnx import OnnxBackend

onnx = pytest.importorskip("onnx")
TINY = np.float32(1e-39)  # a float32 subnormal


def _times_one(path: Path) -> Path:
    from onnx import TensorProto, helper

    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "one"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], initializer=[one])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _subnormals_survive() -> bool:
    return bool((np.array([TINY]) * np.float32(1.0))[0] != 0)


@pytest.mark.parametrize("ftz", [True, False])
def test_flush_to_zero_applies_to_runs_only(tmp_path: Path, ftz: bool) -> None:
    assert _subnormals_survive()
    b = OnnxBackend(_times_one(tmp_path / "m.onnx"), threads=1, options={"denormal_as_zero": ftz})
    assert _subnormals_survive(), "creating the session left flush-to-zero on for the whole thread"
    y = b.run({"x": np.array([TINY], dtype=np.float32)})["y"][0]
    assert bool(y == 0) is ftz, "the session's own runs must keep (or not) the flush-to-zero mode it asked for"
    assert _subnormals_survive(), "a run left flush-to-zero on"


def test_float_mode_is_entered_once_around_a_timed_loop(tmp_path: Path) -> None:
    """The worker enters float_mode() around its timed loop: runs inside keep the session's mode without
    switching it per inference, and the caller's mode is back afterwards."""
    b = OnnxBackend(_times_one(tmp_path / "m.onnx"), threads=1, options={"denormal_as_zero": True})
    x = {"x": np.array([TINY], dtype=np.float32)}
    with b.float_mode():
        assert not _subnormals_survive()  # the mode is on for the loop
        assert all(b.run(x)["y"][0] == 0 for _ in range(3))
    assert _subnormals_survive()
    assert b.run(x)["y"][0] == 0  # outside the loop, run() still applies it itself


def test_a_later_session_also_flushes(tmp_path: Path) -> None:
    """ORT sets the calling thread's mode once per process, from the first session: a plain session first must
    not cost a later flush-to-zero session its mode (it did: the second session ran with subnormals)."""
    model = _times_one(tmp_path / "m.onnx")
    plain = OnnxBackend(model, threads=1, options={"denormal_as_zero": False})
    ftz = OnnxBackend(model, threads=1, options={"denormal_as_zero": True})
    x = {"x": np.array([TINY], dtype=np.float32)}
    assert ftz.run(x)["y"][0] == 0
    assert plain.run(x)["y"][0] == TINY
    assert _subnormals_survive()


_FIRST_SESSION = """
import sys, numpy as np, onnxruntime as ort
from edgeship.profiling import fpenv
so = ort.SessionOptions()
so.add_session_config_entry("session.set_denormal_as_zero", "1")
survives = lambda: bool((np.array([np.float32(1e-39)]) * np.float32(1))[0] != 0)
with fpenv.preserved():
    ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
    leaked = not survives()
print(leaked, survives())
"""


def test_preserved_undoes_what_the_first_session_sets(tmp_path: Path) -> None:
    """In a fresh process (ORT's call_once is still armed) the first session really does leave the mode on."""
    import subprocess
    import sys

    if fpenv.flush_to_zero() is None:
        pytest.skip("ORT sets flush-to-zero only on x86-64")
    out = subprocess.run([sys.executable, "-c", _FIRST_SESSION, str(_times_one(tmp_path / "m.onnx"))],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True", "onnxruntime no longer leaves flush-to-zero on after its first session"
    assert out[1] == "True", "fpenv.preserved() did not restore the mode"
