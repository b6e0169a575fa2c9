"""The typed device-side results: JSON round trips, files written by earlier versions, and the import graph."""

from __future__ import annotations

import ast
import dataclasses
import json
import pkgutil
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from types import ModuleType

import pytest

import edgeship
import edgeship.profiling
from edgeship.errors import ConfigError
from edgeship.profiling.decide import load_documents
from edgeship.profiling.report import render
from edgeship.profiling.results import ArtifactResult, DeviceRun, FleetResult, ProfileResult, RunConfig
from edgeship.profiling.worker import Job

V1 = Path(__file__).parent / "data" / "results-v1.json"  # written by `edgeship profile --json` before results.py


def test_a_file_from_before_the_dataclasses_reads_and_writes_back_unchanged() -> None:
    doc = json.loads(V1.read_text())
    res = ProfileResult.from_dict(doc)
    (r,) = res.results
    assert r.ok and r.artifact == "onnx/int8-dynamic" and r.latency is not None and r.latency.count == 3
    assert r.memory is not None and r.memory.peak_rss_mb == doc["results"][0]["peak_rss_mb"]
    assert r.input is not None and r.input.source == "bundle held-out sample 0"
    assert r.device_check is not None and r.fidelity is not None and r.energy is not None and r.energy.estimated
    assert res.config == RunConfig.from_dict(doc["config"]) and res.device.arch == doc["device"]["arch"]
    again = json.loads(res.to_json())
    old = doc["results"][0]
    # every key the old file has comes back with its value; the new writer only adds empty ones
    assert {k: again["results"][0][k] for k in old} == old
    assert all(again["results"][0][k] is None for k in set(again["results"][0]) - set(old))
    assert {k: v for k, v in again.items() if k not in ("results", "config")} == \
        {k: v for k, v in doc.items() if k not in ("results", "config")}
    # run options added since (simulate_npu) come back at their defaults
    assert again["config"] == {**RunConfig().to_dict(), **doc["config"]}
    assert ProfileResult.from_dict(again) == res
    assert "input: bundle held-out sample 0: input_ids 1x128" in render(res)


def test_newer_schema_and_unknown_config_keys_are_refused() -> None:
    doc = json.loads(V1.read_text())
    with pytest.raises(ConfigError, match="schema_version 2"):
        ProfileResult.from_dict({**doc, "schema_version": 2})
    with pytest.raises(ConfigError, match="unknown key.*turbo"):
        RunConfig.from_dict({**doc["config"], "turbo": True})


def test_run_config_and_job_round_trip() -> None:
    cfg = RunConfig(runs=7, shapes={"input_ids": (1, 16)}, options={"delegate": "/x.so"}, threads=2, per_op=True)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    job = Job(cfg, bundle="/b", artifact="onnx/fp32")
    assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job and job.label == "onnx/fp32"
    assert Job(cfg, file="/m/model.tflite").label == "model.tflite"
    npu_job = Job(RunConfig(simulate_npu=True), bundle="/b", artifact="onnx/npu", npu="simulate")
    assert Job.from_dict(json.loads(json.dumps(npu_job.to_dict()))) == npu_job and npu_job.label == "onnx/npu@htp"
    with pytest.raises(ConfigError, match="npu mode 'turbo'"):
        Job.from_dict({**npu_job.to_dict(), "npu": "turbo"})


def test_an_npu_job_without_the_npu_is_neither_a_failure_nor_a_measurement() -> None:
    from edgeship.profiling.results import NpuRun, Status

    doc = json.loads(V1.read_text())
    skipped = ArtifactResult(artifact="onnx/npu@htp", status=Status.SKIPPED, format="qnn",
                             npu=NpuRun("absent", "no Hexagon NPU is present: x86_64", "use --simulate-npu"))
    simulated = ArtifactResult(artifact="onnx/npu@htp", status=Status.SIMULATED, format="qnn",
                               npu=NpuRun("simulate", "x86_64", "SIMULATED", (7.5, 6.25)))
    for r in (skipped, simulated):
        assert ArtifactResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
        assert not r.ok and not r.failed
    res = dataclasses.replace(ProfileResult.from_dict(doc), results=(skipped, simulated))
    assert res.ok and not dataclasses.replace(res, results=(ArtifactResult(artifact="x"),)).ok
    text = render(res)
    assert "SKIPPED: no Hexagon NPU here" in text and "onnx/npu@htp: use --simulate-npu" in text


