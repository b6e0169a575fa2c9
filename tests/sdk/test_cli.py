"""CLI: one-line errors with a non-zero exit and no traceback; the happy paths print what they did."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edgeship.cli import main


def _err(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(("argv", "expect"), [
    (["export", "{model}", "--target", "raspbery-pi-5", "-o", "{tmp}/o"], "Did you mean 'raspberry-pi-5'"),
    (["export", "{model}", "--target", "raspberry-pi-5", "--format", "tfl", "-o", "{tmp}/o"], "unknown format 'tfl'"),
    (["export", "{model}", "--target", "raspberry-pi-5", "--quant", "int3", "-o", "{tmp}/o"], "unknown recipe 'int3'"),
    (["export", "{tmp}/nope", "--target", "raspberry-pi-5", "--format", "onnx", "-o", "{tmp}/o"], "model not found"),
    (["export", "{model}", "--target", "raspberry-pi-5", "--format", "onnx", "--quant", "int8-static",
      "--calibration", "{tmp}/missing.txt", "-o", "{tmp}/o"], "calibration file not found"),
    (["export", "{model}", "--target", "raspberry-pi-5", "-o", "{tmp}"], "exists; pass --overwrite"),
    (["profile", "{tmp}/nothing-here"], "nothing to profile"),
    (["targets", "show", "pixel8"], "Did you mean 'pixel-8'"),
    (["profile", "{tmp}", "--shape", "input_ids=1xx"], "expected NAME=DxD"),
])
def test_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_bert_dir: Path,
                               argv: list[str], expect: str) -> None:
    args = [a.format(model=tiny_bert_dir, tmp=tmp_path) for a in argv]
    rc, err = _err(capsys, args)
    assert rc != 0
    last = err.splitlines()[-1]
    assert last.startswith("edgeship: error: ") and expect in last, err
    assert err.count("edgeship: error") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_tampered_bundle_is_refused(capsys: pytest.CaptureFixture[str], tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(tiny_onnx_bundle, b)
    f = b / "onnx/int8-dynamic.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    for cmd in (["profile", str(b)], ["inspect", str(b)], ["pack", str(b)]):
        rc, err = _err(capsys, cmd)
        assert rc != 0 and "onnx/int8-dynamic.onnx fails its checksum" in err.splitlines()[-1]
        assert "Traceback" not in err


def test_no_traceback_without_debug_and_traceback_with_it(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "edgeship", "targets", "show", "nope"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert quiet.returncode != 0 and "Traceback" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "edgeship", "--debug", *cmd[3:]], capture_output=True, text=True,
                          timeout=120)
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_targets_formats_inspect_pack(capsys: pytest.CaptureFixture[str], tiny_onnx_bundle: Path, tmp_path: Path) -> None:
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "raspberry-pi-5" in out and "galaxy-s24" in out
    assert main(["targets", "show", "raspberry-pi-5"]) == 0
    assert '"meter": "rpi5-pmic"' in capsys.readouterr().out
    assert main(["formats"]) == 0
    assert "int8-static" in capsys.readouterr().out
    assert main(["inspect", str(tiny_onnx_bundle)]) == 0
    out = capsys.readouterr().out
    assert "onnx/int8-dynamic" in out and "verified" in out and "pad input" in out and " any " in out
    assert main(["pack", str(tiny_onnx_bundle), "-o", str(tmp_path / "b.zip")]) == 0
    assert (tmp_path / "b.zip").stat().st_size > 0


def test_a_packed_bundle_is_inspected_as_it_is_and_leaves_nothing_behind(
        capsys: pytest.CaptureFixture[str], tiny_onnx_bundle: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship.errors import BundleError
    from edgeship.manifest import load_bundle

    zipped = tmp_path / "b.zip"
    assert main(["pack", str(tiny_onnx_bundle), "-o", str(zipped)]) == 0
    capsys.readouterr()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read once per process
    assert main(["inspect", str(zipped)]) == 0
    out = capsys.readouterr().out
    assert "onnx/int8-dynamic" in out and "checksums: all artifacts verified" in out
    assert list(scratch.iterdir()) == []  # the unpacked copy is gone
    with pytest.raises(BundleError, match=r"is a packed bundle: read it with `with edgeship.bundle.opened"):
        load_bundle(zipped)
