"""The Decide commands' CLI pieces: ``profile --sweep``, ``report --record``, ``predict``. Kept out of cli.py so
that file only wires them in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgeship.errors import ConfigError


def add_sweep_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="measure every artifact in each setting: threads=1,2,4 and/or cores=big,little,all (core sets "
                        "from the target profile's clusters, pinned with CPU affinity)")


def add_record_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--record", metavar="BUNDLE", help="write the pick (artifact, threads, cores) into this bundle's "
                   "manifest as the recommended runtime setting for its target")


def _target_of(a: argparse.Namespace) -> Any:
    from edgeship.manifest import MANIFEST_NAME
    from edgeship.targets import get_profile

    name = a.target
    if name is None:
        src = Path(a.source)
        manifest = src / MANIFEST_NAME if src.is_dir() else src if src.name == MANIFEST_NAME else None
        if manifest is None or not manifest.is_file():
            raise ConfigError("--sweep cores=... needs the target's core clusters: give --target NAME "
                              "(see `edgeship targets`) or profile a bundle directory")
        name = json.loads(manifest.read_text()).get("target", {}).get("name")
    return get_profile(str(name))


def profile_sweep_cmd(a: argparse.Namespace, cfg: Any) -> int:
    from edgeship import quiet
    from edgeship.profiling import report
    from edgeship.profiling.html import write_html
    from edgeship.profiling.results import DeviceRun
    from edgeship.profiling.runner import profile, write_json_atomic
    from edgeship.profiling.sweep import clusters_of, parse_sweep, run_sweep

    if a.device or a.inventory:
        raise ConfigError("--sweep runs on this machine: run it on the device (copy the bundle there)")
    sweep = parse_sweep(a.sweep)
    target = _target_of(a) if any(sweep.cores) else None
    with quiet.for_command("profile", a.verbose):  # the runtimes' own chatter goes to a log, as for a plain profile
        res = run_sweep(a.source, sweep, cfg, clusters_of(target), target.name if target else "the target",
                        profile, on_setting=lambda s: print(f"== {s}", flush=True), artifact=a.artifact,
                        isolate=not a.no_isolate, pubkey=a.pubkey)
    if a.json_path:
        write_json_atomic(Path(a.json_path), res.to_json())
    print(report.render(res))
    for n in res.notes:
        print(f"note: {n}")
    if a.html_path:
        print(f"HTML report: {write_html([DeviceRun(res)], Path(a.html_path))}")
    return 0 if res.ok else 1


def _check_measured_on_target(device: Any, target: Any, where: str) -> None:
    """A recommended setting must be measured on the target itself: same architecture, and its board when the
    profile names boards. A sweep on the build machine says nothing about a phone's cores."""
    arch, board = getattr(device, "arch", None), getattr(device, "board", None)
    if getattr(device, "emulated", None):
        raise ConfigError(f"--record: {where} was emulated ({device.emulated}); sweep on the {target.name} itself")
    if arch != target.arch or (target.boards and not target.is_board(board)):
        raise ConfigError(f"--record: the pick was measured on {where} ({arch}, board {board or 'unknown'}), not on a "
                          f"{target.name} ({target.arch}{', ' + ' / '.join(target.boards) if target.boards else ''}); "
                          "run the sweep on the target device and report those results")