def test_fleet_document_round_trips_with_failed_and_partial_devices(tmp_path: Path) -> None:
    prof = ProfileResult.from_dict(json.loads(V1.read_text()))
    failed = ArtifactResult(artifact="onnx/fp32", error="worker exited with code -9 and wrote no result")
    partial = dataclasses.replace(prof, results=(*prof.results, failed))
    fleet = FleetResult((
        DeviceRun(prof, url="ssh://pi@a", identity={"name": "a", "port": 22}, timings_s={"push": 0.5}),
        DeviceRun(partial, url="ssh://pi@b", identity={"name": "b"}, status="error", error="connection lost"),
        DeviceRun(None, url="ssh://pi@c", status="error", error="cannot connect to c:22: connection refused"),
    ))
    doc = json.loads(fleet.to_json())
    assert "results" not in doc["runs"][2] and doc["runs"][1]["results"][1]["status"] == "error"
    assert FleetResult.from_dict(doc) == fleet
    assert not fleet.ok and fleet.runs[0].ok and fleet.runs[0].name == "ssh://pi@a"
    f = tmp_path / "fleet.json"
    f.write_text(fleet.to_json())
    assert load_documents([f, V1]) == [*fleet.runs, DeviceRun(prof)]


def _module_files(pkg: ModuleType) -> dict[str, Path]:
    """Every module of a package and its file (``walk_packages`` imports the subpackages, not the modules)."""
    out = {pkg.__name__: Path(pkg.__file__ or "")}
    for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}."):
        d = Path(getattr(m.module_finder, "path", "")) / m.name.rsplit(".", 1)[-1]
        out[m.name] = d / "__init__.py" if m.ispkg else d.with_suffix(".py")
    return out


def _module_imports(path: Path, modules: Collection[str]) -> set[str]:
    """Which of ``modules`` a file imports, at the top or inside functions (not under TYPE_CHECKING): ``from p
    import x`` imports ``p.x`` when that is a module, else ``p``."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            out.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out & set(modules)


def _device_modules() -> list[str]:
    return sorted(n for n in _module_files(edgeship.profiling) if n != "edgeship.profiling")


def test_no_import_cycle_in_the_package() -> None:
    """Not even through an import inside a function (the export side, the CLI and the device side alike); the
    package's own lazy attributes (``edgeship.export``) name their modules as strings and are not imports."""
    import edgeship.exporters
    import edgeship.targets

    files = {n: f for pkg in (edgeship, edgeship.exporters, edgeship.targets, edgeship.profiling)
             for n, f in _module_files(pkg).items()}  # the subpackages live beside sdk/, not in it
    assert {"edgeship.pipeline", "edgeship.exporters.base", "edgeship.profiling.worker"} <= files.keys()
    graph = {n: _module_imports(p, files) - {n} for n, p in files.items()}

    def visit(n: str, stack: tuple[str, ...], done: set[str]) -> None:
        assert n not in stack, f"import cycle: {' -> '.join((*stack[stack.index(n):], n))}"
        if n not in done:
            for m in sorted(graph[n]):
                visit(m, (*stack, n), done)
            done.add(n)

    done: set[str] = set()
    for n in graph:
        visit(n, (), done)


def test_every_device_module_imports_with_torch_blocked() -> None:
    mods = _device_modules()
    assert "edgeship.profiling.results" in mods and "edgeship.profiling.worker" in mods
    code = ("import importlib, sys\n"
            "for n in ('torch', 'transformers', 'executorch', 'litert_torch', 'torchao'): sys.modules[n] = None\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "assert 'edgeship.exporters' not in sys.modules, 'the device side imported the exporters'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
