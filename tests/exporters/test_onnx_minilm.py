"""Done-means of the foundation on the real all-MiniLM-L6-v2 (slow tier, run in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.manifest import load_bundle

pytestmark = [pytest.mark.slow, pytest.mark.needs_export]


@pytest.fixture(scope="module")
def minilm_onnx_bundle(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "B"
    rc = main(["export", str(minilm_dir), "--target", "raspberry-pi-5", "--format", "onnx", "--quant", "fp32",
               "--quant", "int8-dynamic", "--quant", "int8-static", "-o", str(out), "--quiet"])
    assert rc == 0
    return out


def test_three_checked_artifacts(minilm_onnx_bundle: Path) -> None:
    m = load_bundle(minilm_onnx_bundle).manifest
    arts = {a.recipe: a for a in m.artifacts}
    assert set(arts) == {"fp32", "int8-dynamic", "int8-static"}
    assert arts["int8-dynamic"].size_bytes <= 0.30 * arts["fp32"].size_bytes
    for a in arts.values():
        assert a.fidelity is not None and a.fidelity.mean_cosine >= 0.99, (a.key, a.fidelity)
    q = arts["int8-static"].quantization
    assert q["quantized_layers"] > 0 and isinstance(q["kept_in_float"], list)
    assert len(q["sensitivity"]) == q["quantized_layers"] + len(q["kept_in_float"])
    # issue 12: size <= 35% of fp32. The fused graph with static scales: 21.8 MB / 0 float layers (QDQ with
    # quantized layer outputs needed 5 float layers and 30.7 MB; with float embedding tables 76.5 MB / 15)
    assert arts["int8-static"].size_bytes <= 0.35 * arts["fp32"].size_bytes
    assert q["format"].startswith("QOperator") and arts["int8-static"].runtime["graph"]["graph"] == "fused"
    assert m.model["parameters"] > 22_000_000 and m.preprocessing["normalize"] is True
    # issue 12: mean cosine >= 0.995, min >= 0.98. ORT's one-scale-per-tensor activations missed it (int8-dynamic
    # 0.9939, int8-static 0.9938) until the norms' outlier channels were smoothed into the linears (0.9965, 0.9964)
    for recipe in ("int8-dynamic", "int8-static"):
        f, smoothing = arts[recipe].fidelity, arts[recipe].quantization["smoothing"]
        assert f is not None and f.mean_cosine >= 0.995 and f.min_cosine >= 0.98, (recipe, f)
        assert smoothing["normalizations"] == 12 and smoothing["adopted"] is True, (recipe, smoothing)


def test_profile_json_without_torch(minilm_onnx_bundle: Path, tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from edgeship.cli import main\n"
            f"sys.exit(main(['profile', {str(minilm_onnx_bundle)!r}, '--runs', '10', '--min-seconds', '0.5',"
            f" '--quiet', '--json', {str(tmp_path / 'r.json')!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "r.json").read_text())
    assert {r["artifact"] for r in doc["results"]} == {"onnx/fp32", "onnx/int8-dynamic", "onnx/int8-static"}
    for r in doc["results"]:
        assert r["status"] == "ok" and r["torch_free"] is True
        for k in ("load_seconds", "first_inference_ms", "rss_after_load_mb", "peak_rss_mb", "threads"):
            assert r[k] is not None and r[k] > 0, k
        assert r["latency"]["count"] >= 10 and r["latency"]["p99_ms"] >= r["latency"]["p50_ms"] > 0
        assert r["runtime"]["providers_used"] and r["runtime"]["providers_available"]
        assert r["energy"]["estimated"] is True and r["energy"]["joules_per_inference_gross"] > 0
        assert r["device_check"]["mean_cosine"] >= 0.99
    assert doc["device"]["cpu_freq_mhz"] is not None and doc["device"]["cpu_model"]
