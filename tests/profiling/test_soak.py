"""--soak N: RSS over N more inferences per artifact, and its growth after warm-up per 1,000 inferences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.errors import ConfigError
from edgeship.profiling import report
from edgeship.profiling.results import MAX_SOAK, ArtifactResult, ProfileResult, RunConfig
from edgeship.profiling.runner import profile
from edgeship.profiling.soak import GROWTH_METHOD, growth_per_1k


@pytest.mark.parametrize("n", [0, -5, MAX_SOAK + 1])
def test_bad_soak_is_a_config_error(n: int) -> None:
    with pytest.raises(ConfigError, match="--soak must be between 1 and"):
        RunConfig(soak=n)


def test_bad_soak_on_the_command_line_is_one_line(tiny_onnx_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", str(tiny_onnx_bundle), "--soak", "0", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--soak must be between 1 and" in err and "\n" not in err and "Traceback" not in err


def test_growth_ignores_warm_up_and_fits_the_rest() -> None:
    at = list(range(0, 10_001, 200))  # 51 points, like a 10,000-inference soak
    # a 30 MB arena grown during the first calls, then 0.25 MB per 1,000 inferences: the fit sees only the latter
    rss = [100.0 + (30.0 if i > 0 else 0.0) + 0.25 * i / 1000 for i in at]
    growth = growth_per_1k(at, rss)
    assert growth == pytest.approx(0.25, rel=1e-6)
    assert growth_per_1k(at, [50.0] * len(at)) == pytest.approx(0.0, abs=1e-9)
    assert growth_per_1k([0, 1, 2], [1.0, 2.0, 3.0]) is None  # two points after warm-up: no trend to speak of


def test_soak_on_the_tiny_bundle(tiny_onnx_bundle: Path) -> None:
    res = profile(tiny_onnx_bundle, artifact="onnx/int8-dynamic", runs=5, min_seconds=0.0, warmup=1, energy="off",
                  progress=False, soak=300)
    (r,) = res.results
    assert r.ok, r.error
    s = r.soak
    assert s is not None and s.inferences == 300 and s.method == GROWTH_METHOD
    assert s.at_inference[0] == 0 and s.at_inference[-1] == 300 and len(s.at_inference) == 51
    assert list(s.at_inference) == sorted(set(s.at_inference))
    assert len(s.seconds) == len(s.rss_mb) == len(s.at_inference)
    assert all(b >= a for a, b in zip(s.seconds, s.seconds[1:], strict=False)) and s.seconds[-1] > 0
    assert all(x > 1.0 for x in s.rss_mb)  # a live Python process with onnxruntime loaded holds tens of MB
    assert s.growth_mb_per_1k is not None
    assert len(r.samples_ns) == 5  # the soak does not add to the timed loop's samples

    back = ProfileResult.from_dict(json.loads(res.to_json()))
    assert back.results[0].soak == s and back == res
    assert "soak 300 inferences" in report.render(res) and "per 1,000 after warm-up" in report.render(res)

    old = {k: v for k, v in r.to_dict().items() if k != "soak"}  # a results file from before --soak
    assert ArtifactResult.from_dict(old).soak is None
    assert RunConfig.from_dict({k: v for k, v in RunConfig().to_dict().items() if k != "soak"}).soak is None


@pytest.fixture(scope="module")
def minilm_int8_bundle(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeship.pipeline import export

    out = tmp_path_factory.mktemp("soak") / "minilm-int8"
    export(minilm_dir, target="raspberry-pi-5", out=out, formats=["onnx", "tflite"], recipes=["int8-dynamic"],
           log=lambda m: None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("artifact", ["onnx/int8-dynamic", "tflite/int8-dynamic"])
def test_minilm_does_not_leak_over_10k_inferences(minilm_int8_bundle: Path, artifact: str) -> None:
    res = profile(minilm_int8_bundle, artifact=artifact, runs=5, min_seconds=0.0, energy="off", progress=False,
                  soak=10_000)
    (r,) = res.results
    assert r.ok, r.error
    assert r.soak is not None and r.soak.growth_mb_per_1k is not None
    print(f"{artifact}: {r.soak.describe()}")  # the figure the issue asks to quote (pytest -s shows it)
    assert r.soak.growth_mb_per_1k < 1.0, r.soak.describe()
