"""LLM data types: multi-file manifest artifacts (and old manifests still read), LLM fidelity and results JSON
round trips, the [llm] section of target profiles. No torch."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from edgeship.errors import ChecksumError, ConfigError
from edgeship.manifest import (
    ArtifactRecord,
    Bundle,
    LLMFidelity,
    Manifest,
    checksum_tree,
    load_bundle,
    tree_digest,
)
from edgeship.profiling.energy import EnergyResult
from edgeship.profiling.llm.results import LLMArtifactResult, LLMProfileResult, LLMRunConfig, PromptTiming
from edgeship.profiling.results import DeviceInfo
from edgeship.profiling.stats import LatencyStats
from edgeship.targets.schema import PROFILE_DIR, LLMSettings, parse_profile

FID = LLMFidelity(n_tokens=256, top1_agreement=0.97, mean_kl=0.01, perplexity=9.5, perplexity_reference=9.3,
                  n_prompts=8, new_tokens=24, greedy_identical=6, first_divergence=(None, 3, None, None, 11, None,
                                                                                   None, None),
                  floor_top1_agreement=0.95, passed=True)


def _manifest(artifacts: tuple[ArtifactRecord, ...], llm: dict[str, Any] | None) -> Manifest:
    return Manifest(model={"name": "m", "task": "text-generation"}, target={"name": "pixel-8"}, inputs=(), outputs=(),
                    dims={}, preprocessing={}, artifacts=artifacts, samples={}, labels=None, edgeship_version="0.1.0",
                    created_utc="2026-12-01T00:00:00Z", llm=llm)


def _tree_bundle(tmp_path: Path) -> Bundle:
    art = tmp_path / "onnx" / "int4-weight"
    art.mkdir(parents=True)
    (art / "model.onnx").write_bytes(b"graph" * 100)
    (art / "model.onnx.data").write_bytes(b"\x01" * 4096)
    (art / "genai_config.json").write_text("{}")
    files = checksum_tree(art)
    rec = ArtifactRecord(path="onnx/int4-weight", format="onnx", recipe="int4-weight", sha256=tree_digest(files),
                         size_bytes=sum(v["size_bytes"] for v in files.values()), export_seconds=1.0, fidelity=None,
                         runtime={"kind": "onnxruntime-genai"}, files=files, llm_fidelity=FID)
    m = _manifest((rec,), {"generation": {"eos_token_ids": [2], "max_context": 512}})
    (tmp_path / "manifest.json").write_text(m.to_json())
    return load_bundle(tmp_path)


def test_multi_file_artifact_round_trips_and_verifies(tmp_path: Path) -> None:
    b = _tree_bundle(tmp_path)
    rec = b.manifest.artifacts[0]
    assert rec.llm_fidelity == FID and set(rec.files) == {"model.onnx", "model.onnx.data", "genai_config.json"}
    assert Manifest.from_dict(json.loads(b.manifest.to_json())) == b.manifest
    assert b.manifest.llm == {"generation": {"eos_token_ids": [2], "max_context": 512}}


def test_truncated_file_inside_a_multi_file_artifact_fails_verify(tmp_path: Path) -> None:
    _tree_bundle(tmp_path)
    data = tmp_path / "onnx/int4-weight/model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ChecksumError, match=r"onnx/int4-weight: file model.onnx.data is 100 bytes.*truncated"):
        load_bundle(tmp_path)


def test_extra_file_in_the_record_without_digest_match_fails(tmp_path: Path) -> None:
    b = _tree_bundle(tmp_path)
    d = b.manifest.to_dict()
    d["artifacts"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ChecksumError, match="file list does not match"):
        load_bundle(tmp_path)


def test_existing_single_file_manifests_still_read(tmp_path: Path) -> None:
    """A manifest written before multi-file artifacts existed (no files / llm_fidelity / llm keys)."""
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx/fp32.onnx").write_bytes(b"x" * 10)
    from edgeship.manifest import sha256_file

    old = {"schema_version": 1, "edgeship_version": "0.1.0", "created_utc": "t", "model": {"name": "m"},
           "target": {"name": "pixel-8"}, "inputs": [], "outputs": [], "dims": {}, "preprocessing": {},
           "labels": None, "samples": {},
           "artifacts": [{"path": "onnx/fp32.onnx", "format": "onnx", "recipe": "fp32",
                          "sha256": sha256_file(tmp_path / "onnx/fp32.onnx"), "size_bytes": 10, "export_seconds": 1.0,
                          "fidelity": None, "runtime": {}, "stages": {}, "quantization": {}, "details": {},
                          "warnings": []}]}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    m = load_bundle(tmp_path).manifest
    assert m.llm is None and m.artifacts[0].files == {} and m.artifacts[0].llm_fidelity is None
    assert "llm" not in m.to_dict()  # encoder manifests are written as before


def test_llm_results_round_trip() -> None:
    r = LLMArtifactResult(artifact="onnx/int4-weight", format="onnx", recipe="int4-weight", status="ok", torch_free=True,
                          threads=2, runtime={"runtime": "onnxruntime-genai"}, load_seconds=0.3,
                          prompts=(PromptTiming(64, 40.0, 1600.0), PromptTiming(256, 120.0, 2133.3)), decode_tokens=128,
                          decode_tokens_per_s=100.0, decode_token_ms=LatencyStats.from_ns([10_000_000] * 128), decode_retained=0.98,
                          token_ns=(10_000_000,) * 128, rss_after_load_mb=200.0, peak_rss_mb=260.0, max_context=2048,
                          kv_cache_bytes_per_token=23040, predicted_peak_memory_mb=330.0,
                          energy=EnergyResult("estimate:pixel-8", True, "power model", True, warnings=("est",)),
                          joules_per_token=0.05, warnings=("w",))
    res = LLMProfileResult(device=DeviceInfo(hostname="pi", arch="aarch64", logical_cpus=4),
                           config=LLMRunConfig(new_tokens=128), results=(r,), source="B",
                           target="pixel-8", created_utc="t", edgeship_version="0.1.0")
    back = LLMProfileResult.from_dict(json.loads(res.to_json()))
    assert back == res and back.ok
    with pytest.raises(ConfigError, match="not an LLM results document"):
        LLMProfileResult.from_dict({**res.to_dict(), "kind": "encoder"})


def test_an_llm_results_file_from_before_the_typed_fields_reads_and_writes_back_unchanged() -> None:
    """Written when the run config, per-token latency and energy were plain dicts (an error row's as ``{}``)."""
    doc = json.loads((Path(__file__).parent / "data" / "llm-results-v1.json").read_text())
    res = LLMProfileResult.from_dict(doc)
    ok, bad = res.results
    assert res.config.prompt_lengths == (16, 32) and ok.decode_token_ms is not None and ok.energy is not None
    assert ok.decode_token_ms.count == len(ok.token_ns) and ok.energy_estimated and ok.energy.warnings == ("estimate",)
    assert bad.decode_token_ms is None and bad.energy is None and not bad.energy_estimated
    assert res.to_dict() == doc


def _profile_data() -> dict[str, Any]:
    return tomllib.loads((PROFILE_DIR / "pixel-8.toml").read_text())


def test_every_profile_has_llm_settings() -> None:
    from edgeship.targets import list_profiles

    for p in list_profiles():
        assert p.llm.max_context >= 512 and p.llm.top1_floor("int4-weight") <= p.llm.top1_floor("int8-dynamic")


def test_llm_section_is_optional_and_validated() -> None:
    d = _profile_data()
    del d["llm"]
    assert parse_profile(d, "x").llm == LLMSettings()
    for bad, msg in (({"max_context": 8}, "max_context must be >= 16"), ({"int4_group_size": 48}, "power of two"),
                     ({"min_top1_agreement": {"int8-static": 0.9}}, "unknown LLM recipe 'int8-static'"),
                     ({"min_top1_agreement": {"default": 1.5}}, r"must be a number in \[0, 1\]"),
                     ({"context": 512}, "unknown key")):
        d = _profile_data()
        d["llm"] = bad
        with pytest.raises(ConfigError, match=msg):
            parse_profile(d, "x")
