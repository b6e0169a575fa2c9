"""LiteRT backend on a committed tiny model: needs no torch, and runs with either ai-edge-litert or tflite-runtime.

The ``.ci/tflite-runtime-job.sh`` job runs this file in a venv holding only tflite-runtime,
numpy < 2, psutil and edgeship (no torch, no ai-edge-litert).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactLoadError, InputError, RuntimeMissingError
from edgeship.profiling import backends
from edgeship.profiling.backends.tflite import TfliteBackend, delegation_summary, runtime_module

DATA = Path(__file__).parent / "tflite_data"
TINY = DATA / "tiny.tflite"


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(DATA / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def _feeds(expected: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}


def test_signature_names_and_output(expected: dict[str, np.ndarray]) -> None:
    b = backends.load(TINY, threads=1)
    assert isinstance(b, TfliteBackend)
    assert [(s.name, s.dtype, s.shape) for s in b.inputs] == [("input_ids", "int32", (1, 6)),
                                                               ("attention_mask", "int32", (1, 6))]
    assert b.outputs == ("output",)
    out = b.run(b.adapt_feeds(_feeds(expected)))
    np.testing.assert_allclose(out["output"], expected["output"], rtol=1e-5, atol=1e-6)
    info = b.info()
    assert info["runtime"] in ("ai-edge-litert", "tflite-runtime") and info["threads"] == 1
    assert info["xnnpack"] is True and info["signature"] == "serving_default"


def test_int64_ids_cast_with_overflow_check(expected: dict[str, np.ndarray]) -> None:
    b = TfliteBackend(TINY)
    wide = {k: v.astype(np.int64) for k, v in _feeds(expected).items()}
    fed = b.adapt_feeds(wide)
    assert fed["input_ids"].dtype == np.int32
    np.testing.assert_allclose(b.run(fed)["output"], expected["output"], rtol=1e-5, atol=1e-6)
    wide["input_ids"] = wide["input_ids"].copy()
    wide["input_ids"][0, 0] = 2**31
    with pytest.raises(InputError, match=r"input 'input_ids': values up to 2147483648 do not fit int32"):
        b.adapt_feeds(wide)


def test_wrong_dtype_and_shape_are_input_errors(expected: dict[str, np.ndarray]) -> None:
    b = TfliteBackend(TINY)
    feeds = _feeds(expected)
    with pytest.raises(InputError, match=r"input 'input_ids': dtype float32, the model wants int32"):
        b.adapt_feeds({**feeds, "input_ids": feeds["input_ids"].astype(np.float32)})
    with pytest.raises(InputError, match=r"input 'attention_mask': shape \[1, 9\], the model wants \[1, 6\]"):
        b.adapt_feeds({**feeds, "attention_mask": np.ones((1, 9), np.int32)})
    with pytest.raises(InputError, match=r"missing \['attention_mask'\]"):
        b.adapt_feeds({"input_ids": feeds["input_ids"]})
    with pytest.raises(InputError, match=r"LiteRT refused the inputs .* input_ids int32\[1, 6\]"):
        b.run({**feeds, "input_ids": np.ones((1, 3), np.int32)})  # run() without adapt_feeds


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no-identifier"])
def test_corrupt_file_is_artifact_load_error(damage: str, tmp_path: Path) -> None:
    data = TINY.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "garbage": data[:8] + bytes(range(256)) * 8, "empty": b"",
           "no-identifier": data[:4] + b"XXXX" + data[8:]}[damage]
    p = tmp_path / "m.tflite"
    p.write_bytes(bad)
    with pytest.raises(ArtifactLoadError, match=r"m\.tflite: .*(corrupt|truncated)"):
        backends.load(p)


def test_failed_delegate_reported_and_cpu_runs(expected: dict[str, np.ndarray], tmp_path: Path) -> None:
    not_a_delegate = tmp_path / "libfake_delegate.so"
    not_a_delegate.write_bytes(b"\x7fELF but not really")
    b = TfliteBackend(TINY, options={"delegate": str(not_a_delegate)})
    d = b.info()["delegate"]
    assert d["loaded"] is False and d["path"] == str(not_a_delegate) and d["ran_on"] == "XNNPACK CPU"
    assert any("could not be loaded" in n and "XNNPACK CPU ran the model instead" in n for n in b.info()["notes"])
    np.testing.assert_allclose(b.run(b.adapt_feeds(_feeds(expected)))["output"], expected["output"], rtol=1e-5,
                               atol=1e-6)


def test_xnnpack_off_same_result_and_unknown_option(expected: dict[str, np.ndarray]) -> None:
    b = TfliteBackend(TINY, options={"xnnpack": "false"})
    assert b.info()["xnnpack"] is False
    np.testing.assert_allclose(b.run(b.adapt_feeds(_feeds(expected)))["output"], expected["output"], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ArtifactLoadError, match=r"unknown runtime option\(s\) delegat; valid: xnnpack, delegate"):
        TfliteBackend(TINY, options={"delegat": "x.so"})
    with pytest.raises(ArtifactLoadError, match=r"no signature 'encode' \(it has serving_default\)"):
        TfliteBackend(TINY, options={"signature": "encode"})


LITERT = runtime_module()[1] == "ai-edge-litert"


@pytest.mark.skipif(not LITERT, reason="the compiled engine is ai-edge-litert's")
def test_compiled_engine_same_outputs_and_input_errors(expected: dict[str, np.ndarray]) -> None:
    b = TfliteBackend(TINY, threads=1, options={"engine": "compiled"})
    assert b.info()["engine"] == "CompiledModel, XNNPACK with a weight cache"
    # one mapping of the file: the interpreter that described the signature is gone (each mapping of a freshly
    # written file took MiniLM fp32's verified buffer headers' whole page-cache folios: 40 MB apiece)
    assert [line.endswith(str(TINY.resolve())) for line in Path("/proc/self/maps").read_text().splitlines()].count(True) == 1
    for _ in range(2):  # the first run packs the weights, the second reuses them
        np.testing.assert_allclose(b.run(b.adapt_feeds(_feeds(expected)))["output"], expected["output"], rtol=1e-5,
                                   atol=1e-6)
    feeds = _feeds(expected)
    with pytest.raises(InputError, match=r"LiteRT refused the inputs .* input_ids int32\[1, 6\]"):
        b.run({**feeds, "input_ids": np.ones((1, 3), np.int32)})  # a short buffer would be written in silence
    with pytest.raises(InputError, match=r"LiteRT refused the inputs"):
        b.run({**feeds, "input_ids": feeds["input_ids"].astype(np.int64)})  # 8-byte ids would be read as int32 pairs


@pytest.mark.skipif(not LITERT, reason="the compiled engine is ai-edge-litert's")
def test_a_dropped_backend_unmaps_its_file_without_the_garbage_collector(expected: dict[str, np.ndarray]) -> None:
    """A reference cycle (the compiled model held a bound method of its backend) kept the artifact mapped until the
    garbage collector ran: after an export, past the bundle writer's POSIX_FADV_DONTNEED, so the profile that
    followed mapped the file's page cache in large folios (MiniLM tflite/fp32 peak RSS 168 MB instead of 112)."""
    import gc

    def mapped() -> int:
        return [line.endswith(str(TINY.resolve())) for line in Path("/proc/self/maps").read_text().splitlines()].count(True)

    before = mapped()
    gc.disable()
    try:
        b = TfliteBackend(TINY, threads=1, options={"engine": "compiled"})
        b.run(b.adapt_feeds(_feeds(expected)))
        assert mapped() == before + 1
        del b
        assert mapped() == before  # freed by reference counting alone
    finally:
        gc.enable()


