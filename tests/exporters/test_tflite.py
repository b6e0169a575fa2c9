"""LiteRT exporter on tiny random-init models: recipes, signatures, metadata, bad inputs, torch-free profiling."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError, ExportError, UnsupportedRecipeError
from edgeship.exporters.tflite import read_metadata
from edgeship.manifest import load_bundle
from edgeship.pipeline import export
from edgeship.profiling import backends
from edgeship.targets import get_profile

pytestmark = pytest.mark.needs_export
QUIET = {"log": lambda m: None}


@pytest.fixture(scope="module")
def tiny_tflite_bundle(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tflite") / "b"
    export(tiny_bert_dir, target="raspberry-pi-5", out=out, formats=["tflite"],
           recipes=["fp32", "fp16", "int8-dynamic", "int4-weight"], **QUIET)
    return out


def test_recipes_checked_and_described(tiny_tflite_bundle: Path) -> None:
    m = load_bundle(tiny_tflite_bundle).manifest
    arts = {a.recipe: a for a in m.artifacts}
    assert set(arts) == {"fp32", "fp16", "int8-dynamic", "int4-weight"}
    for a in arts.values():
        assert a.path.endswith(".tflite") and a.fidelity is not None and a.fidelity.passed
        assert a.runtime["name"] == "litert" and a.runtime["signature"] == "serving_default"
        assert a.runtime["input_padding"] == {"mode": "max_length", "length": 128, "why": a.runtime["input_padding"]["why"]}
        assert a.runtime["input_dtypes"] == {"input_ids": "int32", "attention_mask": "int32"}
        assert "overflow" in a.runtime["cast"]["input_ids"]
        assert {"lower", "serialize", "validate"} <= set(a.stages) or a.recipe != "fp32"
    assert arts["fp32"].fidelity.mean_cosine > 0.9999
    # the tiny model is mostly embedding tables: int8 shrinks them, int4 FC weights shrink it a bit more
    assert arts["int8-dynamic"].size_bytes < 0.8 * arts["fp32"].size_bytes
    assert arts["int4-weight"].size_bytes < arts["int8-dynamic"].size_bytes
    assert arts["fp16"].quantization["weights"] == "float16"
    q4 = arts["int4-weight"].quantization
    assert q4["weights"] == "int4 symmetric, block 32 (FULLY_CONNECTED)" and q4["floor_mean_cosine"] == 0.97
    assert q4["quantized_layers"] + len(q4["kept_in_float"]) == 12  # every linear layer was matched to its op


def test_signature_and_embedded_metadata_match_the_bundle(tiny_tflite_bundle: Path) -> None:
    bundle = load_bundle(tiny_tflite_bundle)
    m = bundle.manifest
    for a in m.artifacts:
        path = bundle.path_of(a)
        b = backends.load(path)
        assert [s.name for s in b.inputs] == [s.name for s in m.inputs]
        assert list(b.outputs) == [s.name for s in m.outputs] == ["sentence_embedding"]
        assert all(s.dtype == "int32" for s in b.inputs)
        meta = read_metadata(path.read_bytes())
        assert meta is not None and meta["task"] == "feature-extraction"
        assert [i["dtype"] for i in meta["inputs"]] == ["int32", "int32"]
        assert meta["preprocessing"] == m.preprocessing
        sig = a.details["signatures"]["serving_default"]
        assert [i["name"] for i in sig["inputs"]] == ["input_ids", "attention_mask"]
        assert a.details["metadata"]["embedded"] == "edgeship" and a.details["metadata"]["task"] == meta["task"]
        with np.load(tiny_tflite_bundle / "samples/inputs.npz") as z:  # the bundle's int64 samples run as they are
            out = b.run(b.adapt_feeds({k: z[k][:1] for k in z.files}))
        assert out["sentence_embedding"].shape == (1, 32)


def test_int8_static_calibrated_with_labels(tiny_bert_cls_dir: Path, tmp_path: Path) -> None:
    r = export(tiny_bert_cls_dir, target="raspberry-pi-5", out=tmp_path / "cls", formats=["tflite"],
               recipes=["int8-static"], **QUIET)
    (a,) = r.manifest.artifacts
    q = a.quantization
    assert "MinMax calibrated" in q["activations"] and q["calibration_samples"] > 0 and "built-in" in q["calibration"]
    assert q["quantized_layers"] + len(a.kept_layers) == len(q["sensitivity"]) > 0
    assert q["kept_in_float"] == []  # the sensitive layers take int8 dynamic activations (kept_in_int8)
    assert q["search"][0]["kept"] == 0 and q["floor_mean_cosine"] == 0.99
    assert a.fidelity.passed and a.fidelity.top1_agreement is not None
    meta = read_metadata((r.bundle / a.path).read_bytes())
    assert meta is not None and meta["labels"] == ["negative", "neutral", "positive"]
    assert a.details["metadata"]["labels"] == meta["labels"]


def test_image_classifier_head_is_searched(tiny_vit_dir: Path, tmp_path: Path) -> None:
    r = export(tiny_vit_dir, target="raspberry-pi-5", out=tmp_path / "vit", formats=["tflite"],
               recipes=["int8-static", "int4-weight"], **QUIET)
    for a in r.manifest.artifacts:
        q = a.quantization
        # the classifier's op is named after the graph output, not its module: matched by weight shape
        assert "model.classifier" in {s["layer"] for s in q["sensitivity"]}, a.recipe
        assert q["quantized_layers"] + len(a.kept_layers) == 13 and a.fidelity.passed
        assert a.fidelity.top1_agreement is not None


def _fc_weights(path: Path) -> list[np.ndarray]:
    """The float weight matrix of every FULLY_CONNECTED op of a LiteRT file."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    return [it.get_tensor(int(o["inputs"][1])) for o in it._get_ops_details() if o["op_name"] == "FULLY_CONNECTED"]


