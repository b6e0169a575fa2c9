"""Activation smoothing on hand-built ONNX graphs: exact in float, finer int8 steps, and what it must not touch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeship.exporters.onnx_smooth import smooth

pytestmark = pytest.mark.needs_export
C, N = 64, 96


def _graph(path: Path, residual: bool = True, shared_gamma: bool = False) -> Path:
    """x -> LayerNormalization -> MatMul (a linear layer) [+ the norm's output as a residual, like post-LN BERT].

    Channel 5's gamma is 40x the others: the outlier channel a per-tensor int8 scale spends its range on."""
    rng = np.random.default_rng(0)
    gamma = np.ones(C, np.float32)
    gamma[5] = 40.0
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.2, (C, N)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.2, (C, C)).astype(np.float32), "w2")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="norm", axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="linear")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if residual:
        nodes += [helper.make_node("MatMul", ["y", "w_back"], ["z"], name="back"),
                  helper.make_node("Add", ["z", "h"], ["r"], name="residual")]
        inits.append(numpy_helper.from_array(rng.normal(0, 0.2, (N, C)).astype(np.float32), "w_back"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    if shared_gamma:  # a second, unnamed norm reads the same gamma (and the first loses its name too)
        nodes[0].name = ""
        nodes += [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h2"], axis=-1),
                  helper.make_node("MatMul", ["h2", "w2"], ["y2"])]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("h2", "y2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C])], outputs, inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _feeds(seed: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(seed + i).normal(0, 1, (16, C)).astype(np.float32)} for i in range(8)]


def test_smoothing_is_exact_in_float_and_shrinks_the_int8_error(tmp_path: Path) -> None:
    base = _graph(tmp_path / "base.onnx")
    assert smooth(base, tmp_path / "smooth.onnx", _feeds(0)) == 1
    x = _feeds(100)[0]["x"]
    ref, smoothed = _run(base, x), _run(tmp_path / "smooth.onnx", x)
    for a, b in zip(ref, smoothed, strict=True):  # the linear's output and the residual both unchanged
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    errors = []
    for name in ("base", "smooth"):
        q = tmp_path / f"{name}-int8.onnx"
        quantize_dynamic(str(tmp_path / f"{name}.onnx"), str(q), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=["back"])
        errors.append(float(np.abs(_run(q, x)[0] - ref[0]).mean()))
    assert errors[1] < 0.5 * errors[0], errors  # measured: mean abs error 0.224 plain, 0.048 smoothed


def test_a_norm_only_linears_read_gets_no_restoring_mul(tmp_path: Path) -> None:
    base = _graph(tmp_path / "base.onnx", residual=False)
    assert smooth(base, tmp_path / "smooth.onnx", _feeds(0)) == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "smooth.onnx")).graph.node]
    assert ops == ["LayerNormalization", "MatMul"]
    x = _feeds(100)[0]["x"]
    np.testing.assert_allclose(_run(tmp_path / "smooth.onnx", x)[0], _run(base, x)[0], rtol=1e-4, atol=1e-4)


def test_norms_sharing_their_gamma_get_their_own_copies(tmp_path: Path) -> None:
    """Exporters dedupe equal constants (every untrained LayerNorm's gamma is ones): scaling the shared tensor
    would change the other norm too. Node names are optional in ONNX, so nothing may hang on them."""
    base = _graph(tmp_path / "base.onnx", shared_gamma=True)
    assert smooth(base, tmp_path / "smooth.onnx", _feeds(0)) == 2
    x = _feeds(100)[0]["x"]
    for a, b in zip(_run(base, x), _run(tmp_path / "smooth.onnx", x), strict=True):  # y, r, h2 and y2
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_graphs_without_a_norm_before_a_linear_are_left_alone(tmp_path: Path) -> None:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.ones((C, N), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "base.onnx"))
    assert smooth(tmp_path / "base.onnx", tmp_path / "out.onnx", _feeds(0)) == 0
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(ValueError, match="at least one calibration input"):
        smooth(_graph(tmp_path / "norm.onnx"), tmp_path / "out.onnx", [])


def test_a_smoothing_failure_leaves_the_plain_graph_and_says_why(tmp_path: Path) -> None:
    """Smoothing is an optional improvement: when it cannot run (here: no calibration inputs), int8 still exports
    from the plain graph and the manifest's record says what failed."""
    from edgeship.exporters.base import ExportContext
    from edgeship.exporters.onnx import OnnxExporter

    said: list[str] = []
    ctx = ExportContext(model=None, target=None, workdir=tmp_path, calibration=[], calibration_source="none",  # type: ignore[arg-type]
                        heldout=[], reference=[], evaluate=None, format="onnx", recipe="int8-dynamic",  # type: ignore[arg-type]
                        log=said.append)
    graph, record = OnnxExporter()._smooth(ctx, _graph(tmp_path / "base.onnx"))
    assert graph is None and record["normalizations"] == 0
    assert "smoothing failed" in record["why"] and "at least one calibration input" in record["why"]
    assert any("WARNING" in s and "plain graph" in s for s in said)
    assert not (tmp_path / "base-smoothed.onnx").exists()
