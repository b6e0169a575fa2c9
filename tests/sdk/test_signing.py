"""Signed bundles: keygen, sign, verify, and the checks in profile and pack. Real ed25519 (cryptography)."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeship.bundle import check_signed, pack
from edgeship.cli import main
from edgeship.errors import BundleError, ChecksumError, ConfigError, SignatureError
from edgeship.manifest import sha256_file
from edgeship.profiling.runner import RunConfig, _jobs, profile
from edgeship.signing import SIGNATURE_NAME, keygen, sign, verify


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return keygen(tmp_path / "keys" / "signer")


def test_keygen_writes_a_private_key_only_its_owner_reads(keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert priv.stat().st_mode & 0o077 == 0
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    with pytest.raises(ConfigError, match="exists"):
        keygen(priv)


def test_valid_signature_verifies_and_covers_every_file(make_bundle: Callable[..., Path],
                                                       keys: tuple[Path, Path]) -> None:
    b = make_bundle()
    sign(b, keys[0])
    files = verify(b, keys[1])
    assert set(files) == {"manifest.json", "onnx/fp32.onnx", "vocab.txt", "labels.txt"}


def test_tampered_manifest_is_refused_even_with_consistent_checksums(make_bundle: Callable[..., Path],
                                                                     keys: tuple[Path, Path]) -> None:
    b = make_bundle()
    sign(b, keys[0])
    # the attack checksums alone cannot stop: new artifact bytes and a manifest rewritten to match them
    art = b / "onnx/fp32.onnx"
    art.write_bytes(b"evil-model" * 50)
    m = json.loads((b / "manifest.json").read_text())
    m["artifacts"][0].update(sha256=sha256_file(art), size_bytes=art.stat().st_size)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SignatureError, match=r"differs from what was signed \(modified: manifest.json, onnx/fp32.onnx"):
        verify(b, keys[1])


def test_tampered_artifact_or_extra_file_is_refused(make_bundle: Callable[..., Path], keys: tuple[Path, Path]) -> None:
    b = make_bundle()
    sign(b, keys[0])
    (b / "vocab.txt").write_text("[PAD]\n[UNK]\nevil\n")  # not an artifact: only the signature covers it
    with pytest.raises(SignatureError, match="modified: vocab.txt"):
        verify(b, keys[1])
    (b / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    verify(b, keys[1])
    (b / "extra.so").write_bytes(b"x")
    with pytest.raises(SignatureError, match="not signed: extra.so"):
        verify(b, keys[1])


def test_wrong_key_and_edited_signature_are_refused(make_bundle: Callable[..., Path], keys: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    b = make_bundle()
    sign(b, keys[0])
    _, other_pub = keygen(tmp_path / "other")
    with pytest.raises(SignatureError, match="does not verify"):
        verify(b, other_pub)
    doc = json.loads((b / SIGNATURE_NAME).read_text())
    doc["files"]["vocab.txt"] = "0" * 64
    (b / SIGNATURE_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="does not verify"):
        verify(b, keys[1])
    (b / SIGNATURE_NAME).write_text("{not json")
    with pytest.raises(SignatureError, match="unreadable signature"):
        verify(b, keys[1])


def test_unsigned_bundle_with_a_policy_is_refused_by_profile_and_pack(make_bundle: Callable[..., Path],
                                                                      keys: tuple[Path, Path],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    b = make_bundle()
    with pytest.raises(SignatureError, match="not signed"):
        profile(b, pubkey=keys[1])
    with pytest.raises(SignatureError, match="not signed"):
        pack(b, pubkey=keys[1])
    monkeypatch.setenv("EDGESHIP_PUBKEY", str(keys[1]))  # the device-wide policy
    with pytest.raises(SignatureError, match="not signed"):
        profile(b)
    sign(b, keys[0])
    jobs, _ = _jobs(b, [], RunConfig(), None)
    assert [j.artifact for j in jobs] == ["onnx/fp32"]


def test_a_packed_zip_keeps_the_signature(make_bundle: Callable[..., Path], keys: tuple[Path, Path],
                                          tmp_path: Path) -> None:
    b = make_bundle()
    sign(b, keys[0])
    z = pack(b, tmp_path / "b.zip", pubkey=keys[1])
    with zipfile.ZipFile(z) as zf:
        assert SIGNATURE_NAME in zf.namelist()
    check_signed(z, keys[1])
    assert [j.artifact for j in _jobs(z, [], RunConfig(), keys[1])[0]] == ["onnx/fp32"]


def test_signature_cannot_vouch_for_a_checksum_failure(make_bundle: Callable[..., Path],
                                                       keys: tuple[Path, Path]) -> None:
    b = make_bundle()
    (b / "onnx/fp32.onnx").write_bytes(b"broken")
    with pytest.raises(ChecksumError):
        sign(b, keys[0])  # signing checks the manifest first: nobody signs a bundle that is already broken


def test_cli_keygen_sign_verify(make_bundle: Callable[..., Path], tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    b = make_bundle()
    key = tmp_path / "k"
    assert main(["inspect", str(b)]) == 0
    assert "signature: none (sign with `edgeship sign BUNDLE --key KEY`)" in capsys.readouterr().out
    assert main(["keygen", "-o", str(key)]) == 0
    assert main(["sign", str(b), "--key", str(key)]) == 0
    assert main(["verify", str(b), "--pubkey", f"{key}.pub"]) == 0
    assert "signature valid" in capsys.readouterr().out
    assert main(["inspect", str(b)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("signature:"))
    assert "ed25519 by key" in line and "not verified here" in line and "differ" not in line
    (b / "labels.txt").write_text("z\n")
    assert main(["verify", str(b), "--pubkey", f"{key}.pub"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeship: error: bundle") and "labels.txt" in err[0]
    assert main(["sign", str(b), "--key", f"{key}.pub"]) == 2  # a public key is not a signing key
    assert "not an unencrypted PEM private key" in capsys.readouterr().err


def test_openssl_made_keys_work(make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    """The documented openssl route makes the same PEM files as `edgeship keygen`."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl not installed")
    key, pub = tmp_path / "o.pem", tmp_path / "o.pub"
    subprocess.run([openssl, "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run([openssl, "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    b = make_bundle()
    sign(b, key)
    verify(b, pub)


def test_a_single_model_file_cannot_satisfy_a_signing_policy(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    with pytest.raises(BundleError, match="single model file"):
        profile(f, pubkey=keys[1])
