"""Writing bundles atomically and packing them into one archive.

An export writes into a hidden sibling directory and renames it into place only
after every artifact and the manifest (written last) are on disk, so an
interrupted export never leaves a directory that looks like a valid bundle.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from edgeship.errors import BundleError, OutputExistsError
from edgeship.manifest import MANIFEST_NAME, Manifest, load_bundle


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")


class BundleWriter:
    """Context manager: ``with BundleWriter(out, overwrite) as w: ...; w.commit(manifest)``."""

    def __init__(self, out: str | Path, overwrite: bool = False) -> None:
        self.out = Path(out).resolve()
        self.overwrite = overwrite
        check_output_dir(self.out, overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self._done = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            shutil.rmtree(self.staging, ignore_errors=True)

    def path(self, rel: str) -> Path:
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, manifest: Manifest) -> Path:
        tmp = self.staging / (MANIFEST_NAME + ".tmp")
        tmp.write_text(manifest.to_json(), encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.staging / MANIFEST_NAME)
        load_bundle(self.staging, verify=True)  # never publish a bundle that does not verify
        backup = None
        if self.out.exists():
            check_output_dir(self.out, self.overwrite)
            backup = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, backup)
        os.replace(self.staging, self.out)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        self._done = True
        return self.out


def pack(bundle_dir: str | Path, archive: str | Path | None = None, overwrite: bool = False) -> Path:
    """Verify a bundle and write it as one .zip (what Android/iOS apps unpack from assets)."""
    b = load_bundle(bundle_dir, verify=True)
    dest = Path(archive) if archive else b.root.with_suffix(".zip")
    if dest.suffix != ".zip":
        raise BundleError(f"archive name must end in .zip, got {dest.name}")
    if dest.exists() and not overwrite:
        raise OutputExistsError(f"{dest} exists; pass --overwrite to replace it")
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            files = sorted(p for p in b.root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
            for p in files:
                zf.write(p, p.relative_to(b.root).as_posix())
            zf.write(b.root / MANIFEST_NAME, MANIFEST_NAME)  # last, like the directory form
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def unpack(archive: str | Path, dest: str | Path) -> Path:
    """Unpack a .zip bundle safely (no paths outside dest) and verify it."""
    dest = Path(dest)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            target = (dest / name).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep):
                raise BundleError(f"{archive}: member '{name}' escapes the destination; refusing to unpack")
        zf.extractall(dest)
    load_bundle(dest, verify=True)
    return dest
