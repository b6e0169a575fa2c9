"""ONNX exporter on tiny random-init models: every recipe, every task, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from edgeship.errors import (
    CalibrationError,
    ConfigError,
    ExportError,
    FidelityError,
    ModelLoadError,
    OutputExistsError,
    UnsupportedRecipeError,
)
from edgeship.exporters import EXPORTERS
from edgeship.exporters.base import ExportContext, Exporter, ExportOutput, RecipeSupport
from edgeship.manifest import load_bundle
from edgeship.pipeline import export

pytestmark = pytest.mark.needs_export
QUIET = {"log": lambda m: None}


def test_bundle_contents(tiny_onnx_bundle: Path) -> None:
    b = load_bundle(tiny_onnx_bundle)
    m = b.manifest
    assert [a.key for a in m.artifacts] == ["onnx/fp32", "onnx/int8-dynamic"]
    assert [s.name for s in m.inputs] == ["input_ids", "attention_mask"]
    assert m.outputs[0].name == "sentence_embedding"
    assert m.preprocessing["kind"] == "tokenizer" and m.preprocessing["pooling"] == "mean"
    assert (tiny_onnx_bundle / "tokenizer/vocab.txt").is_file()
    for a in m.artifacts:
        assert a.fidelity is not None and a.fidelity.passed and a.fidelity.n_samples == 64
        assert a.fidelity.p5_cosine is not None and a.fidelity.min_cosine <= a.fidelity.p5_cosine <= a.fidelity.mean_cosine
        assert a.sha256 and a.size_bytes > 0 and a.export_seconds > 0 and "validate" in a.stages
    fp32, int8 = m.artifacts
    assert int8.size_bytes < fp32.size_bytes
    smoothing = int8.quantization["smoothing"]  # the norms feeding the QKV and FFN-in linears, measured both ways
    assert smoothing["normalizations"] == 4 and "built-in" in smoothing["calibration"]
    cos = smoothing["search_mean_cosine"]
    assert smoothing["adopted"] == (cos["smoothed"] > cos["plain"])
    with np.load(tiny_onnx_bundle / "samples/inputs.npz") as z:
        assert z["input_ids"].shape == (8, 128)


def test_dynamic_batch_and_sequence(tiny_onnx_bundle: Path) -> None:
    sess = ort.InferenceSession(str(tiny_onnx_bundle / "onnx/fp32.onnx"))
    shapes = [i.shape for i in sess.get_inputs()]
    assert all(isinstance(d, str) for s in shapes for d in s), shapes
    out = sess.run(None, {"input_ids": np.ones((3, 17), np.int64), "attention_mask": np.ones((3, 17), np.int64)})[0]
    assert out.shape == (3, 32)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)  # the Normalize module is part of the graph


@pytest.mark.parametrize("recipe", ["fp16", "int4-weight", "int8-static"])
def test_other_recipes(tiny_bert_dir: Path, tmp_path: Path, recipe: str) -> None:
    r = export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "b", formats=["onnx"], recipes=[recipe], **QUIET)
    (a,) = r.manifest.artifacts
    assert a.fidelity is not None and a.fidelity.mean_cosine >= a.fidelity.floor_mean_cosine
    if recipe == "int8-static":  # a BERT encoder: the attention-fused graph with static scales
        _assert_static_fused_kernels(r.bundle / a.path, a.runtime["options"], tmp_path)
        q = a.quantization
        assert q["format"].startswith("QOperator") and a.runtime["graph"]["graph"] == "fused"
        _assert_calibrated_search(q)
        assert any("calibrat" in w for w in r.manifest.model["export_host"]["warnings"])


def _assert_calibrated_search(q: dict[str, object]) -> None:
    tried = q["calibration_methods_tried"]
    assert isinstance(tried, dict) and "built-in" in str(q["calibration"])
    assert q["calibration_method"] == max(tried, key=tried.get)
    # the smoothed graph is calibrated too, and the better of the two kept (the unfused graph has no
    # EmbedLayerNormalization: the embeddings' norm is a LayerNormalization there too)
    assert set(tried) == {"minmax", "entropy", "minmax (smoothed)", "entropy (smoothed)"}
    smoothing = q["smoothing"]
    assert isinstance(smoothing, dict) and smoothing["normalizations"] == 4  # embeddings, 2 attention-output, layer 0
    assert smoothing["adopted"] == str(q["calibration_method"]).endswith("(smoothed)")
    sensitivity, kept = q["sensitivity"], q["kept_in_float"]
    assert isinstance(sensitivity, list) and isinstance(kept, list)
    # 2 layers x (q, k, v, o, up, down); the unused pooler is not in the graph
    assert len(sensitivity) == 2 * 6
    assert q["quantized_layers"] + len(kept) == len(sensitivity)


def test_smoothing_can_be_turned_off(tiny_bert_dir: Path, tmp_path: Path) -> None:
    r = export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "b", formats=["onnx"], recipes=["int8-dynamic"],
               options={"onnx_smoothing": False}, **QUIET)
    (a,) = r.manifest.artifacts
    assert a.quantization["smoothing"] == {"normalizations": 0, "why": "options onnx_smoothing=false"}


def test_int8_static_qdq_without_fusion(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Models without an attention-fused graph get QDQ int8, whose layer outputs stay float."""
    r = export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "b", formats=["onnx"], recipes=["int8-static"],
               options={"onnx_graph": "dynamo"}, **QUIET)
    (a,) = r.manifest.artifacts
    assert a.fidelity is not None and a.fidelity.passed and a.runtime["graph"]["graph"] == "dynamo"
    q = a.quantization
    assert q["format"] == "QDQ" and "QNN" in q["npu_note"]
    _assert_calibrated_search(q)
    _assert_qdq_runs_as_int8(r.bundle / a.path, a.runtime["options"], tmp_path)
    _assert_embeddings_are_int8(r.bundle / a.path)


