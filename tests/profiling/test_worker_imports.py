"""What a profiling worker imports is memory on the device: the modules it never needs stay out of it."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from edgeship.profiling.sysinfo import dist_version


def test_the_worker_leaves_hashing_and_package_metadata_out() -> None:
    # OpenSSL's libcrypto (hashlib) and importlib.metadata's email parser were 3.5 + 3.3 MB of a worker's RSS,
    # measured; the worker never hashes (bundles load with verify=False) and reads versions from dist-info names
    code = ("import sys, edgeship.profiling.worker, edgeship.profiling.backends.tflite as t, "
            "edgeship.profiling.backends.onnx; t.runtime_module(); "
            "print(sorted(m for m in ('hashlib', '_hashlib', 'importlib.metadata', 'email') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("dist", ["numpy", "onnxruntime", "ai-edge-litert", "ai_edge_litert", "edgeship"])
def test_dist_version_agrees_with_importlib_metadata(dist: str) -> None:
    assert dist_version(dist) == metadata.version(dist)


def test_dist_version_of_an_absent_package_is_none() -> None:
    assert dist_version("no-such-distribution-edgeship-test") is None


def test_the_worker_imports_its_rarely_used_helpers_when_used() -> None:
    """subprocess (through ctypes.util too), tempfile, statistics, difflib and csv were ~2.5 MB of the worker before
    it loads anything, measured; each is imported where it is used (a meter's tool, a log path, a CSV power log,
    a "did you mean")."""
    code = ("import sys, edgeship.profiling.worker, edgeship.profiling.backends.onnx as o; "
            "from edgeship.profiling import fpenv; fpenv.get_env(); "
            "print(sorted(m for m in ('subprocess', 'ctypes.util', 'tempfile', 'statistics', 'difflib', 'csv') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
