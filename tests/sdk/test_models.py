"""Model loading: tasks from configs, factories, and refusing checkpoints that need arbitrary unpickling."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeship.errors import ModelLoadError
from edgeship.models import detect_task, load_hf_dir, load_model

pytestmark = pytest.mark.needs_export


def test_token_classification_from_config(tmp_path: Path, vocab_writer: Callable[[Path], None]) -> None:
    from transformers import BertConfig, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     num_labels=5, id2label={i: f"TAG{i}" for i in range(5)}, label2id={f"TAG{i}": i for i in range(5)})
    BertForTokenClassification(cfg).save_pretrained(tmp_path)
    vocab_writer(tmp_path)
    lm = load_hf_dir(tmp_path, seq_len=16)
    assert lm.task == "token-classification" and lm.outputs[0].shape == ("batch", "sequence", 5)
    out = lm.run_torch(lm.text_inputs(["the dog runs"], 16)[0])["logits"]
    assert out.shape == (1, 16, 5) and lm.labels == tuple(f"TAG{i}" for i in range(5))


def test_detect_task() -> None:
    assert detect_task({"architectures": ["BertForSequenceClassification"]}, Path("/x")) == "sequence-classification"
    assert detect_task({"architectures": ["ViTForImageClassification"]}, Path("/x")) == "image-classification"
    with pytest.raises(ModelLoadError, match="--task"):
        detect_task({"architectures": ["Weird"]}, Path("/nonexistent"))


@pytest.fixture()
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "myfactory.py").write_text(textwrap.dedent("""
        import numpy as np, torch
        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(4, 3)), {"x": np.ones((1, 4), np.float32)}
        class Payload:
            def __reduce__(self):
                return (print, ("arbitrary code ran",))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myfactory"
    sys.modules.pop("myfactory", None)


def test_factory_with_plain_state_dict(factory_module: str, tmp_path: Path) -> None:
    lm = load_model(f"{factory_module}:make")
    state = {k: torch.full_like(v, 0.5) for k, v in lm.module.state_dict().items()}
    torch.save(state, tmp_path / "ok.pt")
    lm = load_model(f"{factory_module}:make", checkpoint=str(tmp_path / "ok.pt"))
    assert np.allclose(lm.run_torch({"x": np.ones((1, 4), np.float32)})["output"], 0.5 * 4 + 0.5)


def test_checkpoint_needing_unpickling_is_refused(factory_module: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    mod = __import__(factory_module)
    torch.save({"weight": torch.zeros(3, 4), "payload": mod.Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="weights_only=True"):
        load_model(f"{factory_module}:make", checkpoint=str(tmp_path / "evil.pt"))
    assert "arbitrary code ran" not in capsys.readouterr().out


def test_bad_factory_refs() -> None:
    with pytest.raises(ModelLoadError, match="cannot import factory"):
        load_model("no_such_module_xyz:make")
    with pytest.raises(ModelLoadError, match="model not found"):
        load_model("/definitely/not/here")
