"""Signature-less ``.tflite`` files (most files in the wild): run by tensor index, quantized I/O by scale/zero point.

Torch-free and runtime-agnostic like ``test_tflite_backend.py``: the files are committed
(``tflite_data/make_nosig.py`` made them through the flatbuffer schema, no TensorFlow).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError
from edgeship.profiling import backends
from edgeship.profiling.backends.tflite import TfliteBackend
from edgeship.profiling.results import ArtifactResult
from edgeship.profiling.runner import profile
from edgeship.spec import fill_dims, resolve_dims

DATA = Path(__file__).parent / "tflite_data"
NOSIG = DATA / "tiny_nosig.tflite"
UINT8 = DATA / "uint8_io.tflite"
FAST = {"runs": 5, "min_seconds": 0.0, "warmup": 1, "progress": False, "energy": "estimate"}
Measured = Callable[[ArtifactResult, int], None]


@pytest.fixture(scope="module")
def uint8_ref() -> dict[str, np.ndarray]:
    with np.load(DATA / "uint8_io.npz") as z:
        return {k: z[k] for k in z.files}


def _reference_scores(pixels: np.ndarray, ref: Mapping[str, np.ndarray]) -> np.ndarray:
    """The uint8 model in numpy: dequantize, fully connected, and the float the uint8 output stands for."""
    in_scale, in_zero = ref["quant"][:2]
    x = (pixels.astype(np.float32) - in_zero) * in_scale
    return x @ ref["weight"].T + ref["bias"]


def test_stripped_export_runs_by_index_with_tensor_names() -> None:
    with np.load(DATA / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    b = backends.load(NOSIG, threads=1)
    assert isinstance(b, TfliteBackend) and b.signature is None
    assert [(s.name, s.dtype, s.shape) for s in b.inputs] == [("serving_default_input_ids", "int32", (1, 6)),
                                                               ("serving_default_attention_mask", "int32", (1, 6))]
    assert b.outputs == ("serving_default_output_output",)
    out = b.run(b.adapt_feeds({"serving_default_input_ids": expected["input_ids"],
                               "serving_default_attention_mask": expected["attention_mask"]}))
    np.testing.assert_allclose(out["serving_default_output_output"], expected["output"], rtol=1e-5, atol=1e-6)
    info = b.info()
    assert info["signature"] is None and any("no SignatureDef" in n for n in info["notes"])
    with pytest.raises(ArtifactLoadError, match=r"no signature 'serving_default': the model has no SignatureDef"):
        TfliteBackend(NOSIG, options={"signature": "serving_default"})


def test_uint8_io_quantized_by_scale_and_zero_point(uint8_ref: dict[str, np.ndarray]) -> None:
    b = TfliteBackend(UINT8)
    assert [(s.name, s.dtype, s.shape) for s in b.inputs] == [("pixels", "uint8", ("pixels[0]", 8))]
    assert b.outputs == ("scores",) and set(b.quantized_io) == {"pixels", "scores"}
    # the dynamic batch: the file allocates 1, which is used and said
    dims, notes = fill_dims(b.inputs, resolve_dims(b.inputs, {}, {}), b.dim_hints)
    assert dims == {"pixels[0]": 1} and notes == ["pixels[0] = 1 (the size the model file allocates)"]
    feeds = b.synthesize(b.inputs, dims, seed=3)
    x = feeds["pixels"]
    assert x.dtype == np.uint8 and x.shape == (1, 8)
    # N(0,1) floats through scale 1/32, zero point 128: centred on 128, within a few sigma of it
    assert 128 - 4 * 32 <= x.min() and x.max() <= 128 + 4 * 32 and len(np.unique(x)) > 4
    got = b.float_outputs(b.run(b.adapt_feeds(feeds)))["scores"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_scores(x, uint8_ref), atol=uint8_ref["quant"][2] / 2 + 1e-6)
    # a batch of 2 resizes the interpreter; the raw uint8 output is what LiteRT gave when the file was made
    raw = b.run(b.adapt_feeds({"pixels": uint8_ref["pixels"]}))["scores"]
    assert raw.dtype == np.uint8 and np.array_equal(raw, uint8_ref["scores"])
    assert b.run(b.adapt_feeds(feeds))["scores"].shape == (1, 4)  # and back to 1


def test_profile_signature_less_files(tmp_path: Path, measured: Measured) -> None:
    res = profile(NOSIG, **FAST)
    (r,) = res.results
    measured(r, 5)
    assert r.torch_free is True and r.runtime["signature"] is None and any("no SignatureDef" in n for n in r.notes)
    res = profile(UINT8, json_path=tmp_path / "r.json", **FAST)
    (r,) = res.results
    measured(r, 5)
    assert r.input is not None and r.input.shapes == {"pixels": (1, 8)} and r.input.dtypes == {"pixels": "uint8"}
    assert r.output_shapes == {"scores": (1, 4)}
    assert "pixels[0] = 1 (the size the model file allocates)" in str(r.input.source)
    assert r.runtime["quantized_io"]["pixels"] == {"scale": 1 / 32, "zero_point": 128}
    res = profile(UINT8, shapes={"pixels": (4, 8)}, **FAST)
    (r,) = res.results
    measured(r, 5)
    assert r.input is not None and r.input.shapes == {"pixels": (4, 8)} and r.output_shapes == {"scores": (4, 4)}
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["status"] == "ok"


def test_cli_says_no_signature_as_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeship.cli import main

    rc = main(["profile", str(UINT8), "--runs", "3", "--min-seconds", "0", "--warmup", "1", "--energy", "estimate",
               "--quiet"])
    shown = capsys.readouterr().out
    assert rc == 0 and "uint8_io.tflite: note: the model has no SignatureDef" in shown and "ERROR" not in shown


@pytest.mark.skipif(importlib.util.find_spec("tflite_runtime") is None, reason="tflite-runtime is not installed here")
def test_tflite_runtime_runs_them_too(uint8_ref: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    b = TfliteBackend(UINT8)
    assert b.info()["runtime"] == "tflite-runtime" and b.signature is None
    assert np.array_equal(b.run(b.adapt_feeds({"pixels": uint8_ref["pixels"]}))["scores"], uint8_ref["scores"])
    assert TfliteBackend(NOSIG).outputs == ("serving_default_output_output",)
