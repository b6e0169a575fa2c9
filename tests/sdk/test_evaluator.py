"""The export's fidelity evaluator measures a file once: same bytes, format, options and floor give the same numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_export


def test_measures_each_file_once(tiny_bert_dir: Path, tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    from edgeship.models import load_model
    from edgeship.pipeline import Evaluator, split_corpus
    from edgeship.targets import get_profile

    lm = load_model(str(tiny_bert_dir), seq_len=16)
    held = lm.sample_inputs(3, seed=1, seq_len=16, image_size=224, corpus=split_corpus()[1])
    ev = Evaluator(lm, held, [lm.run_torch(f) for f in held], get_profile("raspberry-pi-5"))
    art = tiny_onnx_bundle / "onnx/int8-dynamic.onnx"
    assert ev.known(art, "onnx") is None
    first = ev(art, "onnx", {}, "int8-dynamic")
    assert ev.runs == 1 and first.n_samples == 3
    copy = tmp_path / "moved.onnx"  # the search's attempt file moved into the bundle: same bytes, another path
    shutil.copyfile(art, copy)
    assert ev.known(copy, "onnx", {}, "int8-dynamic") == first and ev(copy, "onnx", {}, "int8-dynamic") == first
    assert ev.runs == 1
    assert ev.known(copy, "onnx", {"graph_optimization": "basic"}, "int8-dynamic") is None  # other options: run it
    ev(copy, "onnx", {"graph_optimization": "basic"}, "int8-dynamic")
    assert ev.runs == 2
    assert ev.known(copy, "onnx", {}, "int4-weight") is None  # another floor (0.97): a different verdict
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # other bytes, other file
    copy.write_bytes(bytes(data))
    assert ev.known(copy, "onnx", {}, "int8-dynamic") is None
