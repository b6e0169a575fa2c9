"""The history database (a real SQLite file under tmp_path) and `edgeship compare` on real measurements."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship import history as hist
from edgeship.cli import main
from edgeship.compare import compare_samples, mann_whitney_p, median_ratio_interval

FAST = ["--runs", "30", "--min-seconds", "0.3", "--warmup", "2", "--energy", "off", "--quiet"]


def _bench_compare() -> Any:
    spec = importlib.util.spec_from_file_location("edgeship_bench_compare",
                                                  Path(__file__).parents[2] / "benchmarks" / "bench_compare.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


matmul_onnx = _bench_compare().matmul_onnx  # the benchmark's 2-MatMul model: d/mm.onnx, cost grows with n


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return matmul_onnx(tmp_path_factory.mktemp("small"), 64)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return matmul_onnx(tmp_path_factory.mktemp("big"), 768, rows=128)  # same name: same artifact key


def _profile(model: Path, db: Path, out: Path, *extra: str) -> None:
    assert main(["profile", str(model), *FAST, "--history", str(db), "--json", str(out), *extra]) == 0


# --- the database ----------------------------------------------------------------------------------------------

def test_fresh_file_gets_the_current_schema(tmp_path: Path) -> None:
    with hist.open_history(tmp_path / "h.sqlite") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == hist.SCHEMA_VERSION
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "results"} <= tables


def test_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    p = tmp_path / "h.sqlite"
    with sqlite3.connect(p) as c:
        c.execute(f"PRAGMA user_version = {hist.SCHEMA_VERSION + 1}")
    with pytest.raises(hist.HistoryError, match="newer than this edgeship's"):
        with hist.open_history(p):
            pass
    with sqlite3.connect(p) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == hist.SCHEMA_VERSION + 1


def test_not_a_database_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "h.sqlite"
    p.write_text("not sqlite at all, just text " * 100)
    assert main(["history", "--history", str(p)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeship: error:") and "not an edgeship history database" in err and "\n" not in err


def test_missing_database_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "--history", str(tmp_path / "none.sqlite")]) == 1
    assert "profile something first" in capsys.readouterr().err


def test_profile_appends_with_samples_and_keys(small_model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    _profile(small_model, db, tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    with hist.open_history(db, create=False) as conn:
        (e,) = hist.query(conn)
        assert e.artifact == "mm.onnx" and e.status == "ok" and e.model_name == "mm.onnx"
        assert e.artifact_sha256 is not None and len(e.artifact_sha256) == 64
        assert e.samples_ns.tolist() == doc["results"][0]["samples_ns"]  # the raw samples, not a summary
        # recording the same results again is the same run
        from edgeship.profiling.results import DeviceRun

        run = DeviceRun.from_dict(doc)
        assert hist.record(conn, run, small_model) == e.run_id
    capsys.readouterr()
    assert main(["history", "--history", str(db), "--model", "mm.onnx", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["device"] == doc["device"]["hostname"]


def test_no_history_writes_nothing(small_model: Path, tmp_path: Path) -> None:
    db = tmp_path / "h.sqlite"
    assert main(["profile", str(small_model), *FAST, "--history", str(db), "--no-history"]) == 0
    assert not db.exists()


# --- statistics ------------------------------------------------------------------------------------------------

def test_mann_whitney_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")  # a test tool only: edgeship itself computes it with numpy
    rng = np.random.default_rng(3)
    for shift in (0.0, 0.05, 0.3):
        a = np.round(rng.lognormal(0.0, 0.2, 300) * 100)  # rounded: ties, as integer ns samples have
        b = np.round(rng.lognormal(shift, 0.2, 250) * 100)
        want = stats.mannwhitneyu(a, b, alternative="two-sided", method="asymptotic").pvalue
        assert mann_whitney_p(a, b) == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_interval_covers_the_true_ratio() -> None:
    rng = np.random.default_rng(4)
    base = rng.lognormal(0.0, 0.1, 400)
    new = rng.lognormal(np.log(1.3), 0.1, 400)
    lo, hi = median_ratio_interval(new, base)
    assert lo < 1.3 < hi and hi - lo < 0.1
    c = compare_samples(new, base, device="d", artifact="a", baseline="b")
    assert c.verdict == "slower" and c.change_pct == pytest.approx(30, abs=5)
    assert compare_samples(base, new, device="d", artifact="a", baseline="b").verdict == "faster"
    same = compare_samples(base[:200], base[200:], device="d", artifact="a", baseline="b")
    assert same.verdict == "indistinguishable"


# --- compare on real runs --------------------------------------------------------------------------------------

def test_compare_last_and_a_bigger_model_regresses(small_model: Path, big_model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    _profile(small_model, db, tmp_path / "first.json")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "first.json"), "--history", str(db)]) == 0
    assert "NO BASELINE" in capsys.readouterr().out  # nothing earlier on this device
    # The "new" model is 12x wider under the same file name: a real, large regression of the same artifact key.
    _profile(big_model, db, tmp_path / "second.json")
    capsys.readouterr()
    rc = main(["compare", str(tmp_path / "second.json"), "--history", str(db), "--fail-on-regression", "20",
               "--json", str(tmp_path / "cmp.json")])
    captured = capsys.readouterr()
    assert rc == 1 and "REGRESSION: " in captured.err
    (c,) = json.loads((tmp_path / "cmp.json").read_text())
    assert c["verdict"] == "slower" and c["baseline"] == "run 1" and c["ratio_low"] > 1.2
    # the same pair by run ids and by file, in the other direction: faster, exit 0 even with the gate
    assert main(["compare", "1", "--baseline", "2", "--history", str(db), "--fail-on-regression", "20"]) == 0
    assert "FASTER" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "first.json"), "--baseline", str(tmp_path / "second.json"),
                 "--history", str(db)]) == 0
    assert "FASTER" in capsys.readouterr().out


def test_compare_unknown_run_is_one_line(small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    _profile(small_model, db, tmp_path / "r.json")
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "r.json"), "--baseline", "7", "--history", str(db)]) == 1
    assert "no run 7 in the history (runs are 1..1" in capsys.readouterr().err
