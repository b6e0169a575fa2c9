"""``edgeship history`` and ``edgeship compare``, and the history options of ``edgeship profile``."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship import history as hist
from edgeship.compare import (
    DEFAULT_ALPHA,
    DEFAULT_TOLERANCE,
    Comparison,
    compare_samples,
    regressions,
    render,
)
from edgeship.errors import ConfigError
from edgeship.profiling.llm.results import LLMArtifactResult, LLMProfileResult, LLMRunConfig, llm_documents
from edgeship.profiling.results import ArtifactResult, DeviceRun, FleetResult, ProfileResult, Status

EXIT_FAIL = 1


def add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", metavar="PATH", help=f"history database to append to (default: ${hist.ENV_VAR}, "
                   "else ~/.local/share/edgeship/history.sqlite)")
    p.add_argument("--no-history", action="store_true", help="do not record this run in the history database")


def record_profile(a: argparse.Namespace, runs: Sequence[DeviceRun], source: str | Path) -> None:
    """Append the runs (a failure to record is a warning: the measurement itself is already on screen)."""
    if getattr(a, "no_history", False):
        return
    try:
        ids = hist.record_all(runs, source, a.history)
    except hist.HistoryError as e:
        print(f"edgeship: warning: not recorded in the history: {e}", file=sys.stderr)
        return
    print(f"history: run {', '.join(map(str, ids))} in {a.history or hist.default_path()}", file=sys.stderr)


def record_llm_profile(a: argparse.Namespace, res: LLMProfileResult, source: str | Path) -> None:
    """Append an LLM profile (a failure to record is a warning, as for :func:`record_profile`)."""
    if getattr(a, "no_history", False):
        return
    try:
        with hist.open_history(a.history) as conn:
            rid = hist.record_llm(conn, res, source)
    except hist.HistoryError as e:
        print(f"edgeship: warning: not recorded in the history: {e}", file=sys.stderr)
        return
    print(f"history: run {rid} in {a.history or hist.default_path()}", file=sys.stderr)


def llm_as_run(res: LLMProfileResult) -> DeviceRun:
    """An LLM profile as compare reads it: each artifact's samples are its raw per-token decode times."""
    results = tuple(ArtifactResult(artifact=r.artifact, status=Status.OK if r.status == "ok" else Status.ERROR,
                                   error=r.error, format=r.format, recipe=r.recipe, threads=r.threads,
                                   samples_ns=tuple(r.token_ns)) for r in res.results)
    prof = ProfileResult(res.device, None, results, res.source, res.target, res.created_utc, res.edgeship_version)
    return DeviceRun(prof, url=res.device_url, identity={**res.device_identity, "place": res.device_name, "kind": "llm"})


def _kind(run: DeviceRun) -> str:
    return str(run.identity.get("kind") or "encoder")


def _load_doc(path: str) -> list[DeviceRun]:
    return [r for r, _ in _load_keyed(path)]


def _load_keyed(path: str) -> list[tuple[DeviceRun, str]]:
    """The runs in a results file, each with its history key."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror}); give a results file from edgeship profile --json "
                          "or a run id from edgeship history") from None
    except ValueError as e:
        raise ConfigError(f"{p}: not JSON ({e}); give a results file from edgeship profile --json") from None
    if not isinstance(d, dict) or not ("runs" in d or "results" in d):
        raise ConfigError(f"{p}: not an edgeship results file (no 'results' or 'runs')")
    if d.get("kind") == "llm":
        return [(llm_as_run(res), hist.llm_run_key(res)) for res in llm_documents(d)]
    return [(r, hist.run_key(r)) for r in hist.runs_of(FleetResult.from_dict(d) if "runs" in d
                                                       else DeviceRun.from_dict(d))]


# --- compare ---------------------------------------------------------------------------------------------------

def _history_match(conn: sqlite3.Connection, device: str, r: ArtifactResult, new_id: int | None,
                   only_run: int | None, kind: str = "encoder") -> hist.Entry | None:
    """The newest ok result of the same artifact on the same device: same sha256, else same model + key. An LLM's
    per-token times are only ever compared with another LLM profile's."""
    mine = conn.execute("SELECT artifact_sha256, model_sha256 FROM results WHERE run_id = ? AND artifact = ?",
                        (new_id, r.artifact)).fetchone() if new_id else None
    tries: list[tuple[str, list[Any]]] = []
    if mine and mine[0]:
        tries.append(("x.artifact_sha256 = ?", [mine[0]]))
    if mine and mine[1]:
        tries.append(("x.model_sha256 = ? AND x.artifact = ?", [mine[1], r.artifact]))
    if not (mine and mine[1]):  # a bundle's artifact never falls back to another model's artifact of that name
        tries.append(("x.artifact = ?", [r.artifact]))
    scope = ("r.id = ?", [only_run]) if only_run is not None else ("r.device = ?", [device])
    for cond, args in tries:
        sql = (hist.SELECT_ENTRIES + f" WHERE {cond} AND {scope[0]} AND x.status = 'ok' AND x.n_samples > 0"
               " AND x.kind = ?" + (" AND r.id < ?" if new_id and only_run is None else "")
               + " ORDER BY r.id DESC LIMIT 1")
        row = conn.execute(sql, [*args, *scope[1], kind, *([new_id] if new_id and only_run is None else [])]).fetchone()
        if row is not None:
            return hist.entry_from_row(row)
    return None


