"""The affine 4-bit MatMul pass: exact on weights that already sit on a 4-bit grid (a GGUF Q4_1 source), the best
affine fit otherwise, and the graph still runs in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from edgeship.exporters.onnx_affine4 import ON_GRID, convert, convert_file, quantize, symmetric_grid  # noqa: E402

K, N, BLOCK = 96, 40, 32


def q4_1_weight(rng: np.random.Generator, k: int = K, n: int = N) -> np.ndarray:
    """A weight [K, N] as GGUF Q4_1 dequantizes it: per output row, blocks of 32 along K, w = d * q + m (fp16 d, m)."""
    q = rng.integers(0, 16, size=(n, k // BLOCK, BLOCK)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 picks d = (max - min) / 15, m = min: both ends are used
    d = rng.uniform(0.002, 0.02, size=(n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.2, 0.05, size=(n, k // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(n, k).T.copy()


def matmul_model(w: np.ndarray, shared: bool = False, name: str = "/model/layers.0/mlp/up_proj/MatMul") -> object:
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name=name)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared:  # a tied embedding reads the same initializer through a Transpose, as the GenAI builder writes it
        nodes.append(helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="/embed/Transpose"))
        outputs.append(helper.make_tensor_value_info("wt", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, w.shape[0]])],
                              outputs, [numpy_helper.from_array(w.astype(np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: object, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    return list(sess.run(None, {"x": x}))


def test_a_weight_on_a_4bit_grid_is_represented_exactly() -> None:
    w = q4_1_weight(np.random.default_rng(0))
    a = quantize(w, BLOCK)
    assert a.grid_error < ON_GRID
    # the offsets an integer zero point cannot carry are a sizeable part of a step: the residual holds them
    residual_in_steps = np.abs(a.residual.T.reshape(-1)) / a.scales
    assert residual_in_steps.max() > 0.25


def test_the_symmetric_split_rounds_steps_as_the_kernels_store_them() -> None:
    """XNNPACK (.pte) and LiteRT keep 4-bit block steps as bf16: the split rounds them to nearest even, ties
    included, and the offsets are refitted to the rounded steps, so a Q4_1 weight comes back within the bf16
    rounding of its step (the offsets absorb the mean)."""
    import ml_dtypes  # onnx's own dependency; its bfloat16 cast rounds to nearest even, as torch's does

    rng = np.random.default_rng(3)
    w = q4_1_weight(rng).T.copy()  # [N, K]
    q, d, o = symmetric_grid(w, BLOCK)
    assert q.min() == -8 and q.max() == 7  # both ends of every block are used
    affine_steps = (w.reshape(N, -1, BLOCK).max(-1) - w.reshape(N, -1, BLOCK).min(-1)) / 15
    assert np.array_equal(d, affine_steps.astype(ml_dtypes.bfloat16).astype(np.float32))
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, 3.0e-4], dtype=np.float32)  # halfway cases round to even
    assert np.array_equal(symmetric_grid(np.tile(ties[:, None] * [[0, 15]], 16).astype(np.float32), 2)[1][:, 0],
                          ties.astype(ml_dtypes.bfloat16).astype(np.float32))
    residual = q * d[..., None] + o[..., None] - w.reshape(N, -1, BLOCK)
    assert np.abs(residual.mean(-1)).max() < 1e-7  # the offsets are the least-squares ones for the rounded steps
    assert np.all(np.abs(residual) <= 15 * np.abs(d - affine_steps)[..., None] + 1e-6)  # only the rounding moves w
    _, d16, _ = symmetric_grid(w, BLOCK, fp16_steps=True)
    assert np.array_equal(d16, d.astype(np.float16).astype(np.float32))


def test_a_constant_block_is_all_offset() -> None:
    """A zero block (a pruned neuron, a padding row) or any constant one: q = 0 and the offset is the value, exact.
    With q = -8 (the min/max fit's level 0) the offset row got 8 * step, and the 8-bit per-row scale of the `.pte`
    and LiteRT offset linears then rounded the other blocks' offsets away: a tiny Llama with pruned rows had KL
    0.47 (LiteRT) and 0.29 (`.pte`) against 0.23 for ONNX's zero points; 0.22 for both with this."""
    rng = np.random.default_rng(5)
    w = q4_1_weight(rng).T.copy()  # [N, K]
    w[0] = 0.0  # a pruned row: every block constant
    w[1, :BLOCK] = 0.25  # one constant, non-zero block
    q, d, o = symmetric_grid(w, BLOCK)
    assert not q[0].any() and not o[0].any() and d[0].min() > 0  # nothing in the 4-bit path, a valid step
    assert not q[1, 0].any() and o[1, 0] == np.float32(0.25)
    assert np.abs(o[2:]).max() < np.abs(w[2:]).max()  # the other rows' offsets stay the size of their weights
    assert np.allclose(q * d[..., None] + o[..., None], w.reshape(N, -1, BLOCK), atol=np.abs(w).max() / 15)


def test_converted_graph_matches_the_fp32_matmul(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w = q4_1_weight(rng)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    ref = x @ w
    model = matmul_model(w)
    report = convert(model, block=BLOCK, accuracy_level=1)  # fp32 activations: only the weights are compared
    assert (report.converted, report.on_grid) == (1, 1)
    assert {n.op_type for n in model.graph.node} == {"MatMulNBits", "MatMul", "Add"}  # type: ignore[attr-defined]
    got = run(model, x)[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_the_integer_zero_point_alone_is_not_enough() -> None:
    """What the builder's int4 does to such weights: the same MatMulNBits without the offset term is ~5% off."""
    rng = np.random.default_rng(2)
    w = q4_1_weight(rng)
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    ref = x @ w
    model = matmul_model(w)
    convert(model, block=BLOCK, accuracy_level=1)
    g = model.graph  # type: ignore[attr-defined]
    add = next(n for n in g.node if n.op_type == "Add")
    nbits = next(n for n in g.node if n.op_type == "MatMulNBits")
    nbits.output[0] = add.output[0]
    keep = [n for n in g.node if n.op_type == "MatMulNBits"]
    del g.node[:]
    g.node.extend(keep)
    got = run(model, x)[0]
    assert np.abs(got - ref).max() > 1e-2 * np.abs(ref).max()


def test_off_grid_weights_get_the_best_affine_fit() -> None:
    w = np.random.default_rng(3).standard_normal((K, N)).astype(np.float32)
    a = quantize(w, BLOCK)
    assert ON_GRID < a.grid_error < 0.15  # half a step of a 16-level min/max grid, relative to the largest weight


def test_a_shared_initializer_survives_and_odd_shapes_are_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    w = q4_1_weight(rng)
    model = matmul_model(w, shared=True)
    report = convert(model, block=BLOCK, accuracy_level=4)
    assert report.converted == 1
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    y, wt = run(model, x)
    np.testing.assert_array_equal(wt, w.T)  # the embedding still reads the fp32 table
    assert np.abs(y - x @ w).max() < 0.05 * np.abs(x @ w).max()  # int8 activations at accuracy_level 4

    odd = matmul_model(rng.standard_normal((40, 8)).astype(np.float32))  # K = 40: no whole blocks of 32
    assert convert(odd, block=BLOCK).converted == 0


def test_the_lm_head_gets_8_bit_blocks() -> None:
    rng = np.random.default_rng(6)
    w = rng.standard_normal((K, N)).astype(np.float32)  # a GGUF's Q8/Q6 output matrix is not on a 4-bit grid
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    model = matmul_model(w, name="/lm_head/MatMul")
    report = convert(model, block=BLOCK, accuracy_level=1)
    assert report.eight_bit == ["/lm_head/MatMul"]
    nbits = next(n for n in model.graph.node if n.op_type == "MatMulNBits")  # type: ignore[attr-defined]
    assert next(a.i for a in nbits.attribute if a.name == "bits") == 8
    ref = x @ w
    assert np.abs(run(model, x)[0] - ref).max() < 0.01 * np.abs(ref).max()


def test_convert_file_writes_external_data(tmp_path: Path) -> None:
    w = q4_1_weight(np.random.default_rng(5), k=256, n=64)
    onnx.save_model(matmul_model(w), str(tmp_path / "src.onnx"), save_as_external_data=True,
                    location="src.onnx.data", size_threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    report = convert_file(tmp_path / "src.onnx", out / "model.onnx", "model.onnx.data", block=BLOCK)
    assert report.converted == 1 and (out / "model.onnx.data").is_file()
    x = np.ones((2, 3, 256), dtype=np.float32)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": x})[0].shape == (2, 3, 64)


@pytest.mark.parametrize("head_name, exact", [("/model/layers.0/mlp/up_proj/MatMul", True), ("/lm_head/MatMul", False)])
def test_a_tied_embedding_reads_the_quantized_head(head_name: str, exact: bool) -> None:
    """The GenAI builder's tied embedding is Transpose(W) -> Gather(ids): it must read W's blocks (4- or 8-bit) and
    leave no fp32 copy of the table behind."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    w = q4_1_weight(rng, k=K, n=50)  # W [K, vocab]: the embedding table is W.T
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"], name=head_name),
             helper.make_node("Transpose", ["w"], ["table"], perm=[1, 0], name="/model/embed_tokens/Transpose"),
             helper.make_node("Gather", ["table", "ids"], ["emb"], name="/model/embed_tokens/Gather")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, K]),
                                           helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("emb", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = convert(model, block=BLOCK, accuracy_level=1)
    assert report.tied_embedding and "w" not in {t.name for t in model.graph.initializer}
    ids = np.array([[0, 7, 49]])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, emb = sess.run(None, {"x": np.ones((1, 2, K), dtype=np.float32), "ids": ids})
    err = np.abs(emb[0] - w.T[ids[0]]).max() / np.abs(w).max()
    assert err < (1e-5 if exact else 1e-2)  # on its 4-bit grid: exact; as 8-bit blocks of a 4-bit grid: also close
    assert logits.shape == (1, 2, 50)


def test_accuracy_level_can_be_set_per_node() -> None:
    """The LLM search gives fp32 activations (accuracy_level 1) to some matmuls and leaves the rest at the default."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w1, w2 = q4_1_weight(rng), q4_1_weight(rng)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"], name="/a/MatMul"),
             helper.make_node("MatMul", ["x", "w2"], ["y2"], name="/b/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, None) for y in ("y1", "y2")],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    convert(model, block=BLOCK, accuracy_level=4, node_accuracy={"/b/MatMul": 1})
    levels = {n.name: next(a.i for a in n.attribute if a.name == "accuracy_level") for n in model.graph.node
              if n.op_type == "MatMulNBits"}
    assert levels == {"a_MatMul/MatMulNBits": 4, "b_MatMul/MatMulNBits": 1}
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    y1, y2 = run(model, x)
    assert np.abs(y2 - x @ w2).max() < 1e-4 * np.abs(x @ w2).max()  # fp32 activations: exact up to rounding
    assert np.abs(y1 - x @ w1).max() < 0.05 * np.abs(x @ w1).max()


def test_conversions_sharing_a_block_cache_fit_each_weight_once_and_write_the_same_graph(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An LLM search converts one source graph once per candidate; only which matmuls keep fp32 activations (or,
    at 8 bits, stay plain MatMuls) differs, so the blocks are fitted once (SmolLM2: 5 s per build -> 0.2 s)."""
    import copy

    from edgeship.exporters import onnx_affine4

    rng = np.random.default_rng(6)
    source = matmul_model(q4_1_weight(rng))
    fits: list[int] = []
    real = onnx_affine4.quantize
    monkeypatch.setattr(onnx_affine4, "quantize", lambda *a, **k: fits.append(1) or real(*a, **k))
    for bits in (4, 8):
        cache: dict = {}
        alone, first, second = (copy.deepcopy(source) for _ in range(3))
        convert(alone, block=BLOCK, bits=bits, node_accuracy={"/model/layers.0/mlp/up_proj/MatMul": 1})
        fits.clear()
        convert(first, block=BLOCK, bits=bits, cache=cache)
        convert(second, block=BLOCK, bits=bits, cache=cache, node_accuracy={"/model/layers.0/mlp/up_proj/MatMul": 1})
        assert len(fits) == 1 and list(cache) == [("w", BLOCK, bits)]
        assert second.SerializeToString() == alone.SerializeToString()