def test_classifiers(tiny_bert_cls_dir: Path, tiny_vit_dir: Path, tmp_path: Path) -> None:
    r = export(tiny_bert_cls_dir, target="x86-64-laptop", out=tmp_path / "cls", formats=["onnx"], recipes=["fp32"], **QUIET)
    m = r.manifest
    assert m.model["task"] == "sequence-classification" and m.labels == ("negative", "neutral", "positive")
    assert m.artifacts[0].fidelity.top1_agreement == 1.0
    assert (r.bundle / "labels.txt").read_text().split() == ["negative", "neutral", "positive"]
    r = export(tiny_vit_dir, target="x86-64-laptop", out=tmp_path / "vit", formats=["onnx"], recipes=["int8-dynamic"], **QUIET)
    assert r.manifest.model["task"] == "image-classification"
    assert r.manifest.inputs[0].shape == ("batch", 3, 32, 32)
    assert r.manifest.preprocessing["mean"] == [0.5, 0.5, 0.5]


def test_calibration_file_is_used(tiny_bert_dir: Path, tmp_path: Path) -> None:
    cal = tmp_path / "cal.txt"
    cal.write_text("a man is playing a guitar\nthe dog runs in the rain\n")
    r = export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "b", formats=["onnx"], recipes=["int8-static"],
               calibration=cal, **QUIET)
    q = r.manifest.artifacts[0].quantization
    assert q["calibration"] == str(cal) and q["calibration_samples"] == 2


def test_bad_calibration(tiny_bert_dir: Path, tmp_path: Path) -> None:
    kw = {"target": "raspberry-pi-5", "formats": ["onnx"], "recipes": ["int8-static"], **QUIET}
    with pytest.raises(CalibrationError, match="not found"):
        export(tiny_bert_dir, out=tmp_path / "a", calibration=tmp_path / "nope.txt", **kw)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(CalibrationError, match="empty"):
        export(tiny_bert_dir, out=tmp_path / "b", calibration=tmp_path / "empty.txt", **kw)
    np.save(tmp_path / "images.npy", np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(CalibrationError, match="calibrates on text"):
        export(tiny_bert_dir, out=tmp_path / "c", calibration=tmp_path / "images.npy", **kw)
    assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_bad_model_dirs(tiny_bert_dir: Path, tmp_path: Path) -> None:
    kw = {"target": "raspberry-pi-5", "formats": ["onnx"], "recipes": ["fp32"], **QUIET}
    with pytest.raises(ModelLoadError, match="not found"):
        export(tmp_path / "missing", out=tmp_path / "o1", **kw)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        export(broken, out=tmp_path / "o2", **kw)
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in tiny_bert_dir.iterdir():
        if f.is_file():
            (trunc / f.name).write_bytes(f.read_bytes())
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        export(trunc, out=tmp_path / "o3", **kw)


def test_unknown_keys_and_unsupported_recipe(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown format 'onxx'. Did you mean 'onnx'"):
        export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "o", formats=["onxx"], **QUIET)
    with pytest.raises(ConfigError, match="unknown recipe 'int8'"):
        export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "o", formats=["onnx"], recipes=["int8"], **QUIET)

    class OnlyFp32(Exporter):
        format: ClassVar[str] = "only-fp32"
        suffix: ClassVar[str] = ".bin"
        support: ClassVar[tuple[RecipeSupport, ...]] = (RecipeSupport("fp32", "test exporter"),)

        @classmethod
        def check_environment(cls) -> None:
            pass

        def export(self, ctx: ExportContext, recipe: str, out: Path) -> ExportOutput:
            raise AssertionError("never reached")

    snap = EXPORTERS.snapshot()
    try:
        EXPORTERS.add("only-fp32", OnlyFp32)
        with pytest.raises(UnsupportedRecipeError, match="format 'only-fp32' has no recipe 'int8-dynamic' .*offers: fp32"):
            export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "o", formats=["only-fp32"],
                   recipes=["int8-dynamic"], **QUIET)
    finally:
        EXPORTERS.restore(snap)
    assert not (tmp_path / "o").exists()