def test_linears_after_a_layer_norm_keep_their_own_weights(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """litert-torch's own LayerNorm lowering let the converter fold each norm's scale into the weights of the linears
    reading it, which int8 per-channel weights quantize worse (MiniLM int8-dynamic mean cosine 0.9982 -> 0.9990 once
    the norms are written out). A model whose norms scale and shift: the fp32 artifact holds every linear's own
    weights; int4-weight keeps the folded graph on purpose (block-wise 4-bit weights track PyTorch better so)."""
    import shutil

    import torch
    from transformers import BertModel

    d = tmp_path / "scaled-norms"
    shutil.copytree(tiny_bert_dir, d)
    model = BertModel.from_pretrained(d).eval()
    torch.manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.25, 4.0)
                m.bias.normal_(0.0, 0.5)
            elif isinstance(m, torch.nn.Linear):  # the init's zero biases are dropped, and nothing is folded then
                m.bias.normal_(0.0, 0.1)
    model.save_pretrained(d)
    res = export(d, target="raspberry-pi-5", out=tmp_path / "b", formats=["tflite"],
                 recipes=["fp32", "int8-dynamic", "int4-weight"], **QUIET)
    arts = {a.recipe: a for a in res.manifest.artifacts}
    for r in ("fp32", "int8-dynamic"):
        assert arts[r].details["layer_norms"]["form"] == "written out"
        assert arts[r].details["layer_norms"]["rewritten"] == 5  # 2 layers x 2 + the embeddings' norm
    assert arts["int4-weight"].details["layer_norms"]["form"] == "litert-torch's own"
    assert arts["int8-dynamic"].fidelity.passed and arts["int4-weight"].fidelity.passed
    stored = _fc_weights(tmp_path / "b" / arts["fp32"].path)
    linears = [m.weight.detach().numpy() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.startswith("pooler")]  # mean pooling: no pooler
    assert len(stored) == len(linears)
    for w in linears:  # the query/key/value and intermediate linears read a norm: the ones folding changed
        assert any(s.shape == w.shape and np.array_equal(s, w) for s in stored)


def test_block_size_the_quantizer_lacks(tiny_bert_dir: Path, tmp_path: Path) -> None:
    prof = dataclasses.replace(get_profile("raspberry-pi-5"), int4_group_size=48)
    with pytest.raises(UnsupportedRecipeError, match=r"tflite/int4-weight: block size 48 .* \(32, 64, 128, 256\)"):
        export(tiny_bert_dir, target=prof, out=tmp_path / "x", formats=["tflite"], recipes=["int4-weight"], **QUIET)
    assert not (tmp_path / "x").exists()


