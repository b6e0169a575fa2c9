"""Signed bundles: an ed25519 signature over the sha256 of every file in a bundle.

The manifest already records each artifact's sha256, so checksums catch a damaged copy; they cannot catch someone
who rewrites an artifact *and* its manifest entry. ``sign`` adds ``signature.json`` next to the manifest: the
sha256 of every file of the bundle (manifest, artifacts, tokenizer, samples, labels) and an ed25519 signature over
that list. ``verify`` checks the signature with a public key the user trusts, then that every file on disk is in
the list with the same digest and nothing was added or removed, then the manifest's own checksums.

Crypto is the ``cryptography`` package (no hand-rolled primitives). Keys are PEM: PKCS#8 private keys and
SubjectPublicKeyInfo public keys, the same files ``openssl genpkey -algorithm ed25519`` / ``openssl pkey -pubout``
write, so a key made either way works. Torch-free: the device side verifies.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from edgeship.errors import BundleError, ConfigError, RuntimeMissingError, SignatureError
from edgeship.manifest import MANIFEST_NAME, load_bundle, sha256_file

SIGNATURE_NAME = "signature.json"
SIGNATURE_VERSION = 1
PUBKEY_ENV = "EDGESHIP_PUBKEY"  # a device can require signed bundles without every command naming the key


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise RuntimeMissingError("bundle signatures need the 'cryptography' package: pip install 'edgeship[sign]'"
                                  ) from None
    return ed25519


def _read_key_file(path: str | Path, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    if p.stat().st_size > 64 * 1024:
        raise ConfigError(f"{p}: {p.stat().st_size} bytes is not a PEM {what}")
    return p.read_bytes()


def load_private_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    data = _read_key_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({e}); make one with `edgeship keygen`") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, edgeship signs with ed25519 keys; make one with "
                          "`edgeship keygen` or `openssl genpkey -algorithm ed25519`")
    return key


def load_public_key(path: str | Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    data = _read_key_file(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not a PEM public key ({e}); give the .pub file `edgeship keygen` wrote") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: a {type(key).__name__}, edgeship bundles are signed with ed25519 keys")
    return key


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def keygen(private_path: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new ed25519 key pair: ``PATH`` (private, mode 0600) and ``PATH.pub``."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    priv, pub = Path(private_path), Path(f"{private_path}.pub")
    for p in (priv, pub):
        if p.exists() and not overwrite:
            raise ConfigError(f"{p} exists; pass --overwrite to replace it, or choose another path")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    priv.parent.mkdir(parents=True, exist_ok=True)
    priv.unlink(missing_ok=True)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def bundle_files(root: Path) -> dict[str, str]:
    """sha256 of every file of the bundle but the signature, by POSIX relative path. Symlinks are refused:
    a signed link could point anywhere after signing."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            raise SignatureError(f"bundle {root}: {rel} is a symlink; bundles hold plain files only")
        if p.is_file() and rel != SIGNATURE_NAME:
            out[rel] = sha256_file(p)
    return out


def _payload(files: dict[str, str]) -> bytes:
    """The signed bytes: canonical JSON (sorted keys, no spaces), so the same files always sign the same."""
    doc = {"kind": "edgeship-bundle-signature", "version": SIGNATURE_VERSION, "files": files}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(bundle: str | Path, key_path: str | Path) -> Path:
    """Verify the bundle's checksums, then write ``signature.json`` (replacing an older one)."""
    key = load_private_key(key_path)
    root = load_bundle(bundle, verify=True).root
    files = bundle_files(root)
    doc = {"version": SIGNATURE_VERSION, "algorithm": "ed25519", "key_id": key_id(key.public_key()),
           "files": files, "signature": base64.b64encode(key.sign(_payload(files))).decode()}
    dest = root / SIGNATURE_NAME
    tmp = root / f".{SIGNATURE_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, dest)
    return dest


def _read_signature(root: Path) -> tuple[dict[str, str], bytes, str]:
    path = root / SIGNATURE_NAME
    if not path.is_file():
        raise SignatureError(f"bundle {root} is not signed (no {SIGNATURE_NAME}) and a public key was given; "
                             "sign it with `edgeship sign BUNDLE --key KEY`")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files, sig, algo = doc["files"], base64.b64decode(doc["signature"], validate=True), doc["algorithm"]
        if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
            raise TypeError("files must map paths to sha256 strings")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SignatureError(f"{path}: unreadable signature ({type(e).__name__}: {e}); sign the bundle again") from None
    if algo != "ed25519":
        raise SignatureError(f"{path}: algorithm {algo!r}, edgeship verifies ed25519 signatures only")
    return files, sig, str(doc.get("key_id", "?"))


def verify(bundle: str | Path, pubkey_path: str | Path) -> dict[str, str]:
    """Raise :class:`SignatureError` unless the bundle is exactly what the holder of ``pubkey_path``'s key signed.

    Returns the signed file list."""
    from cryptography.exceptions import InvalidSignature

    public = load_public_key(pubkey_path)
    root = Path(bundle)
    if not (root / MANIFEST_NAME).is_file():
        load_bundle(root, verify=False)  # raises the usual "not a bundle" error
    files, sig, signer = _read_signature(root)
    try:
        public.verify(sig, _payload(files))
    except InvalidSignature:
        raise SignatureError(f"bundle {root}: the signature does not verify with {pubkey_path} (key {key_id(public)}; "
                             f"signed by key {signer}): signed with another key, or {SIGNATURE_NAME} was edited") from None
    on_disk = bundle_files(root)
    added, missing = sorted(set(on_disk) - set(files)), sorted(set(files) - set(on_disk))
    changed = sorted(k for k in set(on_disk) & set(files) if on_disk[k] != files[k])
    if changed or added or missing:
        parts = [f"{what}: {', '.join(names[:5])}" for what, names in
                 (("modified", changed), ("not signed", added), ("missing", missing)) if names]
        raise SignatureError(f"bundle {root} differs from what was signed ({'; '.join(parts)}); "
                             "re-copy the bundle from its source")
    load_bundle(root, verify=True)
    return files


def trusted_key(pubkey: str | Path | None) -> str | Path | None:
    """The public key to enforce: the one given, else ``$EDGESHIP_PUBKEY`` (a device-wide policy), else none."""
    return pubkey if pubkey is not None else (os.environ.get(PUBKEY_ENV) or None)


def check(bundle: str | Path, pubkey: str | Path | None) -> None:
    """Verify ``bundle`` when a key or the policy asks for it; a bundle without signature then fails."""
    key = trusted_key(pubkey)
    if key is None:
        return
    if not Path(bundle).is_dir():
        raise BundleError(f"{bundle}: a signature covers a bundle directory or .zip; a single model file cannot "
                          f"be checked against {key}")
    verify(bundle, key)


def describe(bundle: str | Path) -> str:
    """One line for ``inspect``: who signed the bundle (unverified: inspect holds no key) or that nobody did."""
    root = Path(bundle)
    if not (root / SIGNATURE_NAME).is_file():
        return "signature: none (sign with `edgeship sign BUNDLE --key KEY`)"
    try:
        files, _, signer = _read_signature(root)
    except SignatureError as e:
        return f"signature: UNREADABLE: {e}"
    on_disk = bundle_files(root)
    same = on_disk == files
    return (f"signature: ed25519 by key {signer} over {len(files)} files"
            f"{'' if same else ' (the files on disk differ from the signed list)'}; not verified here: run "
            "`edgeship verify BUNDLE --pubkey KEY.pub` with the key you trust")
