"""The resident-memory split read from /proc/self/smaps: the process's own pages, the artifact's, the libraries'."""

from __future__ import annotations

import dataclasses
import mmap
import re
from pathlib import Path

import numpy as np
import pytest

from edgeship.profiling import resident
from edgeship.profiling.resident import Resident, parse, snapshot

pytestmark = pytest.mark.skipif(not Path(resident.SMAPS).exists(), reason="no /proc/self/smaps on this OS")


def _rollup_rss_mb() -> float:
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1)) / 1024  # type: ignore[union-attr]


def test_a_mapped_artifact_counts_as_the_artifact_and_the_parts_add_up_to_rss(tmp_path: Path) -> None:
    f = tmp_path / "model.bin"
    f.write_bytes(np.random.default_rng(0).integers(0, 255, 8 * 2**20, dtype=np.uint8).tobytes())
    other = tmp_path / "model.bin.data"  # a file the artifact keeps beside it (ONNX external data) is the artifact's
    other.write_bytes(b"\1" * 2**20)
    own = np.ones(16 * 2**20, dtype=np.uint8)  # 16 MB of the process's own
    with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m, \
            open(other, "rb") as oh, mmap.mmap(oh.fileno(), 0, access=mmap.ACCESS_READ) as m2:
        touched = sum(m[i] for i in range(0, len(m), 4096)) + m2[0]
        split = snapshot(f)
        rss = _rollup_rss_mb()
    assert touched >= 0 and split is not None and own.sum() == own.size
    # every page of the 8 MB file, and what the kernel maps of the sibling around its first byte (4 KB to 1 MB)
    assert 8.0 < split.artifact_mb <= 9.05, split
    assert split.anon_mb >= 16 and split.libraries_mb > 1  # the array; Python's own shared libraries
    assert split.total_mb == pytest.approx(rss, rel=0.02)


def test_nothing_is_counted_as_the_artifact_when_it_is_not_mapped(tmp_path: Path) -> None:
    f = tmp_path / "model.tflite"
    f.write_bytes(b"\0" * 2**20)
    split = snapshot(f)
    assert split is not None and split.artifact_mb == 0 and split.anon_mb > 0


def test_parse_reads_the_kernels_format() -> None:
    # three mappings as the kernel prints them (fields cut to those read): a library with a private dirty page,
    # the heap, the artifact; "Anonymous" pages inside a file mapping are the process's own
    text = """\
7f0000000000-7f0000400000 r-xp 00000000 fe:01 123 /usr/lib/libfoo.so
Size:               4096 kB
Rss:                1024 kB
Anonymous:             8 kB
55d000000000-55d000100000 rw-p 00000000 00:00 0                          [heap]
Size:               1024 kB
Rss:                 512 kB
Anonymous:           512 kB
7f1000000000-7f1002000000 r--s 00000000 fe:01 456 /data/B/onnx/int8.onnx
Size:              32768 kB
Rss:                2048 kB
Anonymous:             0 kB
7f2000000000-7f2000001000 rw-p 00000000 00:00 0
Rss:                   4 kB
Anonymous:             4 kB
7f3000000000-7f3006000000 r--p 00000000 fe:01 789 /tmp/edgeship-xnnpack-x/weights.cache (deleted)
Rss:                3072 kB
Anonymous:             0 kB
7f4000000000-7f4000100000 r-xp 00000000 fe:01 790 /venv/onnxruntime/capi/libonnxruntime.so.1.32.0
Rss:                 512 kB
Anonymous:             0 kB
""".splitlines(keepends=True)
    assert parse(text, ["/data/B/onnx/int8.onnx"]) == Resident(anon_mb=524 / 1024, artifact_mb=2.0,
                                                               libraries_mb=1528 / 1024, other_files_mb=3.0)
    assert parse(text, ["/data/B/onnx/"]).artifact_mb == 2.0  # a folder's files (GenAI folders)
    assert parse(text, []).other_files_mb == 5.0  # the model file, when it is not the one asked about


def test_the_json_form_reads_back_from_older_and_newer_writers() -> None:
    split = Resident(anon_mb=1.5, artifact_mb=2.0, libraries_mb=3.0, other_files_mb=4.0)
    assert Resident.from_dict(dataclasses.asdict(split)) == split
    assert Resident.from_dict({"anon_mb": 1.5, "artifact_mb": 2, "libraries_mb": 3}).other_files_mb == 0.0  # before
    assert Resident.from_dict({**dataclasses.asdict(split), "shmem_mb": 9}) == split  # a key a later version adds
