"""Every profile run, kept: a SQLite database of results with their raw latency samples.

``edgeship profile`` appends each device's run (local, ``ssh://`` or farm) unless ``--no-history``;
``edgeship history`` lists them and ``edgeship compare`` tests a new run against an earlier one. The file is
``--history PATH``, else ``$EDGESHIP_HISTORY``, else ``$XDG_DATA_HOME/edgeship/history.sqlite``
(``~/.local/share/edgeship/history.sqlite``).

A run is keyed by the sha256 of its own JSON (recording the same results twice is one run) and carries the
device identity (a farm place's name, an inventory name or URL, else the hostname). A result row carries what a
regression check matches on: artifact key and sha256, model name and source sha256, format/recipe, threads,
input description, runtime versions, and the samples (little-endian int64 ns). The schema is versioned with
``PRAGMA user_version``; :data:`MIGRATIONS` brings any older file up to date in one transaction, and a file from a
newer edgeship is refused rather than altered.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import ConfigError, EdgeshipError
from edgeship.profiling.llm.results import LLMArtifactResult, LLMProfileResult
from edgeship.profiling.results import ArtifactResult, DeviceRun, FleetResult, ProfileResult

ENV_VAR = "EDGESHIP_HISTORY"

# Index i holds the statements that take a file from user_version i to i + 1. Append only: a released step is
# never edited, so every older file reaches the same schema.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            run_key TEXT NOT NULL UNIQUE,
            recorded_utc TEXT NOT NULL,
            created_utc TEXT,
            device TEXT NOT NULL,
            source TEXT,
            target TEXT,
            edgeship_version TEXT,
            status TEXT NOT NULL,
            error TEXT,
            device_json TEXT NOT NULL,
            identity_json TEXT NOT NULL,
            config_json TEXT
        )""",
        """CREATE TABLE results (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            artifact TEXT NOT NULL,
            format TEXT,
            recipe TEXT,
            artifact_sha256 TEXT,
            model_name TEXT,
            model_sha256 TEXT,
            status TEXT NOT NULL,
            threads INTEGER,
            input TEXT,
            runtimes_json TEXT,
            p50_ms REAL,
            p99_ms REAL,
            n_samples INTEGER NOT NULL,
            samples BLOB,
            result_json TEXT NOT NULL
        )""",
        "CREATE INDEX results_match ON results (artifact_sha256, artifact)",
        "CREATE INDEX runs_device ON runs (device, id)",
    ),
    (  # 1 -> 2: decoder-LLM profiles; their latency samples are the per-token decode times
        "ALTER TABLE results ADD COLUMN kind TEXT NOT NULL DEFAULT 'encoder'",
        "ALTER TABLE results ADD COLUMN ttft_ms REAL",  # at the longest prompt timed
        "ALTER TABLE results ADD COLUMN ttft_prompt_tokens INTEGER",
        "ALTER TABLE results ADD COLUMN decode_tokens_per_s REAL",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class HistoryError(EdgeshipError):
    """The history database cannot be opened, is from a newer edgeship, or has no such run."""


def default_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "edgeship" / "history.sqlite"


def migrate(conn: sqlite3.Connection, where: str) -> None:
    """Bring the schema to :data:`SCHEMA_VERSION` (all steps in one transaction)."""
    have = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if have > SCHEMA_VERSION:
        raise HistoryError(f"{where}: history schema version {have} is newer than this edgeship's "
                           f"({SCHEMA_VERSION}); upgrade edgeship, or pass --history NEWFILE")
    if have == SCHEMA_VERSION:
        return
    with conn:  # one transaction: a failed step leaves the file as it was
        for step in MIGRATIONS[have:]:
            for stmt in step:
                conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


@contextmanager
def open_history(path: str | Path | None = None, *, create: bool = True) -> Iterator[sqlite3.Connection]:
    p = Path(path).expanduser() if path else default_path()
    if not create and not p.is_file():
        raise HistoryError(f"no history database at {p}: profile something first (without --no-history), or "
                           f"point --history / ${ENV_VAR} at the file")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(p, timeout=30)  # several profile runs (a farm, CI jobs) may append at once
    except (OSError, sqlite3.Error) as e:
        raise HistoryError(f"cannot open the history database {p} ({e}); pass --history PATH or --no-history") from None
    with closing(conn):
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            migrate(conn, str(p))
        except sqlite3.DatabaseError as e:
            raise HistoryError(f"{p} is not an edgeship history database ({e}); move it away or pass --history "
                               "PATH") from None
        conn.row_factory = sqlite3.Row
        yield conn


# --- recording -------------------------------------------------------------------------------------------------

def run_key(run: DeviceRun) -> str:
    """The run's identity in the database: the sha256 of its JSON."""
    return hashlib.sha256(json.dumps(run.to_dict(), sort_keys=True).encode()).hexdigest()


def device_name(run: DeviceRun) -> str:
    """A farm place, an inventory name or a URL; for a local run the machine's hostname."""
    name = run.identity.get("place") or run.identity.get("name") or run.url
    if not name and run.profile is not None:
        name = run.profile.device.hostname
    return str(name or "local")


@dataclass(frozen=True)
class SourceInfo:
    """What the host knows about the profiled bundle: model identity and artifact checksums."""

    model_name: str | None = None
    model_sha256: str | None = None
    artifact_sha256: Mapping[str, str] | None = None  # artifact key -> sha256
    file_sha256: str | None = None  # a single model file

    @classmethod
    def of(cls, source: str | Path | None) -> SourceInfo:
        if source is None:
            return cls()
        p = Path(source)
        if p.name == "manifest.json":
            p = p.parent
        if p.is_dir() and (p / "manifest.json").is_file():
            try:
                m = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
                model = m.get("model") or {}
                arts = {f"{a['format']}/{a['recipe']}": str(a["sha256"]) for a in m.get("artifacts") or ()}
                return cls(model.get("name"), model.get("source_sha256"), arts)
            except (OSError, ValueError, KeyError, TypeError):
                return cls()  # an unreadable manifest was refused by the profile already; keep what was measured
        if p.is_file() and p.suffix != ".zip":
            from edgeship.manifest import sha256_file

            return cls(model_name=p.name, file_sha256=sha256_file(p))
        return cls()

    def sha_of(self, r: ArtifactResult) -> str | None:
        if self.file_sha256:
            return self.file_sha256
        return (self.artifact_sha256 or {}).get(r.artifact)


def pack_samples(samples_ns: Sequence[int]) -> bytes:
    return np.asarray(samples_ns, dtype="<i8").tobytes()


def unpack_samples(blob: bytes | None) -> np.ndarray:
    return np.frombuffer(blob or b"", dtype="<i8")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _insert(conn: sqlite3.Connection, table: str, row: Mapping[str, Any]) -> int:
    """INSERT one row given as column -> value (table and column names are ours, never user input)."""
    sql = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({','.join('?' * len(row))})"
    return int(conn.execute(sql, tuple(row.values())).lastrowid or 0)


def _record(conn: sqlite3.Connection, key: str, run: Mapping[str, Any], results: Iterable[Mapping[str, Any]]) -> int:
    """Append a run and its result rows in one transaction; a run already recorded (same key) keeps its id."""
    row = conn.execute("SELECT id FROM runs WHERE run_key = ?", (key,)).fetchone()
    if row is not None:
        return int(row[0])
    with conn:
        run_id = _insert(conn, "runs", {"run_key": key, "recorded_utc": _now(), **run})
        for r in results:
            _insert(conn, "results", {"run_id": run_id, **r})
    return run_id


def record(conn: sqlite3.Connection, run: DeviceRun, source: str | Path | None = None) -> int:
    """Append one device's run; returns its run id (an already recorded run keeps its id)."""
    info = SourceInfo.of(source)
    prof = run.profile
    dev = prof.device.to_dict() if prof else {}
    runtimes = json.dumps(dict(dev.get("runtimes") or {}))
    return _record(conn, run_key(run), {
        "created_utc": prof.created_utc if prof else None, "device": device_name(run),
        "source": str(source or (prof.source if prof else "")), "target": prof.target if prof else None,
        "edgeship_version": prof.edgeship_version if prof else None, "status": run.status, "error": run.error,
        "device_json": json.dumps(dev), "identity_json": json.dumps(dict(run.identity), default=str),
        "config_json": json.dumps(prof.config.to_dict()) if prof and prof.config else None,
    }, (_result_row(r, info, runtimes) for r in (prof.results if prof else ())))


def _result_row(r: ArtifactResult, info: SourceInfo, runtimes: str) -> dict[str, Any]:
    body = r.to_dict()
    body.pop("samples_ns", None)  # kept once, as the blob
    return {"artifact": r.artifact, "format": r.format, "recipe": r.recipe, "artifact_sha256": info.sha_of(r),
            "model_name": info.model_name, "model_sha256": info.model_sha256, "status": str(r.status),
            "threads": r.threads, "input": r.input.describe() if r.input else None, "runtimes_json": runtimes,
            "p50_ms": r.latency.p50_ms if r.latency else None, "p99_ms": r.latency.p99_ms if r.latency else None,
            "n_samples": len(r.samples_ns), "samples": pack_samples(r.samples_ns), "result_json": json.dumps(body)}


def llm_run_key(res: LLMProfileResult) -> str:
    return hashlib.sha256(json.dumps(res.to_dict(), sort_keys=True).encode()).hexdigest()


def record_llm(conn: sqlite3.Connection, res: LLMProfileResult, source: str | Path | None = None) -> int:
    """Append one LLM profile (this machine's or a remote device's, under its name); returns its run id (an already
    recorded run keeps its id)."""
    info = SourceInfo.of(source)
    dev = res.device.to_dict()
    runtimes = json.dumps(dict(dev.get("runtimes") or {}))
    return _record(conn, llm_run_key(res), {
        "created_utc": res.created_utc, "device": res.device_name, "source": str(source or res.source),
        "target": res.target, "edgeship_version": res.edgeship_version, "status": "ok" if res.ok else "error",
        "error": res.error, "device_json": json.dumps(dev),
        "identity_json": json.dumps({**res.device_identity, "kind": "llm"}, default=str),
        "config_json": json.dumps(res.config.to_dict()),
    }, (_llm_result_row(r, info, runtimes) for r in res.results))


def _llm_result_row(r: LLMArtifactResult, info: SourceInfo, runtimes: str) -> dict[str, Any]:
    body = r.to_dict()
    body.pop("token_ns", None)  # kept once, as the blob
    longest = max(r.prompts, key=lambda p: p.prompt_tokens, default=None)
    stats = r.decode_token_ms
    return {"artifact": r.artifact, "format": r.format, "recipe": r.recipe,
            "artifact_sha256": (info.artifact_sha256 or {}).get(r.artifact), "model_name": info.model_name,
            "model_sha256": info.model_sha256, "status": r.status, "threads": r.threads,
            "input": f"{r.decode_tokens} decode tokens" if r.decode_tokens else None, "runtimes_json": runtimes,
            "p50_ms": stats.p50_ms if stats else None, "p99_ms": stats.p99_ms if stats else None,
            "n_samples": len(r.token_ns),
            "samples": pack_samples(r.token_ns), "result_json": json.dumps(body), "kind": "llm",
            "ttft_ms": longest.ttft_ms if longest else None,
            "ttft_prompt_tokens": longest.prompt_tokens if longest else None,
            "decode_tokens_per_s": r.decode_tokens_per_s}


def record_all(runs: Sequence[DeviceRun], source: str | Path | None, path: str | Path | None = None) -> list[int]:
    with open_history(path) as conn:
        return [record(conn, r, source) for r in runs]


def runs_of(doc: ProfileResult | FleetResult | DeviceRun) -> list[DeviceRun]:
    if isinstance(doc, FleetResult):
        return list(doc.runs)
    return [doc if isinstance(doc, DeviceRun) else DeviceRun(doc)]


# --- reading ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One artifact of one recorded run."""

    run_id: int
    recorded_utc: str
    device: str
    artifact: str
    artifact_sha256: str | None
    model_name: str | None
    model_sha256: str | None
    status: str
    threads: int | None
    p50_ms: float | None
    p99_ms: float | None
    n_samples: int
    edgeship_version: str | None
    samples_ns: np.ndarray
    kind: str = "encoder"
    ttft_ms: float | None = None  # LLMs: at the longest prompt timed
    ttft_prompt_tokens: int | None = None
    decode_tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (v if k != "samples_ns" else None) for k, v in self.__dict__.items() if k != "samples_ns"}


