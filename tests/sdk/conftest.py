"""A small hand-made bundle (no model, no torch) for the bundle, signing and fuzz tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edgeship.bundle import BundleWriter
from edgeship.manifest import ArtifactRecord, Fidelity, Manifest, sha256_file
from edgeship.spec import TensorSpec


def key_paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a JSON/TOML document, the root ``()`` first: where a fuzz test may put a value."""
    out = [prefix]
    if isinstance(d, dict):
        for k, v in d.items():
            out += key_paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += key_paths(v, (*prefix, i))
    return out


def write_bundle(out: Path) -> Path:
    """An ONNX-shaped artifact (bytes only), a vocab file and a labels file: what sign/verify/pack must cover."""
    with BundleWriter(out) as w:
        p = w.path("onnx/fp32.onnx")
        p.write_bytes(b"model-bytes" * 100)
        w.path("vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
        w.path("labels.txt").write_text("a\nb\n")
        fid = Fidelity("y", 4, 0.0, 0.0, 1.0, 1.0, None, 0.99, True)
        art = ArtifactRecord("onnx/fp32.onnx", "onnx", "fp32", sha256_file(p), p.stat().st_size, 1.0, fid, {})
        w.commit(Manifest(model={"name": "m", "task": "custom"}, target={"name": "raspberry-pi-5", "threads": 4},
                          inputs=(TensorSpec("x", "float32", ("batch", 4)),),
                          outputs=(TensorSpec("y", "float32", ("batch", 2)),),
                          dims={"batch": {"default": 1, "min": 1, "max": 8}}, preprocessing={"kind": "none"},
                          artifacts=(art,), samples={}, labels=("a", "b"), edgeship_version="0.1.0",
                          created_utc="now"))
    return out


@pytest.fixture
def make_bundle(tmp_path: Path) -> Callable[[str], Path]:
    return lambda name="bundle": write_bundle(tmp_path / name)


@pytest.fixture(scope="session")
def bundle_writer() -> Callable[[Path], Path]:
    """``write_bundle`` for tests that need it at another scope (importlib mode cannot import conftest)."""
    return write_bundle


@pytest.fixture(scope="session")
def doc_paths() -> Callable[[Any], list[tuple[Any, ...]]]:
    """``key_paths`` for the fuzz tests (importlib mode cannot import conftest)."""
    return key_paths
