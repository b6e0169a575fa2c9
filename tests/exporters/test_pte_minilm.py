"""Done-means of the ExecuTorch exporter on the real all-MiniLM-L6-v2 (slow tier, run in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.manifest import load_bundle

pytestmark = [pytest.mark.slow, pytest.mark.needs_export]


@pytest.fixture(scope="module")
def minilm_pte_bundle(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm-pte") / "B"
    rc = main(["export", str(minilm_dir), "--target", "galaxy-s24", "--format", "pte", "--quant", "fp32",
               "--quant", "int8-dynamic", "--quant", "int4-weight", "-o", str(out), "--quiet"])
    assert rc == 0
    return out


def test_sizes_fidelity_delegation_fallback(minilm_pte_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arts = {a.recipe: a for a in load_bundle(minilm_pte_bundle).manifest.artifacts}
    assert set(arts) == {"fp32", "int8-dynamic", "int4-weight"}
    fp32 = arts["fp32"].size_bytes
    assert arts["int8-dynamic"].size_bytes <= 0.30 * fp32
    assert arts["int4-weight"].size_bytes <= 0.22 * fp32
    assert arts["int8-dynamic"].fidelity.mean_cosine >= 0.99
    assert arts["int4-weight"].fidelity.mean_cosine >= 0.97
    # only the word table is int8: the position and token-type tables' lookups on the portable int8 kernel cost
    # 0.13 ms of 2.8 at 128 tokens for 0.6 MB of file
    for q in (arts["int8-dynamic"].quantization, arts["int4-weight"].quantization):
        assert q["embeddings"].startswith("int8 per-row (quantized_decomposed::embedding_byte, portable kernel): "
                                          "model.embeddings.word_embeddings; float: model.embeddings.position_embeddings, "
                                          "model.embeddings.token_type_embeddings")
    q4 = arts["int4-weight"].quantization
    assert q4["quantized_layers"] > 30 and len(q4["kept_in_int8"]) + q4["quantized_layers"] == len(q4["sensitivity"])
    for a in arts.values():
        d = a.details["delegation"]
        assert d["delegate_blobs"] > 1 and d["compute_share_delegated"] > 0.95  # every matmul is in XNNPACK
        # all 13 norms rewritten into delegated ops (they were portable: 0.73 of 6.9 ms on int8-dynamic)
        assert "native_layer_norm.out" not in d["portable_by_op"] and a.details["layer_norms"]["rewritten_for_xnnpack"] == 13
        assert a.details["fallbacks"][0]["wanted"] == "qnn"
        assert a.details["shapes"]["sequence"]["dynamic"] is True
    assert main(["inspect", str(minilm_pte_bundle)]) == 0
    shown = capsys.readouterr().out
    assert "pte/int4-weight delegation:" in shown and "pte/fp32 fallbacks:" in shown and "QNN" in shown


def test_profile_measures_all_three(minilm_pte_bundle: Path, tmp_path: Path) -> None:
    rc = main(["profile", str(minilm_pte_bundle), "--runs", "10", "--min-seconds", "0.5", "--quiet",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    res = {r["artifact"]: r for r in doc["results"]}
    assert set(res) == {"pte/fp32", "pte/int8-dynamic", "pte/int4-weight"}
    for r in res.values():
        assert r["status"] == "ok" and r["latency"]["count"] >= 10 and r["latency"]["p50_ms"] > 0
        assert r["runtime"]["runtime"] == "executorch" and r["peak_rss_mb"] > 0
    assert res["pte/int8-dynamic"]["device_check"]["mean_cosine"] >= 0.99
