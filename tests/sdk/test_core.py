"""Manifest, bundle, spec, fidelity, stats and sensitivity search: pure logic, no model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgeship
from edgeship.bundle import BundleWriter, pack, unpack
from edgeship.errors import BundleError, ChecksumError, InputError, OutputExistsError, SchemaVersionError
from edgeship.exporters.sensitivity import search
from edgeship.fidelity import compare
from edgeship.manifest import ArtifactRecord, Fidelity, Manifest, load_bundle, sha256_file
from edgeship.profiling.stats import LatencyStats
from edgeship.spec import TensorSpec, check_feeds, parse_shape_overrides, resolve_dims, synthesize


def _manifest(art: ArtifactRecord) -> Manifest:
    return Manifest(model={"name": "m", "task": "custom"}, target={"name": "raspberry-pi-5", "threads": 4},
                    inputs=(TensorSpec("x", "float32", ("batch", 4)),), outputs=(TensorSpec("y", "float32", ("batch", 2)),),
                    dims={"batch": {"default": 1, "min": 1, "max": 8}}, preprocessing={"kind": "none"},
                    artifacts=(art,), samples={}, labels=("a", "b"), edgeship_version="0.1.0", created_utc="now")


def _bundle(tmp: Path, name: str = "b") -> Path:
    out = tmp / name
    with BundleWriter(out) as w:
        p = w.path("onnx/fp32.onnx")
        p.write_bytes(b"model-bytes" * 100)
        fid = Fidelity("y", 4, 0.0, 0.0, 1.0, 1.0, None, 0.99, True)
        art = ArtifactRecord("onnx/fp32.onnx", "onnx", "fp32", sha256_file(p), p.stat().st_size, 1.0, fid, {"name": "ort"})
        w.commit(_manifest(art))
    return out


def test_public_api_matches_all() -> None:
    for name in edgeship.__all__:
        assert getattr(edgeship, name) is not None
    assert sorted(edgeship.__all__) == sorted(set(edgeship.__all__))


def test_manifest_round_trip(tmp_path: Path) -> None:
    b = load_bundle(_bundle(tmp_path))
    again = Manifest.from_dict(json.loads(b.manifest.to_json()))
    assert again == b.manifest


def test_tampered_or_truncated_artifact_is_refused(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    art = root / "onnx/fp32.onnx"
    data = art.read_bytes()
    art.write_bytes(data[:-1] + b"X")
    with pytest.raises(ChecksumError, match="fails its checksum"):
        load_bundle(root)
    art.write_bytes(data[:10])
    with pytest.raises(ChecksumError, match="truncated"):
        load_bundle(root)


def test_schema_version_mismatch(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    m = json.loads((root / "manifest.json").read_text())
    m["schema_version"] = 99
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SchemaVersionError, match="schema_version 99"):
        load_bundle(root)


def test_interrupted_write_leaves_nothing_that_looks_valid(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(RuntimeError), BundleWriter(out) as w:
        w.path("onnx/fp32.onnx").write_bytes(b"half")
        raise RuntimeError("killed mid-export")
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # the staging directory is gone too
    with pytest.raises(BundleError, match="not an edgeship bundle"):
        (tmp_path / "partial").mkdir()
        load_bundle(tmp_path / "partial")


def test_every_file_is_on_disk_before_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the bundle's rename must not publish artifacts whose bytes were only in the page cache."""
    import os

    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "b"
    with BundleWriter(out) as w:
        p = w.path("onnx/fp32.onnx")
        p.write_bytes(b"model-bytes" * 100)
        w.path("tokenizer/vocab.txt").write_text("[PAD]\n")
        art = ArtifactRecord("onnx/fp32.onnx", "onnx", "fp32", sha256_file(p), p.stat().st_size, 1.0, None, {})
        w.commit(_manifest(art))
    assert sorted(synced[:-1]) == ["fp32.onnx", "vocab.txt"] and synced[-1] == "manifest.json.tmp"
    load_bundle(out)


