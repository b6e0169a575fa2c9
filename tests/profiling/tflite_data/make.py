"""Regenerate ``tiny.tflite`` + ``expected.npz`` for the torch-free backend tests (needs the [export] extra).

The backend tests run in environments without torch or litert-torch (the tflite-runtime CI
job), so the model they load is committed; this script is how it was made:
``python tests/profiling/tflite_data/make.py``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent


class TinyEncoder(nn.Module):
    """Embedding + linear + masked mean: the shape of a sentence encoder, 4 kB of weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(128, 8)  # ids below 100 (what the runner synthesises for a bare file) are valid
        self.proj = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.embed(input_ids)))
        m = attention_mask[..., None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def main() -> None:
    from edgeship.pipeline import export

    torch.manual_seed(0)
    ex = {"input_ids": np.arange(1, 7, dtype=np.int64)[None], "attention_mask": np.ones((1, 6), np.int64)}
    with tempfile.TemporaryDirectory() as tmp:
        r = export(TinyEncoder().eval(), example_inputs=ex, target="raspberry-pi-5", out=Path(tmp) / "b",
                   formats=["tflite"], recipes=["fp32"], log=lambda m: None)
        shutil.copyfile(r.bundle / "tflite/fp32.tflite", HERE / "tiny.tflite")
    feeds = {"input_ids": np.array([[3, 9, 27, 63, 0, 0]], np.int32), "attention_mask": np.array([[1, 1, 1, 1, 0, 0]],
                                                                                                  np.int32)}
    from edgeship.profiling.backends.tflite import TfliteBackend

    out = TfliteBackend(HERE / "tiny.tflite").run(feeds)
    np.savez(HERE / "expected.npz", **feeds, output=out["output"])


if __name__ == "__main__":
    main()
