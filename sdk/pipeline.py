"""``edgeship.export`` (this module is ``edgeship.pipeline``): one call from a fine-tuned model to a checked, quantized bundle.

Stages per artifact: load -> (calibrate/quantize) -> lower -> serialize -> validate.
Every artifact is run through the same torch-free runner backend the device uses and
compared with PyTorch on held-out inputs; the numbers go into the manifest.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.bundle import BundleWriter, check_output_dir
from edgeship.errors import (
    CalibrationError,
    ConfigError,
    FidelityError,
    UnknownKeyError,
    UnsupportedRecipeError,
)
from edgeship.exporters import EXPORTERS, load_builtin
from edgeship.exporters.base import ExportContext, Exporter, Stage
from edgeship.fidelity import compare
from edgeship.manifest import ArtifactRecord, Fidelity, Manifest, sha256_file
from edgeship.targets import TargetProfile, get_profile
from edgeship.vocab import RECIPES

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


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    seconds: float

    def summary(self) -> str:
        """The artifacts as a table: fidelity to the original model, size, export time (an LLM bundle its own)."""
        from edgeship.profiling.report import table

        if self.manifest.llm is not None:
            return table(_llm_rows(self.manifest), ["artifact", "MB", "top-1", "mean KL", "ppl art/ref", "greedy same",
                                                    "peak MB@ctx", "export s"])
        rows = []
        for a in self.manifest.artifacts:
            f = a.fidelity
            kept = a.kept_layers
            rows.append([a.key, f"{a.size_bytes / 2**20:.1f}", f"{f.mean_cosine:.4f}" if f else "-",
                         f"{f.p5_cosine:.4f}" if f and f.p5_cosine is not None else "-",
                         f"{f.min_cosine:.4f}" if f else "-", f"{f.max_abs_err:.2e}" if f else "-",
                         f"{a.export_seconds:.1f}", f"{len(kept)} layer(s) kept in higher precision" if kept else ""])
        return table(rows, ["artifact", "MB", "mean cos", "p5 cos", "min cos", "max abs err", "export s", "notes"])


def _llm_rows(manifest: Manifest) -> list[list[str]]:
    rows = []
    for a in manifest.artifacts:
        f = a.llm_fidelity
        rows.append([a.key, f"{a.size_bytes / 2**20:.1f}", f"{f.top1_agreement:.3f}" if f else "-",
                     f"{f.mean_kl:.4f}" if f else "-", f"{f.perplexity:.2f} / {f.perplexity_reference:.2f}" if f else "-",
                     f"{f.greedy_identical}/{f.n_prompts}" if f else "-",
                     f"{a.details.get('predicted_peak_memory_bytes', 0) / 2**20:.0f}", f"{a.export_seconds:.1f}"])
    for r in (manifest.llm or {}).get("refused", []):
        rows.append([f"{r['format']}/{r['recipe']}", "-", "-", "-", "-", "-", "-", f"REFUSED: {r['reason'][:60]}"])
    return rows


def _plan(target: TargetProfile, formats: Sequence[str] | None, recipes: Sequence[str] | None) -> list[tuple[type[Exporter], str]]:
    """Validate formats x recipes against the exporters' support matrix; collect every problem, raise once."""
    load_builtin()
    problems: list[str] = []
    fmts = list(formats) if formats else [f for f in target.formats if f in EXPORTERS]
    for f in fmts:
        if f not in EXPORTERS:
            problems.append(str(UnknownKeyError("format", f, EXPORTERS.keys())))
    for r in recipes or ():
        if r not in RECIPES:
            problems.append(str(UnknownKeyError("recipe", r, RECIPES)))
    if problems:
        raise ConfigError("; ".join(problems))
    plan: list[tuple[type[Exporter], str]] = []
    for f in fmts:
        exp = EXPORTERS.get(f)
        if recipes:
            for r in recipes:
                try:
                    exp.spec(r)
                    plan.append((exp, r))
                except UnsupportedRecipeError as e:
                    problems.append(str(e))
        else:
            # the profile's preference order: the reference fp32 plus the first quantized recipe
            wanted = ["fp32", *[r for r in target.recipes if r != "fp32" and exp.supports(r)][:1]]
            plan.extend((exp, r) for r in wanted if exp.supports(r))
    if problems:
        raise UnsupportedRecipeError("; ".join(problems))
    if not plan:
        raise ConfigError(f"nothing to export for target {target.name} (formats {fmts})")
    for exp in {e for e, _ in plan}:
        exp.check_environment()
    return plan


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


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle


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


