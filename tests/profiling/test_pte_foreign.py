"""``.pte`` files from ExecuTorch's own scripts: several methods, no edgeship I/O description."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError
from edgeship.profiling import backends
from edgeship.profiling.results import ArtifactResult, ProfileResult
from edgeship.profiling.runner import profile

pytestmark = pytest.mark.needs_export
FAST = {"runs": 5, "min_seconds": 0.0, "warmup": 1, "progress": False, "energy": "estimate"}
Measured = Callable[[ArtifactResult, int], None]


def write_two_method_pte(path: Path, names: tuple[str, str]) -> dict[str, Any]:
    """An encoder (float [2, 16] -> [2, 8]) and a token classifier (int64 ids [1, 7] -> [1, 3]) in one program,
    lowered to XNNPACK the way ExecuTorch's examples do it; returns the eager modules for reference."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.fc(x))

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(128, 8)  # ids below 100, what the runner synthesises, are valid
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.emb(ids).mean(1))

    torch.manual_seed(0)
    mods = {names[0]: Encoder().eval(), names[1]: Classifier().eval()}
    args = {names[0]: (torch.randn(2, 16),), names[1]: (torch.randint(0, 100, (1, 7)),)}
    eps = {n: torch.export.export(m, args[n]) for n, m in mods.items()}
    path.write_bytes(to_edge_transform_and_lower(eps, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    return mods


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    p = tmp_path_factory.mktemp("pte-foreign") / "two.pte"
    return p, write_two_method_pte(p, ("forward", "classify"))


def test_runs_forward_and_lists_methods(two_methods: tuple[Path, dict[str, Any]]) -> None:
    import torch

    path, mods = two_methods
    b = backends.load(path)
    assert [(s.name, s.dtype, s.shape) for s in b.inputs] == [("input_0", "float32", (2, 16))]
    assert b.outputs == ("output_0",)
    feeds = b.synthesize(b.inputs, {})
    got = b.run(b.adapt_feeds(feeds))["output_0"]
    np.testing.assert_allclose(got, mods["forward"](torch.from_numpy(feeds["input_0"])).detach().numpy(), atol=1e-5)
    info = b.info()
    assert info["method"] == "forward" and info["methods"] == ["classify", "forward"] and info["io_described"] is False
    assert "ran method 'forward' of classify, forward; inputs synthesised from its metadata" in " ".join(info["notes"])


def test_method_option_picks_another(two_methods: tuple[Path, dict[str, Any]]) -> None:
    import torch

    path, mods = two_methods
    b = backends.load(path, options={"method": "classify"})
    assert [(s.name, s.dtype, s.shape) for s in b.inputs] == [("input_0", "int64", (1, 7))]
    feeds = b.synthesize(b.inputs, {})
    got = b.run(b.adapt_feeds(feeds))["output_0"]
    np.testing.assert_allclose(got, mods["classify"](torch.from_numpy(feeds["input_0"])).detach().numpy(), atol=1e-5)
    with pytest.raises(ArtifactLoadError, match=r"two\.pte: no method 'decode'; it has classify, forward"):
        backends.load(path, options={"method": "decode"})


def test_without_forward_asks_for_a_method(tmp_path: Path) -> None:
    p = tmp_path / "noforward.pte"
    write_two_method_pte(p, ("encode", "classify"))
    with pytest.raises(ArtifactLoadError, match=r"no 'forward' method and several others \(classify, encode\); pick one "
                                                r"with --method NAME, e.g. --method classify"):
        backends.load(p)
    assert backends.load(p, options={"method": "encode"}).info()["method"] == "encode"


def test_profile_multi_method_pte(two_methods: tuple[Path, dict[str, Any]], measured: Measured, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from edgeship.cli import main

    path, _ = two_methods
    (r,) = profile(path, **FAST).results
    measured(r, 5)
    assert r.runtime["methods"] == ["classify", "forward"] and r.output_shapes == {"output_0": (2, 8)}
    res = profile(path, method="classify", json_path=tmp_path / "r.json", **FAST)  # RunConfig.method, and its JSON
    assert res.results[0].runtime["method"] == "classify" and res.results[0].output_shapes == {"output_0": (1, 3)}
    back = ProfileResult.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back.config is not None and back.config.method == "classify"
    rc = main(["profile", str(path), "--method", "classify", "--runs", "3", "--min-seconds", "0", "--warmup", "1",
               "--energy", "estimate", "--quiet"])
    shown = capsys.readouterr().out
    assert rc == 0 and "two.pte: note: ran method 'classify' of classify, forward" in shown
