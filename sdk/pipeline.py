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
from dataclasses import dataclass
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
        b = backends.load(path, fmt, threads=None, options=options or {})
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


def export(model: Any, *, target: str | TargetProfile = "raspberry-pi-5", out: str | Path,
           formats: Sequence[str] | None = None, recipes: Sequence[str] | None = None,
           calibration: str | Path | None = None, heldout: str | Path | None = None, overwrite: bool = False,
           allow_degraded: bool = False,
           task: str | None = None, example_inputs: Mapping[str, Any] | None = None, seq_len: int | None = None,
           checkpoint: str | None = None, options: Mapping[str, Any] | None = None,
           log: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``model`` (HF directory, ``nn.Module``, or ``pkg.module:factory``) for ``target``."""
    from edgeship import __version__
    from edgeship.models import load_calibration, load_model

    t_start = time.perf_counter()
    say = log or (lambda m: print(m, file=sys.stderr))
    prof = target if isinstance(target, TargetProfile) else get_profile(target)
    out_dir = Path(out)
    check_output_dir(out_dir.resolve(), overwrite)
    plan = _plan(prof, formats, recipes)
    for flag, f in (("calibration", calibration), ("held-out", heldout)):
        if f is not None and not Path(f).is_file():
            raise CalibrationError(f"{flag} file not found: {f}")
    seq = seq_len or prof.sequence_length
    if seq < 2:
        raise ConfigError(f"--seq-len must be >= 2, got {seq}")

    say(f"loading model {model if not hasattr(model, 'forward') else type(model).__name__}...")
    lm = load_model(model, task=task, example_inputs=example_inputs, seq_len=seq, image_size=prof.image_size,
                    checkpoint=checkpoint)
    if "sequence" in lm.dims:
        seq = lm.dims["sequence"]["default"]
    calib_pool, _ = split_corpus()
    held, search, held_source = _heldout_sets(lm, heldout, prof, seq)
    needs_calib = any(e.spec(r).needs_calibration for e, r in plan)
    warnings: list[str] = []
    if calibration is not None:
        calib = load_calibration(calibration, lm, seq)
        calib_source = str(calibration)
    else:
        calib = lm.sample_inputs(len(calib_pool), seed=2, seq_len=seq, image_size=prof.image_size, corpus=calib_pool)
        calib_source = ("built-in generic English corpus (32 sentences)" if lm.input_kind == "text"
                        else "synthetic N(0,1) inputs")
        if needs_calib:
            w = (f"no --calibration given: static quantization calibrates on the {calib_source}; for accuracy on "
                 "your data pass --calibration FILE with a few hundred real inputs")
            warnings.append(w)
            say(f"WARNING: {w}")
    reference = [lm.run_torch(f) for f in held]
    final_check = Evaluator(lm, held, reference, prof)
    search_ref = [lm.run_torch(f) for f in search]
    evaluate = Evaluator(lm, search, search_ref, prof)  # what exporters and the search score with

    records: list[ArtifactRecord] = []
    shared: dict[Any, Any] = {}  # what exporters reuse across the recipes of this export (ExportContext.shared)
    with BundleWriter(out_dir, overwrite=overwrite) as writer, \
            tempfile.TemporaryDirectory(prefix="edgeship-work-") as tmp:
        workdir = Path(tmp)
        for i, (exp_cls, recipe) in enumerate(plan, 1):
            fmt = exp_cls.format
            say(f"[{i}/{len(plan)}] {fmt}/{recipe}")
            ctx = ExportContext(model=lm, target=prof, workdir=workdir, calibration=calib, calibration_source=calib_source,
                                heldout=search, reference=search_ref, format=fmt, recipe=recipe, shared=shared,
                                evaluate=lambda p, f, o, r=recipe: evaluate(p, f, o, r),
                                options=dict(options or {}), allow_degraded=allow_degraded, log=say)
            rel = f"{fmt}/{recipe}{exp_cls.suffix}"
            dest = writer.path(rel)
            t0 = time.perf_counter()
            res = exp_cls().export(ctx, recipe, dest)
            if res.path != dest:
                shutil.move(str(res.path), dest)
            with ctx.stage(Stage.VALIDATE):  # on the 64 held-out inputs the search never saw
                fid = final_check(dest, fmt, res.runtime.get("options", {}), recipe)
            secs = time.perf_counter() - t0
            if not fid.passed:
                msg = (f"{fmt}/{recipe}: mean cosine {fid.mean_cosine:.4f} vs PyTorch is below the {prof.name} floor "
                       f"{fid.floor_mean_cosine}; try a higher-precision recipe or calibration data like your real "
                       "inputs, or pass --allow-degraded to keep it")
                if not allow_degraded:
                    raise FidelityError(msg)
                res.warnings.append("DEGRADED: " + msg)
            say(f"[{i}/{len(plan)}] {fmt}/{recipe}: {dest.stat().st_size / 2**20:.1f} MB, mean cosine "
                f"{fid.mean_cosine:.4f} (min {fid.min_cosine:.4f}), {secs:.1f} s")
            records.append(ArtifactRecord(
                path=rel, format=fmt, recipe=recipe, sha256=sha256_file(dest), size_bytes=dest.stat().st_size,
                export_seconds=round(secs, 3), fidelity=fid, runtime=res.runtime,
                stages={str(k): round(v, 3) for k, v in ctx.stages.items()}, quantization=res.quantization,
                details=res.details, warnings=tuple(res.warnings),
            ))

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
                                         "calibration": calib_source, "heldout": held_source,
                                         "heldout_inputs": len(held), "search_inputs": len(search),
                                         "search_shares_heldout": any(f is g for f in search for g in held),
                                         "warnings": warnings}
        path = writer.commit(manifest)
    return ExportResult(path, manifest, time.perf_counter() - t_start)
