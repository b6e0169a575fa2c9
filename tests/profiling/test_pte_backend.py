"""The ExecuTorch backend: loading, self-described I/O, per-op ETDump timings, and broken files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError
from edgeship.profiling import backends

pytestmark = pytest.mark.needs_export


class _Mlp:
    """Built lazily so collecting this module does not import torch."""

    @staticmethod
    def make() -> object:
        import torch
        from torch import nn

        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeship.pipeline import export

    out = tmp_path_factory.mktemp("pte-mlp") / "b"
    export(_Mlp.make(), example_inputs={"x": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)},
           target="raspberry-pi-5", out=out, formats=["pte"], recipes=["fp32"], log=lambda m: None)
    return out


def test_loads_with_embedded_io_and_matches_torch(mlp_bundle: Path) -> None:
    b = backends.load(mlp_bundle / "pte/fp32.pte", threads=1)
    assert type(b).torch_free is False and b.format == "pte"
    assert [(s.name, s.dtype, s.shape) for s in b.inputs] == [("x", "float32", (1, 16))]
    assert b.outputs == ("output",)
    with np.load(mlp_bundle / "samples/inputs.npz") as zi, np.load(mlp_bundle / "samples/outputs.npz") as zo:
        got = b.run(b.adapt_feeds({"x": zi["x"][:1]}))["output"]
        assert np.allclose(got, zo["output"][:1], atol=1e-4)
    info = b.info()
    assert info["runtime"] == "executorch" and "XnnpackBackend" in info["backends_available"]
    assert info["threads"] == 1 and info["io_described"] is True and "per_op" not in info


def test_per_op_timings_from_etdump(mlp_bundle: Path) -> None:
    b = backends.load(mlp_bundle / "pte/fp32.pte", options={"per_op": True, "per_op_runs": 3})
    assert b.info()["per_op"]["available"] is False  # nothing run yet: says so instead of guessing
    b.run(b.adapt_feeds({"x": np.ones((1, 16), np.float32)}))
    po = b.info()["per_op"]
    assert po["available"] is True and po["runs"] == 3
    kernels = {r["kernel"] for r in po["ops"]}
    assert "xnnpack" in kernels  # the linears run inside the delegate
    assert all(r["mean_ms"] >= 0 and r["calls"] >= 1 for r in po["ops"])
    assert po["delegate_ms"] > 0 and 0 < po["delegate_share"] <= 1


def test_unknown_option(mlp_bundle: Path) -> None:
    with pytest.raises(ArtifactLoadError, match="unknown runtime option.*per_op"):
        backends.load(mlp_bundle / "pte/fp32.pte", options={"graph_optimization": "all"})


@pytest.mark.parametrize("damage", ["truncated", "junk", "other-format", "empty"])
def test_broken_pte(mlp_bundle: Path, tmp_path: Path, damage: str) -> None:
    data = (mlp_bundle / "pte/fp32.pte").read_bytes()
    bad = tmp_path / "bad.pte"
    bad.write_bytes({"truncated": data[: len(data) // 2], "junk": bytes(range(7, 250)) * 40,
                     "other-format": b"\x08\x07\x12\x04onnx" + data[:200], "empty": b""}[damage])
    with pytest.raises(ArtifactLoadError, match=r"bad\.pte: (truncated|not an ExecuTorch program)"):
        backends.load(bad)


def test_flatbuffer_damage_is_a_load_error(mlp_bundle: Path, tmp_path: Path) -> None:
    data = bytearray((mlp_bundle / "pte/fp32.pte").read_bytes())
    data[48:112] = b"\xff" * 64  # inside the program flatbuffer's tables, header intact
    bad = tmp_path / "flipped.pte"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactLoadError, match="flipped.pte"):
        backends.load(bad)


def test_profile_runs_pte_with_per_op(mlp_bundle: Path, tmp_path: Path) -> None:
    from edgeship.profiling.runner import RunConfig, profile

    res = profile(mlp_bundle, config=RunConfig(runs=5, min_seconds=0.0, warmup=1, per_op=True, progress=False,
                                               energy="estimate"), json_path=tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    (r,) = doc["results"]
    assert res.ok and r["status"] == "ok", r.get("error")
    assert r["torch_free"] is False and r["latency"]["count"] >= 5 and r["latency"]["p50_ms"] > 0
    assert r["runtime"]["per_op"]["available"] is True and r["device_check"]["mean_cosine"] > 0.999
