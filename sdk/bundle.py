"""Writing bundles atomically and packing them into one archive.

An export writes into a hidden sibling directory and renames it into place only
after every artifact and the manifest (written last) are on disk, so an
interrupted export never leaves a directory that looks like a valid bundle.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from edgeship.errors import BundleError, OutputExistsError
from edgeship.manifest import MANIFEST_NAME, Manifest, load_bundle


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over ``out`` unless ``overwrite``, and even then unless it is a bundle or empty: an
    overwrite replaces the whole directory, so a directory of anything else (``-o ~/work``) is never taken."""
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it, or choose another -o")
    if not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    if not (out / MANIFEST_NAME).is_file() and any(out.iterdir()):
        raise OutputExistsError(f"output directory {out} is not an edgeship bundle (no {MANIFEST_NAME}) and not "
                                "empty: --overwrite replaces a bundle, never another directory; choose another -o")


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
        for p in sorted(self.staging.rglob("*")):
            if p.is_file() and not p.is_symlink():
                _settle(p)
        tmp = self.staging / (MANIFEST_NAME + ".tmp")
        tmp.write_text(manifest.to_json(), encoding="utf-8")
        _settle(tmp)
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


def _settle(path: Path) -> None:
    """On disk before the bundle is published, and out of the page cache in the form its writer left it.

    ``fsync``: a crash after the bundle's rename must not leave artifacts whose bytes were still only in memory
    under a manifest that was written last. Then ``POSIX_FADV_DONTNEED``: the exporter is done with these pages,
    and on Linux 6.18 the cache a file is written through maps far more of it per touch (large folios) when a
    runtime maps the file: a `tflite/fp32` MiniLM profiled right after its export peaked at 168 MB, 112 MB once
    its pages were read back from disk (the bundle's checksum verification reads them, just after).
    """
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def pack(bundle_dir: str | Path, archive: str | Path | None = None, overwrite: bool = False,
         pubkey: str | Path | None = None) -> Path:
    """Verify a bundle (and its signature, when ``pubkey`` or ``$EDGESHIP_PUBKEY`` is given) and write it as one
    .zip (what Android/iOS apps unpack from assets). ``signature.json`` goes into the archive with the rest."""
    from edgeship import signing

    b = load_bundle(bundle_dir, verify=True)
    signing.check(b.root, pubkey)
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


MAX_UNPACKED_BYTES = 16 * 2**30  # far above any edge model; stops a zip bomb before it fills the disk
MAX_MEMBERS = 10_000


def _member_problem(info: zipfile.ZipInfo, seen: set[str]) -> str | None:
    """Why a zip member must not be unpacked, or None. Checked for every member before anything is written."""
    name = info.filename
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return f"member '{name}' has an absolute path"
    if ".." in parts:
        return f"member '{name}' escapes the destination ('..')"
    if "\x00" in name:
        return f"member {name!r} has a NUL byte in its name"
    if stat.S_ISLNK(info.external_attr >> 16):
        return f"member '{name}' is a symlink; bundles hold plain files only"
    key = name.rstrip("/")
    if key in seen:
        return f"member '{name}' appears twice; which copy is the bundle's is ambiguous"
    seen.add(key)
    return None


def _check_members(archive: Path, infos: list[zipfile.ZipInfo], max_bytes: int) -> None:
    if len(infos) > MAX_MEMBERS:
        raise BundleError(f"{archive}: {len(infos)} members, a bundle has far fewer than {MAX_MEMBERS}; refusing")
    seen: set[str] = set()
    problems = [p for p in (_member_problem(i, seen) for i in infos) if p]
    if problems:
        raise BundleError(f"{archive}: {'; '.join(problems[:3])}; refusing to unpack (re-pack it with `edgeship pack`)")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise BundleError(f"{archive}: members unpack to {total:,} bytes, over the {max_bytes:,}-byte limit; "
                          "refusing (a corrupt or hostile archive)")


def unpack(archive: str | Path, dest: str | Path, max_bytes: int = MAX_UNPACKED_BYTES) -> Path:
    """Unpack a .zip bundle safely and verify it: every member is checked before anything is written (no absolute
    paths, no '..', no symlinks, no duplicate names, bounded size); ``dest`` must be new or empty, and is left
    empty again if the archive or the bundle in it is bad."""
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise BundleError(f"bundle archive not found: {archive}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise OutputExistsError(f"{dest} exists and is not an empty directory; unpack into a new one")
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_members(archive, infos, max_bytes)
            for info in infos:
                _extract_member(zf, info, dest)
        load_bundle(dest, verify=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, ValueError,
            OSError, zlib.error) as e:
        _empty(dest, created)
        raise BundleError(f"{archive}: not a readable zip bundle ({type(e).__name__}: {e}); re-pack it") from None
    except BundleError:
        _empty(dest, created)
        raise
    return dest


@contextlib.contextmanager
def opened(source: str | Path) -> Iterator[Path]:
    """``with opened(path) as root:`` a bundle directory as given, or a packed ``.zip`` unpacked (checked and
    verified by :func:`unpack`) into a temporary directory removed afterwards."""
    source = Path(source)
    if not (source.suffix == ".zip" and source.is_file()):
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="edgeship-bundle-") as tmp:
        yield unpack(source, tmp)


def check_signed(source: str | Path, pubkey: str | Path | None) -> None:
    """:func:`edgeship.signing.check` for what ``profile`` accepts: a bundle directory, its manifest, or a packed
    ``.zip`` (checked in a temporary unpacked copy)."""
    from edgeship import signing

    key = signing.trusted_key(pubkey)
    if key is None:
        return
    src = Path(source)
    with opened(src.parent if src.name == MANIFEST_NAME else src) as root:
        signing.check(root, key)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> None:
    target = dest / info.filename
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "xb") as out:  # "x": a name that collides on disk is refused
        shutil.copyfileobj(src, out, 1 << 20)


def _empty(dest: Path, created: bool) -> None:
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for p in dest.iterdir():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
