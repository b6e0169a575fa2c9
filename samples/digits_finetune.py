"""Fine-tune -> export -> accuracy per artifact, on real data (scikit-learn's UCI digits, 8x8 images).

    python samples/digits_finetune.py -o digits-bundle [--formats onnx tflite pte] [--target raspberry-pi-5]

Trains a small CNN on 1,437 digits (seed fixed), exports it with every recipe the chosen
formats offer (static int8 calibrated on training images, fidelity checked on held-out test
images), then runs every artifact through edgeship's device runner on the 360 test images and
prints test accuracy per artifact next to the PyTorch model's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                      nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def load_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # [0, 16] -> [-1, 1]
    x = x[:, None, :, :]
    return tuple(train_test_split(x, d.target.astype(np.int64), test_size=0.2, random_state=seed, stratify=d.target))  # type: ignore[return-value]


def train(x: np.ndarray, y: np.ndarray, epochs: int = 15, seed: int = 0) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def accuracy_per_artifact(bundle_dir: Path, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    from edgeship.manifest import load_bundle
    from edgeship.profiling import backends

    b = load_bundle(bundle_dir)
    out = {}
    for art in b.manifest.artifacts:
        model = backends.load(b.path_of(art), art.format, options=art.runtime.get("options", {}))
        preds = [int(np.argmax(next(iter(model.run(model.adapt_feeds({"image": x_test[i:i + 1]})).values()))))
                 for i in range(len(x_test))]
        out[art.key] = float(np.mean(np.array(preds) == y_test))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default="digits-bundle")
    ap.add_argument("--target", default="raspberry-pi-5")
    ap.add_argument("--formats", nargs="+", default=["onnx"])
    ap.add_argument("--recipes", nargs="+", default=["fp32", "int8-dynamic", "int8-static"])
    ap.add_argument("--epochs", type=int, default=15)
    a = ap.parse_args(argv)

    import edgeship

    x_train, x_test, y_train, y_test = load_data()
    model = train(x_train, y_train, a.epochs)
    with torch.inference_mode():
        torch_acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    with tempfile.TemporaryDirectory() as td:
        np.save(Path(td) / "calib.npy", x_train[:200])
        np.save(Path(td) / "heldout.npy", x_test[:16])
        res = edgeship.export(model, example_inputs={"image": x_test[:1]}, task="image-classification",
                              target=a.target, formats=a.formats, recipes=a.recipes, out=a.output, overwrite=True,
                              calibration=Path(td) / "calib.npy", heldout=Path(td) / "heldout.npy")
    accs = accuracy_per_artifact(res.bundle, x_test, y_test)
    print(f"\n{'artifact':22s} {'KB':>7s} {'test acc':>8s} {'top-1 agree':>11s}")
    print(f"{'pytorch/fp32':22s} {sum(p.numel() * 4 for p in model.parameters()) / 1024:7.1f} {torch_acc:8.4f} {'-':>11s}")
    for art in res.manifest.artifacts:
        agree = art.fidelity.top1_agreement if art.fidelity else None
        print(f"{art.key:22s} {art.size_bytes / 1024:7.1f} {accs[art.key]:8.4f} "
              f"{'-' if agree is None else f'{agree:.4f}':>11s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