def record_pick(bundle: str | Path, decision: Any, runs: Any) -> str:
    """The decision's pick as ``target.recommended`` in the bundle's manifest (rewritten atomically)."""
    from edgeship.manifest import MANIFEST_NAME, load_bundle
    from edgeship.profiling.runner import write_json_atomic
    from edgeship.profiling.sweep import recommended
    from edgeship.targets import get_profile

    if decision.pick is None:
        raise ConfigError("--record: nothing meets the budget, so there is no setting to record")
    b = load_bundle(bundle, verify=True)
    pick = decision.pick
    b.manifest.artifact(pick.artifact)  # the pick must be one of this bundle's artifacts
    run = next(r for r in runs if r.name == pick.device and r.profile is not None)
    _check_measured_on_target(run.profile.device, get_profile(str(b.manifest.target.get("name"))), pick.device)
    path = Path(bundle) / MANIFEST_NAME
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["target"]["recommended"] = {
        **recommended(pick.to_dict()), "objective": decision.objective, "budget": decision.budget.to_dict(),
        "p50_ms": pick.p50_ms, "p99_ms": pick.p99_ms, "mj_per_inference": pick.mj_per_inference,
        "energy_estimated": pick.energy_estimated, "measured_on": pick.device}
    write_json_atomic(path, json.dumps(doc, indent=2))
    from edgeship.signing import SIGNATURE_NAME

    signed = (Path(bundle) / SIGNATURE_NAME).exists()
    return (f"recorded {pick.name} as the recommended setting for {doc['target'].get('name')} in {path}"
            + (" (the bundle was signed: sign it again, its manifest changed)" if signed else ""))


def add_report_predictions_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", metavar="FILE", help="show `edgeship predict --json` predictions next to the "
                   "measurements (labelled as predictions)")


def add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="PREDICT latency on a target you do not have (roofline x fitted efficiency)")
    p.add_argument("bundle")
    p.add_argument("--target", required=True, help="target profile name or TOML file to predict for")
    p.add_argument("--fit", action="append", default=[], metavar="RESULTS.json",
                   help="measured results to fit each runtime's efficiency on (repeatable)")
    p.add_argument("--fit-profile", help="target profile (name or TOML) of the device the --fit results were "
                   "measured on (default: the profile whose board matches the results' device)")
    p.add_argument("--artifact", action="append", default=[], help="only these artifacts (FORMAT/RECIPE)")
    p.add_argument("--json", dest="json_path", help="write predictions and the fitted efficiencies as JSON")
    p.add_argument("--html", dest="html_path", help="write the report of the --fit results with the predictions")
    p.set_defaults(fn=predict_cmd)


def _profile_of(run: Any, given: str | None) -> Any:
    from edgeship.targets import get_profile, list_profiles

    if given:
        return get_profile(given)
    board = run.profile.device.board if run.profile else None
    match = [p for p in list_profiles() if board and p.is_board(board)]
    if not match:
        raise ConfigError(f"--fit results from {run.name}: which target profile describes that device? give "
                          "--fit-profile NAME_OR_TOML (its peak compute and bandwidth are what the fit divides by)")
    return match[0]


def predict_cmd(a: argparse.Namespace) -> int:
    from edgeship.bundle import opened

    with opened(a.bundle) as root:
        return _predict(a, root)


def _predict(a: argparse.Namespace, root: Path) -> int:
    import statistics

    from edgeship.manifest import load_bundle
    from edgeship.profiling import predict
    from edgeship.profiling.decide import load_documents
    from edgeship.targets import get_profile

    bundle = load_bundle(root, verify=True)
    target = get_profile(a.target)
    arts = [bundle.manifest.artifact(x) for x in a.artifact] or list(bundle.manifest.artifacts)
    costs = {art.key: predict.graph_cost(bundle, art) for art in arts}
    runs = load_documents(a.fit)
    points: list[tuple[str, str, str, float, float]] = []
    measured: dict[str, list[float]] = {}
    for run in runs:
        if run.profile is None:
            continue
        prof = _profile_of(run, a.fit_profile)
        points += predict.fit_points(costs, run.profile, prof)
        if prof.name == target.name:
            for r in run.profile.results:
                if r.ok and r.latency and not r.setting:
                    measured.setdefault(r.artifact, []).append(r.latency.p50_ms)
    preds = predict.predict(list(costs.values()), target, predict.fit(points),
                            {k: statistics.median(v) for k, v in measured.items()})
    print(predict.render(preds))
    if a.json_path:
        predict.save(preds, predict.fit(points), Path(a.json_path))
    if a.html_path:
        from edgeship.profiling.html import write_html

        print(f"HTML report: {write_html(runs, Path(a.html_path), extra=[predict.html_section(preds)])}")
    return 0