def test_pruned_rows_and_blocks_keep_a_loadable_int4_file(tmp_path: Path) -> None:
    """Structured pruning zeroes whole neurons. ai-edge-quantizer writes a block-wise int4 scale of 0 for an all-zero
    block (its 1e-9 range floor / 7 underflows in the file's float16), XNNPACK refused the file and the whole export
    ended; :func:`positive_scales` now writes those scales as 1 over zero integers (exact)."""
    import litert_torch
    import torch
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_quantizer import quantizer
    from torch import nn

    from edgeship.exporters.tflite import _int4_config, positive_scales

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        net[0].weight[:3] = 0  # three pruned neurons: both their blocks zero
        net[2].weight[:, :32] = 0  # the first block of every output
    out = tmp_path / "b"
    export(net, example_inputs={"x": np.ones((1, 64), np.float32)}, target="raspberry-pi-5", out=out,
           formats=["tflite"], recipes=["int4-weight"], **QUIET)
    art = load_bundle(out).manifest.artifact("tflite/int4-weight")
    assert art.fidelity is not None and art.fidelity.passed

    def block_scales(data: bytes) -> list[np.ndarray]:
        model = fb.Model.GetRootAs(bytearray(data), 0)
        g, found = model.Subgraphs(0), []
        for t in (g.Tensors(i) for i in range(g.TensorsLength())):
            q = t.Quantization()
            if q is not None and q.DetailsType() == fb.QuantizationDetails.BlockwiseQuantization:
                bq = fb.BlockwiseQuantization()
                bq.Init(q.Details().Bytes, q.Details().Pos)
                found.append(np.array(model.Buffers(g.Tensors(bq.Scales()).Buffer()).DataAsNumpy().view(np.float16)))
        return found

    litert_torch.convert(net, (torch.ones(1, 64),)).export(str(tmp_path / "f.tflite"))
    q = quantizer.Quantizer((tmp_path / "f.tflite").read_bytes())
    _int4_config(q, 32, [])
    raw = bytes(q.quantize(None, enable_progress_bar=False, enable_progress_report=False).quantized_model)
    before, after = block_scales(raw), block_scales(positive_scales(raw))
    assert sum(int((s == 0).sum()) for s in before) == 3 * 2 + 8  # 3 rows x 2 blocks, the 8 outputs' first block
    for s0, s1 in zip(before, after, strict=True):
        assert np.array_equal(s1, np.where(s0 == 0, 1, s0))
    # the file as the quantizer wrote it: the delegate's refusal is the file's fault, not the inputs'
    (tmp_path / "raw.tflite").write_bytes(raw)
    with pytest.raises(ArtifactLoadError, match=r"raw\.tflite: LiteRT cannot prepare the model \(unsupported scale"):
        backends.load(tmp_path / "raw.tflite").run({"args_0": np.ones((1, 64), np.float32)})


@pytest.mark.parametrize("size", [1, 3, 4, 5])
def test_int4_runs_of_any_length_keep_their_neighbours(size: int) -> None:
    """A per-channel int4 weight with an odd channel size shares bytes between channels: zeroing one channel's
    integers must leave the next one's nibbles as they were."""
    from edgeship.exporters.tflite import fill_int4

    rng = np.random.default_rng(size)
    values = rng.integers(-8, 8, 4 * size)  # 4 channels of ``size`` int4s
    packed = np.zeros((len(values) + 1) // 2, np.uint8)
    for j, v in enumerate(values):
        packed[j // 2] |= (int(v) & 0xF) << (4 * (j % 2))
    for ch, z in ((1, -3), (2, 0)):
        fill_int4(packed, ch * size, (ch + 1) * size, z)
        values[ch * size:(ch + 1) * size] = z
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:len(values)].astype(np.int64)
    assert np.array_equal(np.where(nibbles > 7, nibbles - 16, nibbles), values)


def test_op_without_lowering_names_op_and_module(tmp_path: Path) -> None:
    import torch
    from torch import nn

    class Volume(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.det(x)  # no LiteRT lowering

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.volume = Volume()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.volume(self.lin(x))

    with pytest.raises(ExportError) as ei:
        export(Net(), example_inputs={"x": np.ones((1, 4, 4), np.float32)}, target="raspberry-pi-5",
               out=tmp_path / "x", formats=["tflite"], recipes=["fp32"], **QUIET)
    msg = str(ei.value)
    assert msg.startswith("tflite/fp32: stage 'lower' failed: litert-torch has no LiteRT lowering for aten._linalg_det")
    assert "in module volume (Volume)" in msg and "test_tflite.py:" in msg and "torch.linalg.det(x)" in msg
    assert "--format onnx" in msg and "\n" not in msg
    assert not (tmp_path / "x").exists()


def test_profile_runs_torch_free(tiny_tflite_bundle: Path, tmp_path: Path) -> None:
    from edgeship.profiling.runner import profile

    res = profile(tiny_tflite_bundle, artifact="tflite/int8-dynamic", runs=5, min_seconds=0.05, warmup=1,
                  energy="estimate", progress=False, json_path=tmp_path / "r.json")
    (r,) = res.results
    assert r.ok, r.error
    assert r.torch_free is True and r.runtime["runtime"] == "ai-edge-litert"
    assert r.input is not None and r.input.shapes == {"input_ids": (1, 128), "attention_mask": (1, 128)}
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["latency"]["count"] >= 5


def test_converter_progress_stays_off_stdout(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Trap: litert-torch prints its task tree ("[START] LiteRT-Torch Convert ...") to stdout, which
    ends up in whatever a user pipes edgeship's output into. The exporter turns it off."""
    import torch

    monkeypatch.delenv("LITERT_TORCH_SHOW_PROGRESS", raising=False)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    export(net, example_inputs={"image": np.zeros((1, 1, 8, 8), np.float32)}, target="x86-64-laptop",
           out=tmp_path / "m", formats=["tflite"], recipes=["fp32"], **QUIET)
    out = capfd.readouterr().out
    assert "LiteRT-Torch" not in out and "[START]" not in out, out[:300]
    import os

    assert "LITERT_TORCH_SHOW_PROGRESS" not in os.environ  # restored for the rest of the process
