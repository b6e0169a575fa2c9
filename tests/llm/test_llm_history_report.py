"""LLM profiles in the history database (a real SQLite file), `edgeship compare` on their per-token decode times,
and `edgeship report` of LLM results files: on two real profiles of the tiny Llama exported to ONNX fp32."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship import history as hist
from edgeship.cli import main

pytestmark = pytest.mark.needs_export

PROFILE = ["--prompt-lengths", "8,16", "--new-tokens", "24", "--energy", "estimate", "--idle-seconds", "0",
           "--no-isolate"]


@pytest.fixture(scope="module")
def llm_runs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two profiles of one small bundle, recorded into their own history file."""
    from edgeship.llm import export_llm

    d = tmp_path_factory.mktemp("llm-hist")
    bundle = d / "b"
    export_llm(tiny_llama_dir, target="x86-64-laptop", out=bundle, formats=["onnx"], recipes=["fp32"],
               max_context=64, log=lambda m: None)
    db = d / "h.sqlite"
    for name in ("r1", "r2"):
        assert main(["profile", str(bundle), *PROFILE, "--history", str(db), "--json", str(d / f"{name}.json")]) == 0
    return {"bundle": bundle, "db": db, "r1": d / "r1.json", "r2": d / "r2.json", "dir": d}


def _doc(p: Path) -> Any:
    return json.loads(p.read_text())


def test_profile_records_llm_runs_with_their_token_times(llm_runs: dict[str, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    manifest = _doc(llm_runs["bundle"] / "manifest.json")
    with sqlite3.connect(llm_runs["db"]) as c:
        c.row_factory = sqlite3.Row
        rows = c.execute("SELECT x.*, r.device, r.edgeship_version FROM results x JOIN runs r ON r.id = x.run_id"
                         " ORDER BY x.id").fetchall()
    assert len(rows) == 2 and {r["run_id"] for r in rows} == {1, 2}
    for row, name in zip(rows, ("r1", "r2"), strict=True):
        r = _doc(llm_runs[name])["results"][0]
        assert row["kind"] == "llm" and row["artifact"] == "onnx/fp32" and row["status"] == "ok"
        assert row["artifact_sha256"] == manifest["artifacts"][0]["sha256"]
        assert row["model_sha256"] == manifest["model"]["source_sha256"]
        assert hist.unpack_samples(row["samples"]).tolist() == r["token_ns"] and row["n_samples"] == len(r["token_ns"]) > 0
        assert row["decode_tokens_per_s"] == pytest.approx(r["decode_tokens_per_s"])
        assert (row["ttft_prompt_tokens"], row["ttft_ms"]) == (16, pytest.approx(r["prompts"][-1]["ttft_ms"]))
        assert row["p50_ms"] == pytest.approx(r["decode_token_ms"]["p50_ms"])
        assert row["edgeship_version"] == _doc(llm_runs[name])["edgeship_version"]
    # the same results again are the same run
    from edgeship.profiling.llm.results import LLMProfileResult

    with hist.open_history(llm_runs["db"]) as conn:
        assert hist.record_llm(conn, LLMProfileResult.from_dict(_doc(llm_runs["r1"]))) == 1
    capsys.readouterr()
    assert main(["history", "--history", str(llm_runs["db"])]) == 0
    out = capsys.readouterr().out
    assert out.count("onnx/fp32") == 2 and "decode tok/s" in out and "@16" in out and "per generated token" in out


def test_compare_llm_runs_on_decode_token_times(llm_runs: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    db, out = str(llm_runs["db"]), tmp_path / "c.json"
    assert main(["compare", str(llm_runs["r2"]), "--baseline", str(llm_runs["r1"]), "--json", str(out)]) == 0
    (row,) = _doc(out)
    r1, r2 = (_doc(llm_runs[n])["results"][0]["token_ns"] for n in ("r1", "r2"))
    assert row["artifact"] == "onnx/fp32" and row["verdict"] in ("faster", "slower", "indistinguishable")
    assert row["new_p50_ms"] == pytest.approx(np.median(r2) / 1e6) and row["base_p50_ms"] == pytest.approx(np.median(r1) / 1e6)
    # against the history: the previous run of the same artifact, and by run ids
    assert main(["compare", str(llm_runs["r2"]), "--history", db, "--json", str(out)]) == 0
    assert _doc(out)[0]["baseline"] == "run 1"
    assert main(["compare", "2", "--baseline", "1", "--history", db, "--json", str(out)]) == 0
    assert _doc(out)[0]["new_p50_ms"] == pytest.approx(np.median(r2) / 1e6)
    # a decode three times slower per token (the real samples scaled) is caught
    slow = _doc(llm_runs["r2"])
    slow["results"][0]["token_ns"] = [3 * t for t in r2]
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "slow.json"), "--baseline", str(llm_runs["r1"]),
                 "--fail-on-regression", "10"]) == 1
    out = capsys.readouterr().out
    assert "SLOWER" in out and "per-token decode times" in out