def test_existing_output_refused_unless_overwrite(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        BundleWriter(root)
    before = (root / "manifest.json").read_text()
    with BundleWriter(root, overwrite=True) as w:
        p = w.path("onnx/fp32.onnx")
        p.write_bytes(b"new")
        art = ArtifactRecord("onnx/fp32.onnx", "onnx", "fp32", sha256_file(p), 3, 1.0, None, {})
        w.commit(_manifest(art))
    assert (root / "manifest.json").read_text() != before
    load_bundle(root)


def test_overwrite_replaces_a_bundle_or_an_empty_directory_and_nothing_else(tmp_path: Path) -> None:
    mine = tmp_path / "work"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not an edgeship bundle"):
        BundleWriter(mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and not list(tmp_path.glob(".work.partial-*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with BundleWriter(empty, overwrite=True) as w:
        p = w.path("onnx/fp32.onnx")
        p.write_bytes(b"new")
        w.commit(_manifest(ArtifactRecord("onnx/fp32.onnx", "onnx", "fp32", sha256_file(p), 3, 1.0, None, {})))
    load_bundle(empty)


def test_pack_and_unpack(tmp_path: Path) -> None:
    root = _bundle(tmp_path)
    z = pack(root)
    with zipfile.ZipFile(z) as zf:
        assert zf.namelist()[-1] == "manifest.json"
    load_bundle(unpack(z, tmp_path / "unpacked"))
    with pytest.raises(OutputExistsError):
        pack(root)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(BundleError, match="escapes"):
        unpack(evil, tmp_path / "dest")
    assert not (tmp_path / "escape.txt").exists()


def test_spec_shapes_and_feeds() -> None:
    specs = (TensorSpec("input_ids", "int64", ("batch", "sequence")), TensorSpec("attention_mask", "int64", ("batch", "sequence")))
    dims = resolve_dims(specs, parse_shape_overrides(["input_ids=2x16"]), {"batch": 1, "sequence": 128})
    assert dims == {"batch": 2, "sequence": 16}
    feeds = synthesize(specs, dims)
    assert feeds["input_ids"].shape == (2, 16) and feeds["attention_mask"].min() == 1
    check_feeds(specs, feeds)
    with pytest.raises(InputError, match="dtype int32"):
        check_feeds(specs, {**feeds, "input_ids": feeds["input_ids"].astype(np.int32)})
    with pytest.raises(InputError, match="missing"):
        check_feeds(specs, {"input_ids": feeds["input_ids"]})
    with pytest.raises(InputError, match="expected NAME=DxD"):
        parse_shape_overrides(["input_ids=1xfoo"])
    with pytest.raises(InputError, match="model's inputs are"):
        resolve_dims(specs, {"pixels": (1, 3)}, {})
    with pytest.raises(InputError, match="rank"):
        resolve_dims(specs, {"input_ids": (1, 2, 3)}, {})


def test_fidelity_compare_math() -> None:
    ref = [np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])]
    same = compare(ref, ref, "y", 0.99)
    assert same.mean_cosine == pytest.approx(1.0) and same.max_abs_err == 0 and same.passed
    orth = compare(ref, [np.array([[0.0, 1.0]]), np.array([[0.0, 2.0]])], "y", 0.99, classifier=True)
    assert orth.mean_cosine == pytest.approx(0.5) and orth.min_cosine == pytest.approx(0.0)
    assert orth.top1_agreement == pytest.approx(0.5) and not orth.passed
    nan = compare(ref, [np.array([[np.nan, 0.0]]), ref[1]], "y", 0.5)
    assert nan.min_cosine == 0.0


def test_latency_stats_from_samples() -> None:
    s = LatencyStats.from_ns([1_000_000 * i for i in range(1, 101)])
    assert s.count == 100 and s.min_ms == 1 and s.max_ms == 100
    assert s.p50_ms == pytest.approx(50.5) and s.p90_ms == pytest.approx(90.1) and s.p99_ms == pytest.approx(99.01)
    assert s.throughput_per_s == pytest.approx(1000 / 50.5)
    with pytest.raises(ValueError):
        LatencyStats.from_ns([])


def test_sensitivity_search_finds_smallest_k() -> None:
    layers = [f"l{i}" for i in range(10)]

    def fid(k: int) -> Fidelity:
        cos = 0.9 + 0.01 * k  # passes 0.99 from k = 9
        return Fidelity("y", 1, 0, 0, cos, cos, None, 0.99, cos >= 0.99)

    res = search(layers, lambda kept: len(kept), fid, 0.99)
    assert res.kept == tuple(layers[:9]) and res.fidelity.mean_cosine >= 0.99
    ks = [a["kept"] for a in res.attempts]
    assert ks[:5] == [0, 1, 2, 4, 8] and 9 in ks and len(ks) <= 10
    never = search(layers, lambda kept: len(kept), lambda k: Fidelity("y", 1, 0, 0, 0.5, 0.5, None, 0.99, False), 0.99)
    assert not never.fidelity.passed


def test_export_attribute_stays_the_function_after_submodule_imports() -> None:
    """Trap: a submodule named like a lazy attribute replaces it once imported (edgeship.export was a module)."""
    import importlib

    for mod in ("edgeship.pipeline", "edgeship.profiling.runner", "edgeship.exporters"):
        importlib.import_module(mod)
    assert callable(edgeship.export) and edgeship.export.__name__ == "export"
    assert callable(edgeship.profile) and edgeship.profile.__name__ == "profile"
