"""Fuzzing every parser that reads outside input (hypothesis, a fixed example budget).

Property, for manifests, bundle directories, zip archives, target profiles, fleet inventories, power-meter CSV logs,
``--shape``/``--option`` strings and device URLs: success, or one :class:`EdgeshipError` with a one-line message;
never another exception, never a file written outside the destination, never an artifact accepted whose bytes
differ from the manifest. ``EDGESHIP_FUZZ_EXAMPLES`` raises the budget for a longer local run.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeship.bundle import pack, unpack
from edgeship.errors import EdgeshipError
from edgeship.manifest import MANIFEST_NAME, load_bundle, sha256_file

settings.register_profile("edgeship-fuzz", max_examples=int(os.environ.get("EDGESHIP_FUZZ_EXAMPLES", "60")),
                          deadline=None, database=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile("edgeship-fuzz")


def clean(fn: Callable[..., Any], *args: Any, **kw: Any) -> str:
    """Run a parser: 'ok', or 'error' for a one-line EdgeshipError. Anything else propagates and fails the test."""
    try:
        fn(*args, **kw)
    except EdgeshipError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        assert "Traceback" not in msg
        return "error"
    return "ok"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


def _replace(d: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    d = json.loads(json.dumps(d))
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory: pytest.TempPathFactory, bundle_writer: Callable[[Path], Path]) -> Path:
    return bundle_writer(tmp_path_factory.mktemp("fuzz") / "good")


def _copy(src: Path, tmp: Path, name: str = "b") -> Path:
    dst = tmp / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --- manifest JSON ---------------------------------------------------------------------------------------------

@FUZZ
@given(data=st.data(), value=json_values)
def test_manifest_with_any_field_replaced(good_bundle: Path, tmp_path: Path, doc_paths: Callable[[Any], list[tuple[Any, ...]]],
                                          data: st.DataObject, value: Any) -> None:
    doc = json.loads((good_bundle / MANIFEST_NAME).read_text())
    path = data.draw(st.sampled_from(doc_paths(doc)))
    b = _copy(good_bundle, tmp_path)
    mutated = _replace(doc, path, value)
    (b / MANIFEST_NAME).write_text(json.dumps(mutated))
    if clean(load_bundle, b) == "ok":
        bundle = load_bundle(b)
        for a in bundle.manifest.artifacts:  # whatever was accepted is a file inside the bundle with those bytes
            p = bundle.path_of(a)
            assert p.resolve().is_relative_to(b.resolve()) and sha256_file(p) == a.sha256
            assert p.stat().st_size == a.size_bytes


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_manifest_of_random_bytes(good_bundle: Path, tmp_path: Path, raw: bytes) -> None:
    b = _copy(good_bundle, tmp_path)
    (b / MANIFEST_NAME).write_bytes(raw)
    assert clean(load_bundle, b) == "error"


@FUZZ
@given(new=st.binary(max_size=2000))
def test_artifact_bytes_that_differ_are_never_accepted(good_bundle: Path, tmp_path: Path, new: bytes) -> None:
    b = _copy(good_bundle, tmp_path)
    art = b / "onnx/fp32.onnx"
    same = new == art.read_bytes()
    art.write_bytes(new)
    assert clean(load_bundle, b) == ("ok" if same else "error")


# --- bundle directories ----------------------------------------------------------------------------------------

@FUZZ
@given(action=st.sampled_from(["delete", "dir", "link-outside", "link-inside", "empty"]),
       target=st.sampled_from(["onnx/fp32.onnx", MANIFEST_NAME, "onnx"]))
def test_bundle_directory_damage(good_bundle: Path, tmp_path: Path, action: str, target: str) -> None:
    b = _copy(good_bundle, tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes((good_bundle / "onnx/fp32.onnx").read_bytes())  # same bytes, but not in the bundle
    p = b / target
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    if action == "dir":
        p.mkdir()
    elif action == "link-outside":
        p.symlink_to(outside)
    elif action == "link-inside":
        p.symlink_to(b / "vocab.txt")
    elif action == "empty":
        p.write_bytes(b"")
    assert clean(load_bundle, b) == "error"


# --- zip archives ----------------------------------------------------------------------------------------------

member_names = st.sampled_from(["manifest.json", "onnx/fp32.onnx", "vocab.txt", "labels.txt", "../escape.txt",
                                "/abs.txt", "a/../../escape.txt", "onnx/../../escape.txt", "C:/win.txt",
                                "..\\escape.txt", "dir/", "onnx", "onnx/", "x\x00y", ".", "a//b.txt", "évil.txt"])


# (name, data, is_symlink): names from the list of traps, duplicates allowed, one member in five a symlink
zip_members = st.lists(st.tuples(member_names, st.binary(max_size=64), st.sampled_from([False, False, False, False, True])),
                       max_size=6)


def _zip_bytes(good: Path, extra: list[tuple[str, bytes, bool]], keep_good: bool) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore", UserWarning)  # "Duplicate name": the duplicate is the point
        if keep_good:
            for p in sorted(good.rglob("*")):
                if p.is_file():
                    zf.write(p, p.relative_to(good).as_posix())
        for name, data, link in extra:
            info = zipfile.ZipInfo(name)
            if link:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return buf.getvalue()


def _unpack_confined(tmp_path: Path, raw: bytes, max_bytes: int | None = None) -> str:
    """Unpack into tmp/dest; nothing may appear in tmp outside dest, and a success must verify."""
    for p in list(tmp_path.iterdir()):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    z = tmp_path / "in.zip"
    z.write_bytes(raw)
    kw = {"max_bytes": max_bytes} if max_bytes is not None else {}
    res = clean(unpack, z, tmp_path / "dest", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) in (["in.zip"], ["dest", "in.zip"])
    assert not Path("/abs.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    if res == "ok":
        load_bundle(tmp_path / "dest")
        for p in (tmp_path / "dest").rglob("*"):
            assert not p.is_symlink() and p.resolve().is_relative_to((tmp_path / "dest").resolve())
    else:
        assert not (tmp_path / "dest").exists()  # a refused archive leaves nothing that looks like a bundle
    return res


@FUZZ
@given(members=zip_members, keep_good=st.booleans())
def test_zip_traps(good_bundle: Path, tmp_path: Path, members: list[tuple[str, bytes, bool]], keep_good: bool) -> None:
    _unpack_confined(tmp_path, _zip_bytes(good_bundle, members, keep_good))


@FUZZ
@given(cut=st.integers(0, 10_000), flip=st.integers(0, 10_000), xor=st.integers(1, 255))
def test_zip_truncated_or_corrupted(good_bundle: Path, tmp_path: Path, cut: int, flip: int, xor: int) -> None:
    raw = bytearray(_zip_bytes(good_bundle, [], True))
    raw[flip % len(raw)] ^= xor
    _unpack_confined(tmp_path, bytes(raw[: len(raw) - cut % len(raw)]))


def test_packed_zip_round_trips(good_bundle: Path, tmp_path: Path) -> None:
    z = pack(good_bundle, tmp_path / "p.zip")
    unpack(z, tmp_path / "u")
    assert load_bundle(tmp_path / "u").manifest == load_bundle(good_bundle).manifest


@pytest.mark.parametrize(("member", "message"), [
    (("../escape.txt", b"x", False), r"member '../escape.txt' escapes the destination"),
    (("/abs.txt", b"x", False), "member '/abs.txt' has an absolute path"),
    (("onnx/link", b"/etc/passwd", True), "member 'onnx/link' is a symlink"),
    (("vocab.txt", b"evil", False), "member 'vocab.txt' appears twice"),
])
def test_each_zip_trap_has_its_one_line_error(good_bundle: Path, tmp_path: Path, member: tuple[str, bytes, bool],
                                              message: str) -> None:
    z = tmp_path / "t.zip"
    z.write_bytes(_zip_bytes(good_bundle, [member], True))
    with pytest.raises(EdgeshipError, match=message) as e:
        unpack(z, tmp_path / "dest")
    assert "\n" not in str(e.value) and not (tmp_path / "dest").exists()


def test_zip_over_the_size_limit_names_it(good_bundle: Path, tmp_path: Path) -> None:
    z = tmp_path / "t.zip"
    z.write_bytes(_zip_bytes(good_bundle, [("big.bin", b"\0" * 4096, False)], True))
    with pytest.raises(EdgeshipError, match=r"over the 4,096-byte limit; refusing"):
        unpack(z, tmp_path / "dest", max_bytes=4096)
