"""The fine-tune -> export -> accuracy-per-artifact sample runs on real data and keeps its accuracy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.needs_export
SAMPLE = Path(__file__).parents[2] / "samples/digits_finetune.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("digits_finetune", SAMPLE)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_digits_accuracy_per_artifact(tmp_path: Path) -> None:
    import edgeship

    mod = _load()
    x_train, x_test, y_train, y_test = mod.load_data()
    assert x_train.shape[1:] == (1, 8, 8) and len(x_test) == 360
    model = mod.train(x_train, y_train, epochs=8)
    with torch.inference_mode():
        torch_acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    assert torch_acc > 0.9
    np.save(tmp_path / "calib.npy", x_train[:100])
    res = edgeship.export(model, example_inputs={"image": x_test[:1]}, task="image-classification", target="raspberry-pi-5",
                          formats=["onnx"], recipes=["fp32", "int8-dynamic", "int8-static"], out=tmp_path / "b",
                          calibration=tmp_path / "calib.npy", log=lambda m: None)
    static = res.manifest.artifact("onnx/int8-static")
    assert static.quantization["quantized_layers"] >= 3  # the convolutions are quantized, not only the linears
    accs = mod.accuracy_per_artifact(res.bundle, x_test, y_test)
    assert set(accs) == {"onnx/fp32", "onnx/int8-dynamic", "onnx/int8-static"}
    assert accs["onnx/fp32"] == pytest.approx(torch_acc)
    for key, acc in accs.items():
        assert acc >= torch_acc - 0.02, (key, acc, torch_acc)
