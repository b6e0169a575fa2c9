"""The export core without a model: stage timing, the keep-layers search, recipe tables, a toy format."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from edgeship.errors import ExportError, UnsupportedRecipeError
from edgeship.exporters import EXPORTERS, base
from edgeship.exporters.base import ExportContext, Exporter, ExportOutput, RecipeSupport, Stage
from edgeship.manifest import Fidelity
from edgeship.profiling import backends
from edgeship.profiling.backends import Backend
from edgeship.spec import TensorSpec


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _ctx(**kw: Any) -> ExportContext:
    fields: dict[str, Any] = dict(model=None, target=None, workdir=Path("."), calibration=[], calibration_source="",
                                  heldout=[], reference=[], evaluate=None, format="toy", recipe="fp32",
                                  log=lambda m: None)
    return ExportContext(**{**fields, **kw})


def test_nested_stages_are_timed_exclusively(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(base.time, "perf_counter", clock)
    ctx = _ctx()
    with ctx.stage(Stage.SEARCH):
        clock.t += 1
        for _ in range(2):
            with ctx.stage(Stage.QUANTIZE):
                clock.t += 3
                with ctx.stage(Stage.LOWER):
                    clock.t += 5
            with ctx.stage(Stage.VALIDATE):
                clock.t += 7
    assert ctx.stages == {Stage.SEARCH: 1, Stage.QUANTIZE: 6, Stage.LOWER: 10, Stage.VALIDATE: 14}
    assert sum(ctx.stages.values()) == clock.t  # the manifest's stage times add up to the wall time


def test_a_failing_stage_names_format_recipe_and_stage() -> None:
    ctx = _ctx(recipe="int8-static")
    with pytest.raises(ExportError, match=r"^toy/int8-static: stage 'lower' failed: ValueError: bad op \(at "):
        with ctx.stage(Stage.SEARCH), ctx.stage(Stage.LOWER):
            raise ValueError("bad op\nmore detail")
    assert set(ctx.stages) == {Stage.SEARCH, Stage.LOWER}


# ---- keep_search: one search for every format, driven by a toy cost model ---------------------------------
COST = {"a": 0.06, "b": 0.03, "c": 0.005, "d": 0.001}  # accuracy each quantized layer costs
EMB_COST = 0.1  # what the optional extra quantization costs


def _fid(cos: float, floor: float = 0.9, max_abs: float = 0.1) -> Fidelity:
    return Fidelity(output="y", n_samples=4, max_abs_err=max_abs, mean_abs_err=0.01, mean_cosine=cos,
                    min_cosine=cos, top1_agreement=None, floor_mean_cosine=floor, passed=cos >= floor)


def _cos(kept: Sequence[str], fallback: bool, emb_cost: float = EMB_COST) -> float:
    return 1.0 - sum(c for n, c in COST.items() if n not in kept) - (0.0 if fallback else emb_cost)


class _Target:
    name = "toy-board"
    int4_group_size = 32

    def min_mean_cosine(self, recipe: str) -> float:
        return 0.95


@pytest.fixture
def toy_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship.exporters import sensitivity

    def rank(model: Any, calib: Any, held: Any, mode: str, group_size: int = 32,
             layers: Sequence[str] | None = None) -> list[sensitivity.LayerSensitivity]:
        return sorted((sensitivity.LayerSensitivity(n, 1.0 - COST[n]) for n in layers or COST),
                      key=lambda s: s.mean_cosine)

    monkeypatch.setattr(sensitivity, "rank_layers", rank)


def _file_ctx(tmp_path: Path, runtime_breaks_extra: bool = False, emb_cost: float = EMB_COST) -> ExportContext:
    def evaluate(path: Path, fmt: str, options: Any) -> Fidelity:
        doc = json.loads(path.read_text())
        broken = runtime_breaks_extra and not doc["fallback"]
        return _fid(0.2 if broken else _cos(doc["kept"], doc["fallback"], emb_cost), 0.95,
                    float("inf") if broken else 0.1)

    return _ctx(target=_Target(), workdir=tmp_path, evaluate=evaluate, recipe="int8-static")


def _write(kept: Sequence[str], fallback: bool, path: Path) -> str:
    path.write_text(json.dumps({"kept": list(kept), "fallback": fallback}))
    return f"built {path.name}"


@pytest.mark.usefixtures("toy_ranking")
def test_keep_search_without_proxy_keeps_the_fewest_layers(tmp_path: Path) -> None:
    from edgeship.exporters.sensitivity import KeepSearch, keep_search

    res = keep_search(_file_ctx(tmp_path), KeepSearch(list(COST), _write, ".toy", "toyrt"))
    # without the extra (EMB_COST applies): keeping a and b gives 1 - 0.006 - 0.1 < floor: nothing meets it,
    # so the best attempt within the build budget is returned and the caller decides
    assert res.fidelity.mean_cosine == max(a["mean_cosine"] for a in res.record["search"])
    assert not res.fidelity.passed and res.record["kept_in_float"] == list(res.kept)
    (tmp_path / "2").mkdir()
    res = keep_search(_file_ctx(tmp_path / "2", emb_cost=0.0), KeepSearch(list(COST), _write, ".toy", "toyrt"))
    assert res.kept == ("a",) and res.fidelity.passed  # 1 - 0.036 >= 0.95; keeping nothing gives 0.904
    assert res.record["quantized_layers"] == 3 and [s["layer"] for s in res.record["sensitivity"]] == list(COST)
    assert [(a["kept"], a["scored_on"]) for a in res.record["search"]] == [(0, "toyrt"), (1, "toyrt")]
    assert res.built == f"built {res.artifact.name}"


@pytest.mark.usefixtures("toy_ranking")
def test_keep_search_drops_the_extra_quantization_when_the_proxy_blames_it(tmp_path: Path) -> None:
    from edgeship.exporters.sensitivity import KeepSearch, keep_search

    proxied: list[tuple[tuple[str, ...], bool]] = []

    def proxy(kept: Sequence[str], fallback: bool) -> Fidelity:
        proxied.append((tuple(kept), fallback))
        return _fid(_cos(kept, fallback), 0.95)

    spec = KeepSearch(list(COST), _write, ".toy", "toyrt", proxy=proxy, fallback="embeddings",
                      fallback_what="int8 embeddings", rank_first=False, max_builds=3)
    res = keep_search(_file_ctx(tmp_path), spec)
    assert res.kept == ("a",) and res.fidelity.passed
    assert res.record["embeddings"].startswith("float: int8 embeddings alone took the quantized PyTorch graph")
    assert all(fb for _, fb in proxied[1:])  # after the blame, every proxy call leaves the extra out
    assert [(a["scored_on"], a.get("embeddings")) for a in res.record["search"]][:2] == [("pytorch", None),
                                                                                        ("pytorch", "float")]
    assert res.record["search"][-1]["scored_on"] == "toyrt" and json.loads(res.artifact.read_text())["fallback"]


@pytest.mark.usefixtures("toy_ranking")
def test_keep_search_suspects_the_extra_when_only_the_runtime_breaks(tmp_path: Path) -> None:
    from edgeship.exporters.sensitivity import KeepSearch, keep_search

    spec = KeepSearch(list(COST), _write, ".toy", "toyrt", proxy=lambda kept, fb: _fid(0.999, 0.95),
                      fallback="embeddings", fallback_what="int8 embeddings", rank_first=False)
    res = keep_search(_file_ctx(tmp_path, runtime_breaks_extra=True, emb_cost=0.0), spec)
    assert "on the toyrt runtime against 0.9990 on the quantized PyTorch graph" in res.record["embeddings"]
    assert [(a["scored_on"], a["kept"]) for a in res.record["search"]][:3] == [("pytorch", 0), ("toyrt", 0),
                                                                              ("toyrt", 0)]
    assert res.record["sensitivity"] or res.fidelity.passed


# ---- a new format from this file alone: one exporter class + one backend class ------------------------------
class NpzLinearBackend(Backend):
    """Runs an ``.npzlin`` file (the weights of one linear layer) with numpy: a real, if tiny, runtime."""

    format: ClassVar[str] = "npz-linear"
    suffix: ClassVar[str] = ".npzlin"

    def __init__(self, path: Path, threads: int | None = None, options: Mapping[str, Any] | None = None) -> None:
        with np.load(path) as f:
            self.w, self.b = f["w"].astype(np.float32), f["b"].astype(np.float32)
        self.inputs = (TensorSpec("x", "float32", ("batch", self.w.shape[1])),)
        self.outputs = ("output",)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"output": feeds["x"] @ self.w.T + self.b}

    def info(self) -> dict[str, Any]:
        return {"name": "numpy", "version": np.__version__}


class NpzLinearExporter(Exporter):
    format: ClassVar[str] = "npz-linear"
    suffix: ClassVar[str] = ".npzlin"

    def _fp16(self, w: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        return w.astype(np.float16), {"weights": "float16"}

    support: ClassVar[tuple[RecipeSupport, ...]] = (
        RecipeSupport("fp32", "float32 weights"),
        RecipeSupport("fp16", "float16 weights", make=_fp16),  # a recipe is one row
    )

    @classmethod
    def check_environment(cls) -> None:
        pass

    def export(self, ctx: ExportContext, recipe: str, out: Path) -> ExportOutput:
        spec = self.spec(recipe)
        lin = ctx.model.module
        if not isinstance(lin, torch.nn.Linear):
            raise UnsupportedRecipeError("npz-linear exports a single nn.Linear")
        w = lin.weight.detach().numpy()
        w, quant = spec.make(self, w) if spec.make else (w, {})
        with ctx.stage(Stage.SERIALIZE), open(out, "wb") as f:
            np.savez(f, w=w, b=lin.bias.detach().numpy())
        return ExportOutput(path=out, runtime={"name": "numpy"}, quantization={"recipe": recipe, **quant})


def test_a_toy_format_registered_from_a_test_file_exports_validates_and_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship.exporters import load_builtin
    from edgeship.manifest import load_bundle
    from edgeship.pipeline import export

    load_builtin()  # snapshot the built-ins too: restoring an earlier, emptier snapshot would drop them for good
    snap = EXPORTERS.snapshot()
    monkeypatch.setattr(backends, "_BACKENDS", dict(backends._BACKENDS))
    monkeypatch.setattr(backends, "SUFFIXES", dict(backends.SUFFIXES))
    try:
        EXPORTERS.add("npz-linear", NpzLinearExporter)
        backends.register_backend("npz-linear", f"{__name__}:NpzLinearBackend", ".npzlin")
        torch.manual_seed(0)
        res = export(torch.nn.Linear(8, 4), example_inputs={"x": np.ones((1, 8), np.float32)}, target="raspberry-pi-5",
                     out=tmp_path / "b", formats=["npz-linear"], recipes=["fp32", "fp16"], log=lambda m: None)
    finally:
        EXPORTERS.restore(snap)
    arts = {a.recipe: a for a in load_bundle(res.bundle, verify=True).manifest.artifacts}
    assert set(arts) == {"fp32", "fp16"} and arts["fp16"].quantization["weights"] == "float16"
    assert arts["fp32"].fidelity is not None and arts["fp32"].fidelity.max_abs_err < 1e-5
    assert arts["fp16"].fidelity is not None and 0 < arts["fp16"].fidelity.max_abs_err < 1e-2
    b = backends.load(res.bundle / arts["fp16"].path)  # found by its suffix, like any built-in format
    assert b.run({"x": np.ones((2, 8), np.float32)})["output"].shape == (2, 4)


def test_the_support_table_is_the_dispatch() -> None:
    from edgeship.exporters import load_builtin

    load_builtin()
    for fmt in ("onnx", "tflite", "pte"):
        exp = EXPORTERS.get(fmt)
        for row in exp.support:
            assert row.recipe == "fp32" or callable(row.make), (fmt, row.recipe)  # fp32: the base graph itself
        with pytest.raises(UnsupportedRecipeError, match=f"format '{fmt}' has no recipe 'int3' .*offers: fp32"):
            exp.spec("int3")
