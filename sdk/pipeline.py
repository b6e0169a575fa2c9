"""``edgeship.export`` (this module is ``edgeship.pipeline``): one call from a fine-tuned model to a checked, quantized bundle.

Stages per artifact: load -> (calibrate/quantize) -> lower -> serialize -> validate.
Every artifact is run through the same torch-free runner backend the device uses and
compared with PyTorch on held-out inputs; the numbers go into the manifest.
"""

from __future__ import annotations

import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.bundle import BundleWriter, check_output_dir
from edgeship.errors import CalibrationError, ConfigError, UnknownKeyError, UnsupportedRecipeError
from edgeship.export_lanes import export_all
from edgeship.export_steps import N_SAMPLES_IN_BUNDLE, ExportRequest, prepare
from edgeship.exporters import EXPORTERS, load_builtin
from edgeship.exporters.base import Exporter
from edgeship.manifest import Manifest
from edgeship.targets import TargetProfile, get_profile
from edgeship.vocab import RECIPES


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


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle


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