def test_output_exists_and_failed_export_leaves_no_bundle(tiny_bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export(tiny_bert_dir, target="raspberry-pi-5", out=out, formats=["onnx"], recipes=["fp32"], **QUIET)
    # --overwrite replaces a bundle, never a directory of other files
    with pytest.raises(OutputExistsError, match="not an edgeship bundle"):
        export(tiny_bert_dir, target="raspberry-pi-5", out=out, formats=["onnx"], recipes=["fp32"], overwrite=True,
               **QUIET)
    assert (out / "precious.txt").read_text() == "keep me"
    # A floor nothing can meet fails the export, and the old bundle survives untouched.
    old = export(tiny_bert_dir, target="raspberry-pi-5", out=tmp_path / "bundle", formats=["onnx"], recipes=["fp32"],
                 **QUIET).bundle
    before = (old / "manifest.json").read_bytes()
    prof = (Path(__file__).parents[2] / "targets/profiles/raspberry-pi-5.toml").read_text()
    strict = tmp_path / "strict.toml"
    strict.write_text(prof.replace('name = "raspberry-pi-5"', 'name = "strict"')
                      .replace('min_mean_cosine = { default = 0.99, "int4-weight" = 0.97 }',
                               'min_mean_cosine = { default = 1.0 }'))
    with pytest.raises(FidelityError, match="below the strict floor 1.0.*--allow-degraded"):
        export(tiny_bert_dir, target=str(strict), out=old, formats=["onnx"], recipes=["int8-dynamic"], overwrite=True,
               **QUIET)
    assert (old / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "bundle", "strict.toml"]
    r = export(tiny_bert_dir, target=str(strict), out=old, formats=["onnx"], recipes=["int8-dynamic"], overwrite=True,
               allow_degraded=True, **QUIET)
    assert r.manifest.artifacts[0].warnings[0].startswith("DEGRADED")
    assert [a.key for a in load_bundle(old).manifest.artifacts] == ["onnx/int8-dynamic"]


def test_export_stage_error_names_stage(tmp_path: Path) -> None:
    import torch

    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # Python control flow on a tensor value: torch.export cannot capture it
                return x * 2
            return x - 1

    with pytest.raises(ExportError, match=r"stage 'lower' failed: .*data-dependent .*test_onnx.py:\d+ in forward.*torch.where"):
        export(DataDependent(), example_inputs={"x": np.ones((1, 4), np.float32)}, target="raspberry-pi-5",
               out=tmp_path / "o", formats=["onnx"], recipes=["fp32"], **QUIET)


def test_nn_module_export(tmp_path: Path) -> None:
    import torch

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    r = export(net, example_inputs={"image": np.zeros((1, 1, 8, 8), np.float32)}, target="x86-64-laptop",
               out=tmp_path / "m", formats=["onnx"], recipes=["fp32", "int8-dynamic"], **QUIET)
    assert [a.key for a in r.manifest.artifacts] == ["onnx/fp32", "onnx/int8-dynamic"]
    assert r.manifest.inputs[0].shape == ("batch", 1, 8, 8)
    assert json.loads((r.bundle / "manifest.json").read_text())["model"]["task"] == "custom"


def test_bert_graph_is_fused_without_skip_layer_norm(tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    """Trap: ORT's SkipLayerNormalization CPU kernel is far slower than Add + LayerNormalization
    (benchmarks/bench_ort_skiplayernorm.py). Fused artifacts keep the pair and tell the runtime not to re-fuse."""
    import onnx

    from edgeship.profiling import backends

    art = load_bundle(tiny_onnx_bundle).manifest.artifact("onnx/int8-dynamic")
    assert art.runtime["graph"]["graph"] == "fused" and art.runtime["graph"]["fused_ops"]["Attention"] == 2
    assert art.runtime["options"]["disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert art.runtime["options"]["denormal_as_zero"] is True  # padded tokens -> denormals -> slow on x86
    ops = {n.op_type for n in onnx.load(str(tiny_onnx_bundle / art.path)).graph.node}
    assert "QAttention" in ops and "SkipLayerNormalization" not in ops
    # what the runtime actually runs, after its own graph optimisations
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tiny_onnx_bundle / art.path), so, disabled_optimizers=art.runtime["options"]["disabled_optimizers"])
    assert "SkipLayerNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    b = backends.load(tiny_onnx_bundle / art.path, "onnx", options=art.runtime["options"])
    assert b.info()["disabled_optimizers"] == ["SkipLayerNormFusion"] and b.info()["denormal_as_zero"] is True


def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from edgeship.errors import RuntimeMissingError
    from edgeship.exporters import load_builtin

    load_builtin()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(RuntimeMissingError, match=r"onnx exporter needs onnxscript: pip install 'edgeship\[export\]'"):
        EXPORTERS.get("onnx").check_environment()


def _shape_probe(tmp_path: Path) -> Path:
    """A graph whose output is the (batch, sequence) shape its body sees, plus the masked token-id sum."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Shape", ["input_ids"], ["seen_shape"]),
         helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
         helper.make_node("ReduceSum", ["masked"], ["token_sum"], keepdims=0)],
        "probe",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("seen_shape", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("token_sum", TensorProto.INT64, [])])
    p = tmp_path / "probe.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    return p


@pytest.mark.parametrize(("mask", "seen"), [
    ([[1, 1, 1, 0, 0, 0, 0, 0]], 3),                            # right padding: trimmed to the real tokens
    ([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], 5),  # a batch keeps its longest row
    ([[0, 0, 0, 0, 0, 1, 1, 1]], 8),                            # left padding: nothing to trim, nothing lost
    ([[1, 1, 1, 1, 1, 1, 1, 1]], 8),
    ([[0, 0, 0, 0, 0, 0, 0, 0]], 1),                            # an all-padding row still has a valid shape
])
def test_trim_padding_slices_to_the_last_used_column(tmp_path: Path, mask: list[list[int]], seen: int) -> None:
    from edgeship.exporters.onnx import trim_padding

    p = _shape_probe(tmp_path)
    trim_padding(p, ["input_ids", "attention_mask"])
    m = np.array(mask, np.int64)
    ids = np.arange(1, m.size + 1, dtype=np.int64).reshape(m.shape)
    shape, total = ort.InferenceSession(str(p)).run(None, {"input_ids": ids, "attention_mask": m})
    assert shape.tolist() == [m.shape[0], seen]
    assert int(total) == int((ids * m).sum())  # no real token is ever cut


def test_padded_and_unpadded_input_agree(tiny_onnx_bundle: Path) -> None:
    """A sentence padded to a fixed length gives the unpadded result: the graph drops the padding."""
    import onnx

    art = load_bundle(tiny_onnx_bundle).manifest.artifact("onnx/fp32")
    assert art.runtime["graph"]["trims_padding"] is True and art.runtime["input_padding"]["mode"] == "any"
    assert any(n.name == "" and n.output[0].startswith("edgeship_trim/")
               for n in onnx.load(str(tiny_onnx_bundle / art.path)).graph.node)
    sess = ort.InferenceSession(str(tiny_onnx_bundle / art.path))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 100, size=(2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    short = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    pad = np.zeros((2, 117), np.int64)
    long = sess.run(None, {"input_ids": np.hstack([ids, pad]), "attention_mask": np.hstack([mask, pad])})[0]
    assert np.allclose(short, long, atol=1e-6)


def test_token_outputs_keep_their_padding() -> None:
    from types import SimpleNamespace

    from edgeship.exporters.onnx import trims_padding
    from edgeship.spec import TensorSpec

    ins = (TensorSpec("input_ids", "int64", ("batch", "sequence")), TensorSpec("attention_mask", "int64", ("batch", "sequence")))
    pooled = SimpleNamespace(inputs=ins, outputs=(TensorSpec("logits", "float32", ("batch", 3)),))
    tokens = SimpleNamespace(inputs=ins, outputs=(TensorSpec("logits", "float32", ("batch", "sequence", 3)),))
    no_mask = SimpleNamespace(inputs=ins[:1], outputs=pooled.outputs)
    assert trims_padding(pooled) and not trims_padding(tokens) and not trims_padding(no_mask)


def _assert_qdq_runs_as_int8(path: Path, options: dict[str, object], tmp_path: Path) -> None:
    """Trap: at graph_optimization "basic" ORT runs QDQ as DequantizeLinear + float MatMul (int8-static
    MiniLM was 4x slower than at "all"). The artifact's own options must turn the QDQ pairs into int8 kernels."""
    import onnx

    from edgeship.profiling.backends.onnx import OnnxBackend

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[str(options["graph_optimization"])]
    so.optimized_model_filepath = str(tmp_path / "qdq-optimized.onnx")
    ort.InferenceSession(str(path), so, disabled_optimizers=list(options["disabled_optimizers"]))  # type: ignore[call-overload]
    ops = {n.op_type for n in onnx.load(str(tmp_path / "qdq-optimized.onnx")).graph.node}
    assert "QLinearMatMul" in ops or "MatMulIntegerToFloat" in ops, sorted(ops)
    assert OnnxBackend(path, options=options).info()["graph_optimization"] == options["graph_optimization"]


def _assert_static_fused_kernels(path: Path, options: dict[str, object], tmp_path: Path) -> None:
    """int8-static on a fused graph runs int8-dynamic's fused kernels with constant activation scales: no
    run-time range computation left once ORT has optimized it, and no Q/DQ pair on any layer's output."""
    import onnx

    art = onnx.load(str(path))
    ops = [n.op_type for n in art.graph.node]
    inits = {i.name for i in art.graph.initializer}
    assert "QEmbedLayerNormalization" in ops and "Gather" not in ops  # embedding tables in int8
    assert "MatMulInteger" not in ops, sorted(set(ops))
    for n in art.graph.node:
        if n.op_type == "DequantizeLinear":  # only weights (QEmbedLayerNormalization's LayerNorm gamma/beta)
            assert n.input[0] in inits, n.name
        if n.op_type == "QAttention":  # input_scale and input_zero_point are calibrated constants
            assert n.input[3] in inits and n.input[6] in inits, n.name
        if n.op_type in ("QuantizeLinear", "MatMulIntegerToFloat"):
            assert n.input[1 if n.op_type == "QuantizeLinear" else 2] in inits, n.name
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "static-optimized.onnx")
    ort.InferenceSession(str(path), so, disabled_optimizers=list(options["disabled_optimizers"]))  # type: ignore[call-overload]
    run = [n.op_type for n in onnx.load(str(tmp_path / "static-optimized.onnx")).graph.node]
    assert run.count("QAttention") == 2 and run.count("MatMulIntegerToFloat") == 2 * 3, sorted(set(run))
    assert not {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMul", "Attention"} & set(run), sorted(set(run))


def _assert_embeddings_are_int8(path: Path) -> None:
    """Every embedding table is stored in 8 bits (float tables were 61% of an int8-static MiniLM)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    gathers = [n for n in m.graph.node if n.op_type == "Gather"]
    tables = []
    for g in gathers:
        src = producers.get(g.input[0])
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            tables.append(inits[src.input[0]])
        assert g.input[0] not in inits or inits[g.input[0]].dtype != np.float32, f"{g.name} gathers from a float table"
    assert tables and all(t.dtype in (np.int8, np.uint8) and t.ndim == 2 for t in tables)


def test_histogram_calibration_takes_samples_of_different_lengths(tmp_path: Path) -> None:
    """Trap: ORT's entropy/percentile collectors stack samples into one array and fail when their
    lengths differ, which trimmed text graphs always produce. Calibration collects per sample."""
    import onnx
    from onnx import TensorProto, helper

    from edgeship.exporters.onnx import CALIBRATION_METHODS, _calibration_ranges

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])])
    p = tmp_path / "g.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(p))
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, n)).astype(np.float32) * 3} for n in (5, 17, 64, 9)]
    for method in CALIBRATION_METHODS:
        ranges = _calibration_ranges(p, feeds, tmp_path, method)
        lo, hi = (float(np.ravel(v)[0]) for v in ranges["h"].range_value)
        assert lo == 0.0 and 0.0 < hi <= max(float(f["x"].max()) for f in feeds) + 1e-6
