"""Done-means of the LiteRT exporter on the real all-MiniLM-L6-v2 (slow tier, run in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.manifest import load_bundle

pytestmark = [pytest.mark.slow, pytest.mark.needs_export]


@pytest.fixture(scope="module")
def minilm_tflite_bundle(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm-tflite") / "B"
    rc = main(["export", str(minilm_dir), "--target", "raspberry-pi-5", "--format", "tflite", "--quant", "fp32",
               "--quant", "int8-dynamic", "--quant", "int8-static", "-o", str(out), "--quiet"])
    assert rc == 0
    return out


def test_sizes_and_fidelity(minilm_tflite_bundle: Path) -> None:
    arts = {a.recipe: a for a in load_bundle(minilm_tflite_bundle).manifest.artifacts}
    assert set(arts) == {"fp32", "int8-dynamic", "int8-static"}
    fp32 = arts["fp32"].size_bytes
    assert arts["int8-dynamic"].size_bytes <= 0.30 * fp32
    assert arts["int8-static"].size_bytes <= 0.35 * fp32  # issue 12's target (float kept layers made it 36%)
    assert arts["fp32"].fidelity.mean_cosine >= 0.9999
    assert arts["int8-dynamic"].fidelity.mean_cosine >= 0.99
    assert arts["int8-static"].fidelity.mean_cosine >= 0.98
    q = arts["int8-static"].quantization
    kept = arts["int8-static"].kept_layers
    assert len(q["sensitivity"]) == 36 == q["quantized_layers"] + len(kept) and kept  # every linear matched
    assert q["kept_in_float"] == [] and q["quantized_layers"] >= 24  # most take calibrated int8 activations


def test_static_keeps_sensitive_layers_in_int8_dynamic_not_float(minilm_tflite_bundle: Path) -> None:
    """Read the FULLY_CONNECTED ops back from the file: every weight is int8; the calibrated layers take an int8
    input, the layers the search kept take a float input quantized per inference (XNNPACK's dynamic int8 GEMM).
    Kept in float instead, they made int8-static 1.8x slower than int8-dynamic on MiniLM (5.9 vs 3.3 ms)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    (art,) = [a for a in load_bundle(minilm_tflite_bundle).manifest.artifacts if a.recipe == "int8-static"]
    model = fu.read_model(str(minilm_tflite_bundle / art.path))
    fc = schema.BuiltinOperator.FULLY_CONNECTED
    inputs: list[int] = []
    for sg in model.subgraphs:
        for op in sg.operators:
            if model.operatorCodes[op.opcodeIndex].builtinCode == fc:
                assert sg.tensors[op.inputs[1]].type == schema.TensorType.INT8
                inputs.append(int(sg.tensors[op.inputs[0]].type))
    assert inputs.count(schema.TensorType.INT8) == art.quantization["quantized_layers"]
    assert inputs.count(schema.TensorType.FLOAT32) == len(art.kept_layers) > 0


def test_profile_torch_free_and_static_not_slower(minilm_tflite_bundle: Path, tmp_path: Path) -> None:
    rc = main(["profile", str(minilm_tflite_bundle), "--runs", "20", "--min-seconds", "1", "--threads", "2",
               "--quiet", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    res = {r["artifact"]: r for r in doc["results"]}
    assert set(res) == {"tflite/fp32", "tflite/int8-dynamic", "tflite/int8-static"}
    for r in res.values():
        assert r["status"] == "ok" and r["torch_free"] is True and r["latency"]["count"] >= 20
        assert r["runtime"]["runtime"] == "ai-edge-litert"
    assert res["tflite/int8-dynamic"]["device_check"]["mean_cosine"] >= 0.99
    p50 = {k: r["latency"]["p50_ms"] for k, r in res.items()}
    # a shared 2-core CI box is noisy: static must not be clearly slower than fp32
    assert p50["tflite/int8-static"] <= 1.1 * p50["tflite/fp32"], p50