def _file_match(base_runs: Sequence[DeviceRun], device: str, r: ArtifactResult) -> ArtifactResult | None:
    same = [b for b in base_runs if hist.device_name(b) == device]
    pool = same or (base_runs if len(base_runs) == 1 else [])  # one device in the file: compare with it
    for b in pool:
        for x in b.profile.results if b.profile else ():
            if x.artifact == r.artifact and x.ok and x.samples_ns:
                return x
    return None


def _compare(new_runs: Sequence[tuple[DeviceRun, int | None]], a: argparse.Namespace,
             conn: sqlite3.Connection | None) -> list[Comparison]:
    """``new_runs``: each device's run with its history id (None when it is not recorded)."""
    base = a.baseline
    base_runs = _load_doc(base) if base not in ("last",) and not base.isdigit() else None
    only_run = int(base) if base.isdigit() else None
    if conn is None and base_runs is None:
        raise ConfigError(f"--baseline {base} needs the history database; none at {a.history or hist.default_path()}")
    if conn is not None and only_run is not None:
        hist.check_run(conn, only_run)
    kinds = {_kind(r) for r, _ in new_runs} | {_kind(r) for r in base_runs or ()}
    if len(kinds) > 1:
        raise ConfigError(f"{a.new} and {base} are an encoder and an LLM profile: compare LLM results only with LLM "
                          "results (decode time per token)")
    out = []
    for run, new_id in new_runs:
        device = hist.device_name(run)
        for r in run.profile.results if run.profile else ():
            if not r.ok or not r.samples_ns:
                out.append(Comparison(device, r.artifact, "not measured", note=r.error or str(r.status)))
                continue
            if base_runs is not None:
                x = _file_match(base_runs, device, r)
                base_ns, where = (np.asarray(x.samples_ns) if x else None), base
            else:
                assert conn is not None
                e = _history_match(conn, device, r, new_id, only_run, _kind(run))
                base_ns, where = (e.samples_ns if e else None), (f"run {e.run_id}" if e else None)
            if base_ns is None:
                out.append(Comparison(device, r.artifact, "no baseline", note=f"no ok run of {r.artifact} on {device} "
                                      f"in {base if base_runs is not None else 'the history'}"))
                continue
            out.append(compare_samples(r.samples_ns, base_ns, device=device, artifact=r.artifact, baseline=where or "",
                                       alpha=a.alpha, tolerance=a.tolerance / 100))
    return out


def cmd_compare(a: argparse.Namespace) -> int:
    if a.fail_on_regression is not None and a.fail_on_regression < 0:
        raise ConfigError(f"--fail-on-regression {a.fail_on_regression}: expected a slowdown in percent >= 0")
    if not 0 < a.alpha < 1 or a.tolerance < 0:
        raise ConfigError(f"--alpha {a.alpha} / --tolerance {a.tolerance}: need 0 < alpha < 1 and tolerance >= 0")
    path = Path(a.history) if a.history else hist.default_path()
    needs_db = a.baseline == "last" or a.baseline.isdigit() or (a.new.isdigit() and not Path(a.new).exists())
    new_runs: list[tuple[DeviceRun, int | None]]
    if not needs_db and not path.is_file():
        new_runs = [(r, None) for r in _load_doc(a.new)]
        rows = _compare(new_runs, a, None)
    else:
        with hist.open_history(path, create=False) as conn:
            if a.new.isdigit() and not Path(a.new).exists():
                new_runs = [(_new_from_history(conn, int(a.new)), int(a.new))]
            else:
                new_runs = [(r, _run_id_by_key(conn, k)) for r, k in _load_keyed(a.new)]
            rows = _compare(new_runs, a, conn)
    if a.json_path:
        from edgeship.profiling.runner import write_json_atomic

        write_json_atomic(Path(a.json_path), json.dumps([c.to_dict() for c in rows], indent=2))
    print(render(rows, a.alpha, a.tolerance / 100))
    if any(_kind(r) == "llm" for r, _ in new_runs):
        print("LLM artifacts: the samples are the per-token decode times (p50 is ms per generated token)")
    if a.fail_on_regression is not None:
        bad = regressions(rows, a.fail_on_regression)
        if bad:
            print(f"REGRESSION: {', '.join(f'{c.device} {c.artifact} {c.change_pct:+.1f}%' for c in bad)} "
                  f"(--fail-on-regression {a.fail_on_regression:g}%)", file=sys.stderr)
            return EXIT_FAIL
    return 0