@pytest.mark.skipif(not LITERT, reason="the compiled engine is ai-edge-litert's")
def test_engine_auto_follows_the_float_weight_size(expected: dict[str, np.ndarray],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship.profiling.backends import tflite

    b = TfliteBackend(TINY)
    assert 0 < b._float_gemm_bytes() < 4096 and b.info()["engine"] == "Interpreter"  # 6x4 + 4 float weights... tiny
    monkeypatch.setattr(tflite, "_COMPILED_FROM_BYTES", b._float_gemm_bytes())
    b = TfliteBackend(TINY)
    assert b.info()["engine"] == "CompiledModel, XNNPACK with a weight cache"
    np.testing.assert_allclose(b.run(b.adapt_feeds(_feeds(expected)))["output"], expected["output"], rtol=1e-5,
                               atol=1e-6)
    assert TfliteBackend(TINY, options={"engine": "interpreter"}).info()["engine"] == "Interpreter"

    def no_tmp(**_: object) -> str:
        raise FileNotFoundError("No usable temporary directory found in ['/tmp']")

    monkeypatch.setattr(tflite.tempfile, "mkdtemp", no_tmp)
    b = TfliteBackend(TINY)  # auto: the interpreter takes over, and says why
    assert b.info()["engine"] == "Interpreter"
    assert any("CompiledModel could not take it" in n and "No usable temporary directory" in n and
               "the interpreter ran it" in n for n in b.info()["notes"])
    np.testing.assert_allclose(b.run(b.adapt_feeds(_feeds(expected)))["output"], expected["output"], rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ArtifactLoadError, match=r"no file for XNNPACK's weight cache .*point TMPDIR at a writable"):
        TfliteBackend(TINY, options={"engine": "compiled"})


def test_ml_dtypes_is_not_the_slow_release() -> None:
    """LiteRT's tensor buffers import ml_dtypes; its 0.7.0 took 0.4-0.55 s and 6 MB to import (0.6.0: 8 ms)."""
    from importlib import metadata

    try:
        version = metadata.version("ml_dtypes")
    except metadata.PackageNotFoundError:
        pytest.skip("ml_dtypes is not installed (tflite-runtime only)")
    assert version != "0.7.0", "ml_dtypes 0.7.0 is excluded in pyproject.toml and constraints.txt: reinstall with -c"


def test_engine_compiled_refused_where_it_cannot_run() -> None:
    with pytest.raises(ArtifactLoadError, match=r"engine 'jit' is not one of auto, compiled, interpreter"):
        TfliteBackend(TINY, options={"engine": "jit"})
    with pytest.raises(ArtifactLoadError, match=r"engine=compiled cannot run this model: .*(XNNPACK only|ai-edge-litert)"):
        TfliteBackend(TINY, options={"engine": "compiled", "xnnpack": "false"})


def test_delegation_walk_on_xnnpack_partitions() -> None:
    """XNNPACK is a delegate too: its DELEGATE node must account for the float ops it replaced."""
    mod, _, _ = runtime_module()
    it = mod.Interpreter(model_path=str(TINY))
    it.allocate_tensors()  # the default delegate is applied here
    rep = delegation_summary(it._get_ops_details(), "xnnpack")
    assert rep["partitions"] >= 1 and 0 < rep["ops_taken"] <= rep["ops_total"]
    assert rep["taken_by_op"].get("FULLY_CONNECTED") == 1
    assert sum(rep["taken_by_op"].values()) + sum(rep["left_on_cpu_by_op"].values()) == rep["ops_total"]


def test_no_runtime_names_both_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeMissingError, match=r"ai-edge-litert.*tflite-runtime"):
        TfliteBackend(TINY)


