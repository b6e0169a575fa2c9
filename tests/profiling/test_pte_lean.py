"""The torch-free ExecuTorch runtime path (C++ runtime through the ctypes shim) and its fallback.

The trap: executorch's Python runtime imports torch (~350 MB RSS before the model loads), so a `.pte`
runner that goes through it is not a device runtime. These tests run the shim in processes where torch
cannot be imported and check that libtorch never gets mapped, that its outputs are those of the
Python bindings, and that where the shim cannot be built the runner falls back and says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgeship.profiling import backends

pytestmark = pytest.mark.needs_export

# a child that cannot import torch, executorch's Python packages or torchao (the runner's own block)
_CHILD = r"""
import json, sys
from pathlib import Path
from edgeship.profiling.worker import block_torch
block_torch()
import numpy as np
from edgeship.profiling import backends
b = backends.load(Path(sys.argv[1]), threads=1)
with np.load(sys.argv[2]) as z:
    out = b.run(b.adapt_feeds({"x": z["x"][:1]}))["output"]
maps = Path("/proc/self/maps").read_text()
print(json.dumps({"out": out.tolist(), "info": b.info(), "torch": sys.modules.get("torch", "absent") is not None,
                  "libtorch": "libtorch" in maps, "inputs": [[s.name, s.dtype, list(s.shape)] for s in b.inputs]}))
"""


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from torch import nn

    from edgeship.pipeline import export

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    out = tmp_path_factory.mktemp("pte-lean") / "b"
    export(model, example_inputs={"x": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)},
           target="raspberry-pi-5", out=out, formats=["pte"], recipes=["fp32"], log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def lean(unavailable: Callable[[str, str], None]) -> None:
    """The shim builds here (a C++ compiler and the executorch wheel's headers); else skip, or fail where required."""
    from edgeship.profiling.backends import pte_lean

    try:
        pte_lean.runtime()
    except pte_lean.LeanUnavailable as e:
        unavailable("needs_export", f"the torch-free ExecuTorch runtime cannot be built here ({e}); apt install g++")


def _child(bundle: Path, **env: str) -> dict[str, object]:
    run = subprocess.run([sys.executable, "-c", _CHILD, str(bundle / "pte/fp32.pte"), str(bundle / "samples/inputs.npz")],
                         capture_output=True, text=True, env={**os.environ, **env}, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_runs_in_a_process_that_cannot_import_torch(lean: None, mlp_bundle: Path) -> None:
    got = _child(mlp_bundle)
    assert got["torch"] is False and got["libtorch"] is False  # neither imported nor mapped by the linker
    info = got["info"]
    assert isinstance(info, dict) and "no torch" in info["runtime_path"] and info["notes"] == []
    assert info["threads"] == 1 and "XnnpackBackend" in info["backends_available"] and info["io_described"] is True
    assert got["inputs"] == [["x", "float32", [1, 16]]]
    with np.load(mlp_bundle / "samples/outputs.npz") as z:
        assert np.allclose(np.asarray(got["out"]), z["output"][:1], atol=1e-4)


def test_same_outputs_as_the_python_bindings(lean: None, mlp_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with np.load(mlp_bundle / "samples/inputs.npz") as z:
        x = z["x"][:1]
    outs = {}
    for mode in ("lean", "pybindings"):
        monkeypatch.setenv("EDGESHIP_PTE_RUNTIME", mode)
        b = backends.load(mlp_bundle / "pte/fp32.pte", threads=1)
        outs[mode] = b.run(b.adapt_feeds({"x": x}))["output"]
        assert ("no torch" in b.info()["runtime_path"]) is (mode == "lean")
    assert np.array_equal(outs["lean"], outs["pybindings"])  # one runtime, two front doors: bit-identical


def test_falls_back_with_the_reason_when_the_shim_cannot_be_built(mlp_bundle: Path, tmp_path: Path) -> None:
    # `false` is a compiler that always fails; a fresh cache dir means nothing was built before
    env = {"CXX": "false", "EDGESHIP_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", "import sys, json; from pathlib import Path; "
                          "from edgeship.profiling import backends; "
                          "print(backends.is_torch_free('pte', {})); "
                          "b = backends.load(Path(sys.argv[1]), threads=1); print(json.dumps(b.info()))",
                          str(mlp_bundle / "pte/fp32.pte")], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    info = json.loads(lines[-1])
    assert lines[-2] == "False"  # so the runner does not block torch for this artifact
    assert "Python bindings" in info["runtime_path"]
    assert any("torch-free runtime unavailable (building the runtime shim with false failed" in n for n in info["notes"])


def test_forced_lean_without_a_compiler_is_a_clear_error(mlp_bundle: Path, tmp_path: Path) -> None:
    env = {"CXX": "false", "EDGESHIP_CACHE_DIR": str(tmp_path / "cache"), "EDGESHIP_PTE_RUNTIME": "lean"}
    run = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                          "from edgeship.errors import RuntimeMissingError; from edgeship.profiling import backends\n"
                          "try:\n    backends.load(Path(sys.argv[1]))\nexcept RuntimeMissingError as e:\n    print(e)",
                          str(mlp_bundle / "pte/fp32.pte")], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "EDGESHIP_PTE_RUNTIME=lean: the torch-free ExecuTorch runtime is unavailable" in run.stdout


def test_bad_mode_is_a_load_error(mlp_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship.errors import ArtifactLoadError

    monkeypatch.setenv("EDGESHIP_PTE_RUNTIME", "fast")
    with pytest.raises(ArtifactLoadError, match="EDGESHIP_PTE_RUNTIME='fast' is not one of auto, lean, pybindings"):
        backends.load(mlp_bundle / "pte/fp32.pte")


def test_profile_is_torch_free_and_reports_the_path(lean: None, mlp_bundle: Path, tmp_path: Path) -> None:
    from edgeship.profiling.runner import RunConfig, profile

    res = profile(mlp_bundle, config=RunConfig(runs=5, min_seconds=0.0, warmup=1, progress=False, energy="estimate"),
                  json_path=tmp_path / "r.json")
    (r,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert res.ok and r["status"] == "ok", r.get("error")
    assert r["torch_free"] is True  # the runner blocked torch in the child and the .pte still ran
    assert "no torch" in r["runtime"]["runtime_path"] and r["device_check"]["mean_cosine"] > 0.999
