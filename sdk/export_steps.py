"""The steps of one export, shared by :mod:`edgeship.pipeline` and its export lanes: what was asked
(:class:`ExportRequest`), the loaded model and the inputs every artifact is made and checked with (:func:`prepare`),
the fidelity check through the device runner's backend (:class:`Evaluator`), and one artifact (:func:`export_artifact`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import FidelityError
from edgeship.exporters.base import ExportContext, Exporter, Stage
from edgeship.fidelity import compare
from edgeship.manifest import ArtifactRecord, Fidelity, sha256_file
from edgeship.targets import TargetProfile

N_HELDOUT = 64  # the final fidelity check (16 let two int8-static artifacts pass at 0.99 that scored 0.989 on 64)
N_SEARCH = 16  # the keep-layers search and exporter-side probes score on their own, disjoint inputs
N_SAMPLES_IN_BUNDLE = 8


def builtin_corpus() -> list[str]:
    text = resources.files("edgeship").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [t for t in text.splitlines() if t.strip()]


def split_corpus() -> tuple[list[str], list[str]]:
    """(calibration fallback, held-out) halves of the built-in corpus, disjoint."""
    c = builtin_corpus()
    return c[: len(c) // 2], c[len(c) // 2:]


def heldout_pools() -> tuple[list[str], list[str]]:
    """(search, final check) texts, disjoint from each other and from the calibration half: the search scores on
    the first 16 held-out sentences of the corpus, the final check draws from the rest plus ``data/heldout.txt``."""
    _, held = split_corpus()
    extra = resources.files("edgeship").joinpath("data/heldout.txt").read_text(encoding="utf-8")
    return held[:N_SEARCH], held[N_SEARCH:] + [t for t in extra.splitlines() if t.strip()]


def _heldout_sets(lm: Any, heldout: str | Path | None, prof: TargetProfile,
                  seq: int) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], str]:
    """(final check inputs, search inputs, where the final ones came from). A user's file gives the final check
    its first 64 inputs and the search the next 16; with fewer than 72 the search shares the user's inputs (data
    like theirs beats built-in or synthetic inputs; the manifest says they overlap)."""
    from edgeship.models import load_calibration

    if heldout is not None:
        mine = load_calibration(heldout, lm, seq)
        search = mine[N_HELDOUT:N_HELDOUT + N_SEARCH] if len(mine) >= N_HELDOUT + 8 else mine[:N_SEARCH]
        return mine[:N_HELDOUT], search, str(heldout)
    search_pool, final_pool = heldout_pools()
    search = lm.sample_inputs(N_SEARCH, seed=3, seq_len=seq, image_size=prof.image_size, corpus=search_pool)
    held = lm.sample_inputs(N_HELDOUT, seed=1, seq_len=seq, image_size=prof.image_size, corpus=final_pool)
    return held, search, "built-in" if lm.input_kind == "text" else "synthetic"


class Evaluator:
    """Fidelity of an artifact file, run through the device runner's backend for its format.

    Remembers each measurement by the file's content, format, runtime options and floor: the search for
    layers to keep has usually just measured the very file the pipeline then validates (pte/int8-dynamic
    ran the same 16 held-out inputs through the runtime twice), and a file with the same bytes gives the
    same numbers.
    """

    def __init__(self, model: Any, heldout: Sequence[dict[str, np.ndarray]],
                 reference: Sequence[dict[str, np.ndarray]], target: TargetProfile) -> None:
        self.model, self.heldout, self.reference, self.target = model, heldout, reference, target
        self._seen: dict[tuple[str, str, str, float], Fidelity] = {}
        self.runs = 0  # files actually run (not answered from memory)
        self.threads: int | None = None  # the runtime's threads (None: its default); export lanes share the CPUs

    def _key(self, path: Path, fmt: str, options: Mapping[str, Any] | None, recipe: str) -> tuple[str, str, str, float]:
        return (sha256_file(path), fmt, json.dumps(dict(options or {}), sort_keys=True, default=str),
                self.target.min_mean_cosine(recipe))

    def __call__(self, path: Path, fmt: str, options: Mapping[str, Any] | None = None,
                 recipe: str = "default") -> Fidelity:
        from edgeship.profiling import backends

        key = self._key(path, fmt, options, recipe)
        if key in self._seen:
            return self._seen[key]
        out_name = self.model.outputs[0].name
        b = backends.load(path, fmt, threads=self.threads, options=options or {})
        got = []
        for f in self.heldout:
            res = b.run(b.adapt_feeds(f))
            if out_name not in res:
                raise FidelityError(f"{path.name}: no output named '{out_name}' (outputs: {', '.join(res)})")
            got.append(res[out_name])
        self.runs += 1
        fid = compare([r[out_name] for r in self.reference], got, out_name, self.target.min_mean_cosine(recipe),
                      classifier=self.model.classifier)
        self._seen[key] = fid
        return fid


@dataclass(frozen=True)
class ExportRequest:
    """What one export was asked for, enough to rebuild its inputs in another process (an export lane)."""

    model: Any  # HF directory or "pkg.module:factory" (both can be sent to a lane), or an nn.Module
    target: TargetProfile
    seq_len: int
    task: str | None = None
    example_inputs: Mapping[str, Any] | None = None
    checkpoint: str | None = None
    calibration: str | Path | None = None
    heldout: str | Path | None = None
    options: Mapping[str, Any] | None = None
    allow_degraded: bool = False

    @property
    def reloadable(self) -> bool:
        """A lane can load the model again from the request alone (an nn.Module lives in this process only)."""
        return isinstance(self.model, (str, Path)) and self.example_inputs is None


@dataclass
class Prepared:
    """The loaded model and the inputs every artifact of the export is made and checked with."""

    lm: Any
    seq: int
    calib: list[dict[str, np.ndarray]]
    calib_source: str
    held: list[dict[str, np.ndarray]]
    held_source: str
    search: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]
    final_check: Evaluator  # the 64 held-out inputs
    evaluate: Evaluator  # what exporters and the search score with (16 other inputs)
    warnings: list[str]
    shared: dict[Any, Any] = field(default_factory=dict)  # ExportContext.shared: reused across this process's recipes


def prepare(req: ExportRequest, needs_calibration: bool, say: Callable[[str], None]) -> Prepared:
    """Load the model and build calibration, held-out and reference data (deterministic: every lane gets the same)."""
    from edgeship.models import load_calibration, load_model

    prof, seq = req.target, req.seq_len
    model = req.model
    say(f"loading model {model if not hasattr(model, 'forward') else type(model).__name__}...")
    lm = load_model(model, task=req.task, example_inputs=req.example_inputs, seq_len=seq, image_size=prof.image_size,
                    checkpoint=req.checkpoint)
    if "sequence" in lm.dims:
        seq = lm.dims["sequence"]["default"]
    calib_pool, _ = split_corpus()
    held, search, held_source = _heldout_sets(lm, req.heldout, prof, seq)
    warnings: list[str] = []
    if req.calibration is not None:
        calib = load_calibration(req.calibration, lm, seq)
        calib_source = str(req.calibration)
    else:
        calib = lm.sample_inputs(len(calib_pool), seed=2, seq_len=seq, image_size=prof.image_size, corpus=calib_pool)
        calib_source = ("built-in generic English corpus (32 sentences)" if lm.input_kind == "text"
                        else "synthetic N(0,1) inputs")
        if needs_calibration:
            w = (f"no --calibration given: static quantization calibrates on the {calib_source}; for accuracy on "
                 "your data pass --calibration FILE with a few hundred real inputs")
            warnings.append(w)
            say(f"WARNING: {w}")
    reference = [lm.run_torch(f) for f in held]
    return Prepared(lm, seq, calib, calib_source, held, held_source, search, reference,
                    Evaluator(lm, held, reference, prof), Evaluator(lm, search, [lm.run_torch(f) for f in search], prof),
                    warnings)


def export_artifact(req: ExportRequest, prep: Prepared, exp_cls: type[Exporter], recipe: str, staging: Path,
                    workdir: Path, label: str, say: Callable[[str], None]) -> ArtifactRecord:
    """Export one (format, recipe) into the bundle's ``staging`` directory, checked on the held-out inputs; its
    manifest record."""
    fmt, prof = exp_cls.format, req.target
    rel = f"{fmt}/{recipe}{exp_cls.suffix}"
    dest = staging / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"{label} {fmt}/{recipe}")
    ev = prep.evaluate
    ctx = ExportContext(model=prep.lm, target=prof, workdir=workdir, calibration=prep.calib,
                        calibration_source=prep.calib_source, heldout=prep.search, reference=ev.reference, format=fmt,
                        recipe=recipe, shared=prep.shared, evaluate=lambda p, f, o: ev(p, f, o, recipe),
                        options=dict(req.options or {}), allow_degraded=req.allow_degraded, log=say)
    t0 = time.perf_counter()
    res = exp_cls().export(ctx, recipe, dest)
    if res.path != dest:
        shutil.move(str(res.path), dest)
    with ctx.stage(Stage.VALIDATE):  # on the 64 held-out inputs the search never saw
        fid = prep.final_check(dest, fmt, res.runtime.get("options", {}), recipe)
    secs = time.perf_counter() - t0
    if not fid.passed:
        msg = (f"{fmt}/{recipe}: mean cosine {fid.mean_cosine:.4f} vs PyTorch is below the {prof.name} floor "
               f"{fid.floor_mean_cosine}; try a higher-precision recipe or calibration data like your real "
               "inputs, or pass --allow-degraded to keep it")
        if not req.allow_degraded:
            raise FidelityError(msg)
        res.warnings.append("DEGRADED: " + msg)
    say(f"{label} {fmt}/{recipe}: {dest.stat().st_size / 2**20:.1f} MB, mean cosine "
        f"{fid.mean_cosine:.4f} (min {fid.min_cosine:.4f}), {secs:.1f} s")
    return ArtifactRecord(
        path=rel, format=fmt, recipe=recipe, sha256=sha256_file(dest),
        size_bytes=dest.stat().st_size, export_seconds=round(secs, 3), fidelity=fid, runtime=res.runtime,
        stages={str(k): round(v, 3) for k, v in ctx.stages.items()}, quantization=res.quantization,
        details=res.details, warnings=tuple(res.warnings),
    )