@pytest.mark.skipif(importlib.util.find_spec("tflite_runtime") is None, reason="tflite-runtime is not installed here")
def test_falls_back_to_tflite_runtime(expected: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    b = TfliteBackend(TINY)
    assert b.info()["runtime"] == "tflite-runtime"
    np.testing.assert_allclose(b.run(b.adapt_feeds(_feeds(expected)))["output"], expected["output"], rtol=1e-5,
                               atol=1e-6)


def test_runs_where_torch_cannot_be_imported() -> None:
    code = ("import sys\nfor m in ('torch', 'litert_torch', 'transformers'): sys.modules[m] = None\n"
            "import numpy as np\nfrom edgeship.profiling import backends\n"
            f"b = backends.load(__import__('pathlib').Path({str(TINY)!r}))\n"
            "out = b.run(b.adapt_feeds({'input_ids': np.ones((1, 6), np.int64), 'attention_mask': np.ones((1, 6), np.int64)}))\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\nprint(out['output'].shape)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("(1, 4)")


def test_cli_delegate_failure_in_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeship.cli import main

    lib = tmp_path / "libmissing_gpu_delegate.so"
    rc = main(["profile", str(TINY), "--delegate", str(lib), "--runs", "3", "--min-seconds", "0", "--warmup", "1",
               "--energy", "estimate", "--quiet", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    shown = capsys.readouterr().out
    assert f"tiny.tflite: delegate {lib} FAILED (" in shown and "XNNPACK CPU ran the model instead" in shown
    import json

    (r,) = json.loads((tmp_path / "r.json").read_text())["results"]
    assert r["status"] == "ok" and r["runtime"]["delegate"]["loaded"] is False and r["torch_free"] is True