def export(model: Any, *, target: str | TargetProfile = "raspberry-pi-5", out: str | Path,
           formats: Sequence[str] | None = None, recipes: Sequence[str] | None = None,
           calibration: str | Path | None = None, heldout: str | Path | None = None, overwrite: bool = False,
           allow_degraded: bool = False,
           task: str | None = None, example_inputs: Mapping[str, Any] | None = None, seq_len: int | None = None,
           checkpoint: str | None = None, options: Mapping[str, Any] | None = None,
           log: Callable[[str], None] | None = None, jobs: int | None = 1) -> ExportResult:
    """Export ``model`` (HF directory, ``nn.Module``, or ``pkg.module:factory``) for ``target``.

    ``jobs`` > 1 makes artifacts side by side in that many processes (this one and ``jobs - 1`` lanes that load the
    model again: see :mod:`edgeship.export_lanes`), None one per slow artifact up to the CPU count; the bundle lists
    the same artifacts in the same order either way.
    """
    from edgeship import __version__
    from edgeship.export_lanes import export_all

    t_start = time.perf_counter()
    say = log or (lambda m: print(m, file=sys.stderr))
    prof = target if isinstance(target, TargetProfile) else get_profile(target)
    out_dir = Path(out)
    check_output_dir(out_dir.resolve(), overwrite)
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (or auto), got {jobs}")
    plan = _plan(prof, formats, recipes)
    for flag, f in (("calibration", calibration), ("held-out", heldout)):
        if f is not None and not Path(f).is_file():
            raise CalibrationError(f"{flag} file not found: {f}")
    seq = seq_len or prof.sequence_length
    if seq < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq}")
    req = ExportRequest(model, prof, seq, task, example_inputs, checkpoint, calibration, heldout, options,
                        allow_degraded)
    prep = prepare(req, any(e.spec(r).needs_calibration for e, r in plan), say)
    lm, held, reference = prep.lm, prep.held, prep.reference

    with BundleWriter(out_dir, overwrite=overwrite) as writer, \
            tempfile.TemporaryDirectory(prefix="edgeship-work-") as tmp:
        records = export_all(req, prep, plan, writer, Path(tmp), jobs, say)
        for name, src in lm.files_to_copy.items():
            shutil.copyfile(src, writer.path(name))
        samples = held[:N_SAMPLES_IN_BUNDLE]
        _savez(writer.path("samples/inputs.npz"), {k: np.concatenate([f[k] for f in samples]) for k in samples[0]})
        _savez(writer.path("samples/outputs.npz"),
               {k: np.concatenate([r[k] for r in reference[:N_SAMPLES_IN_BUNDLE]]) for k in reference[0]})
        if lm.labels:
            writer.path("labels.txt").write_text("\n".join(lm.labels) + "\n", encoding="utf-8")
        manifest = Manifest(
            model={"name": lm.name, "task": lm.task, "source": lm.source, "source_sha256": lm.source_sha256,
                   "parameters": lm.parameters},
            target={"name": prof.name, "display_name": prof.display_name, "arch": prof.arch, "threads": prof.threads},
            inputs=lm.inputs, outputs=lm.outputs, dims=lm.dims, preprocessing=lm.preprocessing,
            artifacts=tuple(records),
            samples={"inputs": "samples/inputs.npz", "outputs": "samples/outputs.npz",
                     "note": f"{len(samples)} held-out inputs and the PyTorch outputs for them"},
            labels=lm.labels, edgeship_version=__version__,
            created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        manifest.model["export_host"] = {"arch": platform.machine(), "python": platform.python_version(),
                                         "calibration": prep.calib_source, "heldout": prep.held_source,
                                         "heldout_inputs": len(held), "search_inputs": len(prep.search),
                                         "search_shares_heldout": any(f is g for f in prep.search for g in held),
                                         "warnings": prep.warnings}
        path = writer.commit(manifest)
    return ExportResult(path, manifest, time.perf_counter() - t_start)