SELECT_ENTRIES = ("SELECT r.id AS run_id, r.recorded_utc, r.device, r.edgeship_version, x.artifact, x.artifact_sha256,"
           " x.model_name, x.model_sha256, x.status, x.threads, x.p50_ms, x.p99_ms, x.n_samples, x.samples, x.kind,"
           " x.ttft_ms, x.ttft_prompt_tokens, x.decode_tokens_per_s"
           " FROM results x JOIN runs r ON r.id = x.run_id")


def entry_from_row(row: sqlite3.Row) -> Entry:
    return Entry(run_id=row["run_id"], recorded_utc=row["recorded_utc"], device=row["device"],
                 artifact=row["artifact"], artifact_sha256=row["artifact_sha256"], model_name=row["model_name"],
                 model_sha256=row["model_sha256"], status=row["status"], threads=row["threads"], p50_ms=row["p50_ms"],
                 p99_ms=row["p99_ms"], n_samples=row["n_samples"], edgeship_version=row["edgeship_version"],
                 samples_ns=unpack_samples(row["samples"]), kind=row["kind"], ttft_ms=row["ttft_ms"],
                 ttft_prompt_tokens=row["ttft_prompt_tokens"], decode_tokens_per_s=row["decode_tokens_per_s"])


def query(conn: sqlite3.Connection, *, model: str | None = None, device: str | None = None,
          artifact: str | None = None, run_id: int | None = None, limit: int | None = None) -> list[Entry]:
    """Newest first. ``model`` matches the model name or a prefix of its source sha256."""
    where, args = [], []  # type: list[str], list[Any]
    if model:
        where.append("(x.model_name = ? OR x.model_sha256 LIKE ?)")
        args += [model, f"{model}%"]
    for col, val in (("r.device", device), ("x.artifact", artifact), ("r.id", run_id)):
        if val is not None:
            where.append(f"{col} = ?")
            args.append(val)
    sql = SELECT_ENTRIES + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.id DESC, x.id"
    if limit:
        sql += f" LIMIT {int(limit)}"
    return [entry_from_row(row) for row in conn.execute(sql, args)]


def check_run(conn: sqlite3.Connection, run_id: int) -> None:
    if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
        last = conn.execute("SELECT max(id) FROM runs").fetchone()[0]
        raise HistoryError(f"no run {run_id} in the history (runs are 1..{last or 0}; `edgeship history` lists them)")


def parse_limit(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--limit {text!r}: expected a positive number of rows")
    return n
