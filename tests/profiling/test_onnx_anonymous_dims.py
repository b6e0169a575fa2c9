"""``.onnx`` files whose dynamic dims are anonymous (``?`` or no name at all), built with ``onnx.helper``;
binding sizes to them; and a failed artifact's whole error on the terminal and in the HTML report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.errors import InputError
from edgeship.profiling import backends
from edgeship.profiling.html import render_html
from edgeship.profiling.report import render
from edgeship.profiling.results import ArtifactResult, DeviceRun, ProfileResult
from edgeship.profiling.runner import profile
from edgeship.spec import TensorSpec, fill_dims, resolve_dims, synthesize

FAST = {"runs": 5, "min_seconds": 0.0, "warmup": 1, "progress": False, "energy": "estimate"}
Measured = Callable[[ArtifactResult, int], None]


def _vision_onnx(path: Path, dims: list[Any]) -> Path:
    """x [?, 3, ?, ?] -> global average pool -> [?, 3] @ W [3, 4] -> y [?, 4]: a vision head with anonymous dims."""
    onnx = pytest.importorskip("onnx", reason="onnx (the [export] extra) builds the test file")
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "w"], ["y"])]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 4])], initializer=[w, axes])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what onnxruntime 1.17+ loads; onnx.helper would write the newest
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("anon", ["?", None], ids=["question-mark", "unnamed"])
def test_anonymous_dims_are_named_by_position(tmp_path: Path, anon: str | None) -> None:
    b = backends.load(_vision_onnx(tmp_path / "m.onnx", [anon, 3, anon, anon]))
    (x,) = b.inputs
    assert x.shape == ("x[0]", 3, "x[2]", "x[3]")
    dims = resolve_dims(b.inputs, {"x": (1, 3, 48, 192)}, {})
    assert dims == {"x[0]": 1, "x[2]": 48, "x[3]": 192}
    feeds = b.synthesize(b.inputs, dims)
    assert feeds["x"].shape == (1, 3, 48, 192)
    y = b.run(b.adapt_feeds(feeds))["y"]
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(y, feeds["x"].mean(axis=(2, 3)) @ w, rtol=1e-4, atol=1e-5)


def test_unbound_dim_error_names_input_dims_and_flag(tmp_path: Path) -> None:
    b = backends.load(_vision_onnx(tmp_path / "m.onnx", ["?", 3, "?", "?"]))
    dims, notes = fill_dims(b.inputs, resolve_dims(b.inputs, {}, {}), b.dim_hints)
    assert dims == {"x[0]": 1} and notes == ["x[0] = 1 (assumed batch 1)"]
    with pytest.raises(InputError) as ei:
        b.synthesize(b.inputs, dims)
    msg = str(ei.value)
    assert "\n" not in msg and "input 'x' has dims [?, 3, ?, ?] and no size for x[2], x[3]" in msg
    assert "--shape x=1x3xNxN" in msg


def test_repeated_dim_names_bind_by_position() -> None:
    # a converter that calls every dynamic dim "h": one input given different sizes binds them by position
    specs = (TensorSpec("x", "float32", ("batch", 3, "h", "h")), TensorSpec("m", "float32", ("batch", "h")))
    dims = resolve_dims(specs, {"x": (1, 3, 48, 192)}, {})
    assert dims == {"batch": 1, "x[2]": 48, "x[3]": 192}
    assert synthesize(specs[:1], dims)["x"].shape == (1, 3, 48, 192)
    square = resolve_dims(specs, {"x": (2, 3, 64, 64)}, {})  # the same size twice is still the shared name
    assert square == {"batch": 2, "h": 64} and synthesize(specs, square)["m"].shape == (2, 64)
    with pytest.raises(InputError, match=r"dynamic dimension 'batch' given two sizes \(1 and 2\)"):
        resolve_dims(specs, {"x": (1, 3, 8, 8), "m": (2, 8)}, {})
    with pytest.raises(InputError, match=r"--shape x: rank 3 but the input has rank 4 \[batch, 3, h, h\]"):
        resolve_dims(specs, {"x": (1, 3, 8)}, {})


def test_profile_anonymous_dim_onnx(tmp_path: Path, measured: Measured) -> None:
    f = _vision_onnx(tmp_path / "ocr_head.onnx", ["?", 3, "?", "?"])
    res = profile(f, shapes={"x": (1, 3, 48, 192)}, **FAST)
    (r,) = res.results
    measured(r, 5)
    assert r.input is not None and r.input.shapes == {"x": (1, 3, 48, 192)} and r.output_shapes == {"y": (1, 4)}
    res = profile(f, shapes={"x": (2, 3, 32, 32)}, **FAST)
    assert res.results[0].output_shapes == {"y": (2, 4)}


def test_failed_artifact_error_shown_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeship.cli import main

    f = _vision_onnx(tmp_path / "ocr_head.onnx", ["?", 3, "?", "?"])
    html = tmp_path / "r.html"
    rc = main(["profile", str(f), "--runs", "3", "--min-seconds", "0", "--warmup", "1", "--energy", "estimate",
               "--quiet", "--html", str(html)])
    shown = capsys.readouterr().out
    assert rc == 1
    full = ("ocr_head.onnx: ERROR: input 'x' has dims [?, 3, ?, ?] and no size for x[2], x[3]: pass one size per dim, "
            "e.g. --shape x=1x3xNxN (N: the size to time)")
    assert full in [line.strip() for line in shown.splitlines()], shown  # below the table, whole
    page = html.read_text()
    assert "<h2>Errors</h2>" in page and "e.g. --shape x=1x3xNxN (N: the size to time)" in page


def test_render_keeps_a_long_error_on_one_line() -> None:
    err = "first line of a runtime's message\n  second line with the cause: " + "x" * 200
    doc = ProfileResult.from_dict({"device": {}, "results": [
        {"artifact": "a.tflite", "status": "error", "error": err, "size_bytes": 10},
        {"artifact": "npu.onnx", "status": "skipped", "error": "no Hexagon NPU here", "size_bytes": 10,
         "npu": {"mode": "absent", "presence": "no Hexagon NPU here"}}]})
    out = render(doc)
    assert f"  a.tflite: ERROR: first line of a runtime's message second line with the cause: {'x' * 200}" in out
    assert "npu.onnx: ERROR" not in out  # a skipped NPU job is no failure
    page = render_html([DeviceRun(doc)])
    assert "x" * 200 in page and "no Hexagon NPU here</code>" not in page
