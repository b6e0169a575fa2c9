"""The ONNX runner's memory: weights memory-mapped from the artifact file (onnx_mapped.py: same outputs, the
file untouched, anything unexpected loads the file as it is) and no memory pattern kept per input shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError
from edgeship.profiling import backends
from edgeship.profiling.backends.onnx_mapped import MIN_BYTES, mapped_graph

onnx = pytest.importorskip("onnx", reason="onnx (the [export] extra) builds the test files")


def _mlp(path: Path, external: bool = False) -> Path:
    """x [1, 64] @ W1 [64, 64] (16 KB: mapped) + b [64] (256 B: stays inline) -> relu -> @ W2 [64, 8]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (64, 64)), ("b", (64,)), ("w2", (64, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def test_mapped_weights_give_the_same_outputs_and_leave_the_file_alone(tmp_path: Path) -> None:
    path = _mlp(tmp_path / "m.onnx")
    before = path.read_bytes()
    graph, n = mapped_graph(path) or (b"", 0)
    assert n == 2 and len(graph) < len(before) - 2 * 64 * 8 * 4  # w1 and w2 left the graph; b (< MIN_BYTES) stayed
    assert 64 * 4 < MIN_BYTES
    x = {"x": np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)}
    mapped = backends.load(path, "onnx", threads=1)
    plain = backends.load(path, "onnx", threads=1, options={"map_weights": "false"})
    assert mapped.info()["weights"] == "memory-mapped from the file (2 initializers)"
    assert plain.info()["weights"] == "loaded"
    assert np.array_equal(mapped.run(x)["y"], plain.run(x)["y"])
    assert path.read_bytes() == before


def test_the_memory_pattern_is_off_unless_asked_for(tmp_path: Path) -> None:
    # ORT's default plans and keeps one activation block per input shape: 4-6 MB of MiniLM's peak RSS at 128
    # tokens for no measured speed (README); --option memory_pattern=true brings it back
    path = _mlp(tmp_path / "m.onnx")
    x = {"x": np.ones((1, 64), np.float32)}
    lean = backends.load(path, "onnx", threads=1)
    planned = backends.load(path, "onnx", threads=1, options={"memory_pattern": "true"})
    assert lean.session.get_session_options().enable_mem_pattern is False
    assert planned.session.get_session_options().enable_mem_pattern is True
    assert lean.info()["memory_pattern"] is False and planned.info()["memory_pattern"] is True
    assert np.array_equal(lean.run(x)["y"], planned.run(x)["y"])


def test_a_model_with_external_data_already_is_loaded_as_it_is(tmp_path: Path) -> None:
    path = _mlp(tmp_path / "e.onnx", external=True)
    assert mapped_graph(path) is None
    b = backends.load(path, "onnx", threads=1)
    assert b.info()["weights"] == "loaded" and b.run({"x": np.ones((1, 64), np.float32)})["y"].shape == (1, 8)


@pytest.mark.parametrize("cut", [1, 7, 100, 5000])
def test_a_truncated_file_is_the_same_one_line_error(tmp_path: Path, cut: int) -> None:
    whole = _mlp(tmp_path / "m.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(whole[:-cut])
    assert mapped_graph(bad) is None  # the walker never raises: onnxruntime reports the file itself
    with pytest.raises(ArtifactLoadError, match="onnxruntime cannot load it; the file is corrupt, truncated or not"):
        backends.load(bad, "onnx", threads=1)


def test_empty_and_garbage_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(bytes(range(256)) * 8)
    assert mapped_graph(empty) is None and mapped_graph(junk) is None


def test_a_mapped_graph_onnxruntime_refuses_falls_back_and_says_so(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An onnxruntime that rejects the rewritten graph (an older one without the external-data folder key, say)
    loads the file as it is, and the result says the RSS now holds a copy of the weights."""
    import edgeship.profiling.backends.onnx as onnx_backend

    path = _mlp(tmp_path / "m.onnx")
    monkeypatch.setattr(onnx_backend, "mapped_graph", lambda p: (b"\x0a\x03bad graph", 2))
    b = backends.load(path, "onnx", threads=1)
    info = b.info()
    assert info["weights"].startswith("loaded (mapping them failed: ")
    assert any("weights not memory-mapped" in n and "map_weights=false" in n for n in info["notes"])
    x = {"x": np.ones((1, 64), np.float32)}
    assert b.run(x)["y"].shape == (1, 8)