def _encoder_results(tmp_path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "relu.onnx"))
    out = tmp_path / "enc.json"
    assert main(["profile", str(tmp_path / "relu.onnx"), "--runs", "5", "--min-seconds", "0.05", "--warmup", "1",
                 "--energy", "off", "--quiet", "--no-history", "--json", str(out)]) == 0
    return out


def test_mixed_encoder_and_llm_are_refused(llm_runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    enc = _encoder_results(tmp_path)
    capsys.readouterr()
    assert main(["report", str(enc), str(llm_runs["r1"])]) == 2
    err = capsys.readouterr().err
    assert "separately" in err and err.count("\n") == 1
    assert main(["compare", str(llm_runs["r1"]), "--baseline", str(enc)]) == 2
    err = capsys.readouterr().err
    assert "LLM" in err and err.count("\n") == 1


def test_report_llm_results(llm_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r1, r2 = str(llm_runs["r1"]), str(llm_runs["r2"])
    page, dj = tmp_path / "llm.html", tmp_path / "d.json"
    capsys.readouterr()
    assert main(["report", r1, r2, "--html", str(page), "--json", str(dj)]) == 0
    out = capsys.readouterr().out
    assert "PICK" in out and "TTFT ms@tokens" in out and "(est.)" in out and "ESTIMATE" in out
    d = _doc(dj)
    rates = {row["artifact"]: row["decode_tokens_per_s"] for row in d["rows"]}
    assert set(rates) == {"onnx/fp32 (r1)", "onnx/fp32 (r2)"} and d["pick"] == max(rates, key=lambda k: rates[k])
    html = page.read_text()
    assert "onnx/fp32 (r1)" in html and "onnx/fp32 (r2)" in html and "decode tok/s" in html
    # budgets: peak RSS nothing meets; the lowest peak RSS under --objective memory
    assert main(["report", r1, "--max-peak-mb", "1"]) == 1
    assert "no artifact meets it" in capsys.readouterr().out
    assert main(["report", r1, r2, "--objective", "memory", "--json", str(dj)]) == 0
    peaks = {row["artifact"]: row["peak_rss_mb"] for row in _doc(dj)["rows"]}
    assert _doc(dj)["pick"] == min(peaks, key=lambda k: peaks[k])
    capsys.readouterr()
    assert main(["report", r1, "--min-cosine", "0.99"]) == 2
    assert "not available for LLM results" in capsys.readouterr().err


def test_a_version_1_file_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "v1.sqlite"
    with sqlite3.connect(db) as c:
        for stmt in hist.MIGRATIONS[0]:
            c.execute(stmt)
        c.execute("INSERT INTO runs (run_key, recorded_utc, device, status, device_json, identity_json)"
                  " VALUES ('k', 't', 'pi', 'ok', '{}', '{}')")
        c.execute("INSERT INTO results (run_id, artifact, status, p50_ms, n_samples, samples, result_json)"
                  " VALUES (1, 'onnx/fp32', 'ok', 1.5, 2, ?, '{}')", (hist.pack_samples([1_500_000, 1_600_000]),))
        c.execute("PRAGMA user_version = 1")
    with hist.open_history(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == hist.SCHEMA_VERSION == 2
        (e,) = hist.query(conn)
    assert (e.kind, e.p50_ms, e.decode_tokens_per_s, e.samples_ns.tolist()) == ("encoder", 1.5, None,
                                                                               [1_500_000, 1_600_000])
