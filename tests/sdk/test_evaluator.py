"""The export's fidelity evaluator measures a file once: same bytes, format, options and floor give the same numbers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_export


def test_measures_each_file_once(tiny_bert_dir: Path, tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    from edgeship.export_steps import Evaluator, split_corpus
    from edgeship.models import load_model
    from edgeship.targets import get_profile

    lm = load_model(str(tiny_bert_dir), seq_len=16)
    held = lm.sample_inputs(3, seed=1, seq_len=16, image_size=224, corpus=split_corpus()[1])
    ev = Evaluator(lm, held, [lm.run_torch(f) for f in held], get_profile("raspberry-pi-5"))
    art = tiny_onnx_bundle / "onnx/int8-dynamic.onnx"
    first = ev(art, "onnx", {}, "int8-dynamic")
    assert ev.runs == 1 and first.n_samples == 3
    copy = tmp_path / "moved.onnx"  # the search's attempt file moved into the bundle: same bytes, another path
    shutil.copyfile(art, copy)
    assert ev(copy, "onnx", {}, "int8-dynamic") == first
    assert ev.runs == 1
    ev(copy, "onnx", {"graph_optimization": "basic"}, "int8-dynamic")  # other options: run it
    assert ev.runs == 2
    ev(copy, "onnx", {}, "int4-weight")  # another floor (0.97): a different verdict
    assert ev.runs == 3
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # other bytes, other file
    copy.write_bytes(bytes(data))
    ev(copy, "onnx", {}, "int8-dynamic")
    assert ev.runs == 4


def test_the_final_check_and_the_search_score_on_separate_inputs(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """64 held-out inputs for the final check, 16 others for the search: no text is in both, none is calibration."""
    import numpy as np

    from edgeship.export_steps import N_HELDOUT, N_SEARCH, _heldout_sets, heldout_pools, split_corpus
    from edgeship.models import load_model
    from edgeship.targets import get_profile

    search_pool, final_pool = heldout_pools()
    assert not set(search_pool) & set(final_pool) and not (set(search_pool) | set(final_pool)) & set(split_corpus()[0])
    lm = load_model(str(tiny_bert_dir), seq_len=32)
    held, search, source = _heldout_sets(lm, None, get_profile("raspberry-pi-5"), 32)
    assert (len(held), len(search), source) == (N_HELDOUT, N_SEARCH, "built-in")
    rows = {tuple(f["input_ids"][0]) for f in held}
    assert len(rows) == N_HELDOUT and not rows & {tuple(f["input_ids"][0]) for f in search}

    mine = tmp_path / "mine.txt"  # a user's file with enough inputs lends the search its own tail
    mine.write_text("\n".join(f"sentence number {i} about topic {i % 7}" for i in range(90)) + "\n")
    held, search, source = _heldout_sets(lm, mine, get_profile("raspberry-pi-5"), 32)
    assert (len(held), len(search), source) == (N_HELDOUT, N_SEARCH, str(mine))
    assert np.array_equal(search[0]["input_ids"], lm.text_inputs(["sentence number 64 about topic 1"], 32)[0]["input_ids"])
    mine.write_text("\n".join(f"short file line {i}" for i in range(20)) + "\n")  # too few to split: shared
    held, search, _ = _heldout_sets(lm, mine, get_profile("raspberry-pi-5"), 32)
    assert len(held) == 20 and len(search) == N_SEARCH and search[0] is held[0]