def _run_id_by_key(conn: sqlite3.Connection, key: str) -> int | None:
    row = conn.execute("SELECT id FROM runs WHERE run_key = ?", (key,)).fetchone()
    return int(row[0]) if row else None


def _new_from_history(conn: sqlite3.Connection, rid: int) -> DeviceRun:
    """A recorded run rebuilt as a DeviceRun: its device name and per-artifact samples, what compare reads."""
    from edgeship.profiling.results import DeviceInfo

    hist.check_run(conn, rid)
    row = conn.execute("SELECT device, identity_json FROM runs WHERE id = ?", (rid,)).fetchone()
    if json.loads(row["identity_json"]).get("kind") == "llm":
        return _llm_from_history(conn, rid, row["device"])
    results = []
    for x in conn.execute("SELECT result_json, samples FROM results WHERE run_id = ? ORDER BY id", (rid,)):
        d = json.loads(x["result_json"])
        d["samples_ns"] = hist.unpack_samples(x["samples"]).tolist()
        results.append(ArtifactResult.from_dict(d))
    prof = ProfileResult(DeviceInfo(), None, tuple(results), "", None, "", "")
    return DeviceRun(prof, identity={**json.loads(row["identity_json"]), "place": row["device"]})


def _llm_from_history(conn: sqlite3.Connection, rid: int, device: str) -> DeviceRun:
    from edgeship.profiling.results import DeviceInfo

    results = []
    for x in conn.execute("SELECT result_json, samples FROM results WHERE run_id = ? ORDER BY id", (rid,)):
        d = json.loads(x["result_json"])
        d["token_ns"] = hist.unpack_samples(x["samples"]).tolist()
        results.append(LLMArtifactResult.from_dict(d))
    run = llm_as_run(LLMProfileResult(DeviceInfo(), LLMRunConfig(), tuple(results), "", None, "", ""))
    return DeviceRun(run.profile, identity={"place": device, "kind": "llm"})


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def cmd_history(a: argparse.Namespace) -> int:
    from edgeship.profiling.report import table

    with hist.open_history(a.history, create=False) as conn:
        rows = hist.query(conn, model=a.model, device=a.device, artifact=a.artifact, run_id=a.run,
                          limit=hist.parse_limit(a.limit))
    if a.json:
        print(json.dumps([e.to_dict() for e in rows], indent=2))
        return 0
    print(table([[str(e.run_id), e.recorded_utc, e.device, e.model_name or "-", e.artifact,
                  (e.artifact_sha256 or "-")[:12], e.status, _num(e.p50_ms, ".3f"), _num(e.p99_ms, ".3f"),
                  str(e.n_samples), "-" if e.ttft_ms is None else f"{e.ttft_ms:.3g}@{e.ttft_prompt_tokens}",
                  _num(e.decode_tokens_per_s, ".1f"), str(e.threads or "-"), e.edgeship_version or "-"] for e in rows],
                ["run", "recorded (UTC)", "device", "model", "artifact", "sha256", "status", "p50 ms", "p99 ms",
                 "samples", "TTFT ms@tok", "decode tok/s", "threads", "edgeship"]))
    if any(e.kind == "llm" for e in rows):
        print("LLM rows: p50/p99 ms and samples are per generated token (decode, after the first token)")
    return 0


def add_parsers(sub: Any) -> None:
    h = sub.add_parser("history", help="list earlier profile runs from the history database")
    h.add_argument("--model", help="model name or a prefix of its source sha256")
    h.add_argument("--device", help="device: farm place, inventory name, URL, or hostname for local runs")
    h.add_argument("--artifact", help="FORMAT/RECIPE")
    h.add_argument("--run", type=int, help="one run id")
    h.add_argument("--limit", help="at most this many rows (newest first)")
    h.add_argument("--json", action="store_true", help="JSON instead of a table")
    h.add_argument("--history", metavar="PATH", help=f"database (default: ${hist.ENV_VAR} or the user data dir)")
    h.set_defaults(fn=cmd_history)

    c = sub.add_parser("compare", help="per artifact: faster / slower / indistinguishable against a baseline")
    c.add_argument("new", help="results JSON from edgeship profile --json, or a run id from edgeship history")
    c.add_argument("--baseline", default="last", help="last (the previous run of each artifact on the same device), "
                   "a results JSON file, or a run id (default: %(default)s)")
    c.add_argument("--fail-on-regression", type=float, metavar="PCT",
                   help="exit 1 when an artifact is slower by at least PCT percent")
    c.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="significance level (default %(default)s)")
    c.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE * 100, metavar="PCT",
                   help="changes whose interval reaches within +/-PCT%% count as indistinguishable "
                        "(default %(default)g)")
    c.add_argument("--json", dest="json_path", help="write the comparison as JSON")
    c.add_argument("--history", metavar="PATH", help=f"database (default: ${hist.ENV_VAR} or the user data dir)")
    c.set_defaults(fn=cmd_compare)
