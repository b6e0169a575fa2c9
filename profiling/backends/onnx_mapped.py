"""Run an ONNX file's weights from the file itself, memory-mapped, instead of copies on the heap.

An ONNX file keeps every weight inline (``TensorProto.raw_data``). onnxruntime reads the file, parses the protobuf
and copies each initializer into a tensor, so a session peaks near twice the weights: all-MiniLM-L6-v2 int8
(22 MB) took a bare onnxruntime script from 46 to 89 MB. Weights stored as *external data* are memory-mapped
instead (no copy, file-backed pages the OS can drop). This module turns the file's graph into that form without
touching the artifact: it walks the protobuf, drops each large ``raw_data`` and points the initializer at the same
bytes in the artifact file as external data (location = the file's own name, offset and length of the raw bytes).
The session is created from that small graph (~170 KB for MiniLM) with the artifact's folder as the external data
folder, so the bundle, its checksums and its signature stay as they are. Measured: the same MiniLM session peaked
at 74.6 MB, outputs bit-identical.

Only the wire format is read (no ``onnx`` package on the device): ModelProto.graph (7) -> GraphProto.initializer (5)
-> TensorProto.raw_data (9). Anything unexpected returns None and the file is loaded as it is.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

MIN_BYTES = 1024  # smaller initializers stay inline (shapes, scales): mapping them would save nothing
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 9, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Malformed(Exception):
    pass


def _varint(b: bytes | mmap.mmap, i: int, end: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed
        c = b[i]
        i += 1
        x |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return x, i


def _fields(b: bytes | mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, payload start, field end) of each field in ``b[start:end]``."""
    i = start
    while i < end:
        key, j = _varint(b, i, end)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            p, k = j, _varint(b, j, end)[1]
        elif wt in (1, 5):
            p, k = j, j + (8 if wt == 1 else 4)
        elif wt == 2:
            n, p = _varint(b, j, end)
            k = p + n
        else:  # groups (3, 4) are not in onnx.proto
            raise _Malformed
        if k > end:  # a length running past its message: truncated or not this protobuf
            raise _Malformed
        yield fn, wt, i, p, k
        i = k


def _enc_varint(x: int) -> bytes:
    out = bytearray()
    while True:
        c, x = x & 0x7F, x >> 7
        out.append(c | 0x80 if x else c)
        if not x:
            return bytes(out)


def _field(fn: int, payload: bytes) -> bytes:
    return _enc_varint(fn << 3 | 2) + _enc_varint(len(payload)) + payload


def _entry(key: str, value: str) -> bytes:  # StringStringEntryProto
    return _field(_TENSOR_EXTERNAL_DATA, _field(1, key.encode()) + _field(2, value.encode()))


def _tensor(b: bytes | mmap.mmap, start: int, end: int, location: str) -> tuple[bytes, bool]:
    kept, raw = bytearray(), None
    for fn, wt, i, p, k in _fields(b, start, end):
        if fn == _TENSOR_RAW_DATA and wt == 2:
            raw = (p, k - p)
        elif fn == _TENSOR_EXTERNAL_DATA or (fn == _TENSOR_DATA_LOCATION and _varint(b, p, k)[0] == _EXTERNAL):
            return bytes(b[start:end]), False  # already external: leave it to onnxruntime
        elif fn == _TENSOR_DATA_LOCATION:
            continue  # DEFAULT written out (quantizers do): replaced by EXTERNAL below
        else:
            kept += b[i:k]
    if raw is None or raw[1] < MIN_BYTES:
        return bytes(b[start:end]), False
    kept += _entry("location", location) + _entry("offset", str(raw[0])) + _entry("length", str(raw[1]))
    kept += _enc_varint(_TENSOR_DATA_LOCATION << 3) + _enc_varint(_EXTERNAL)
    return bytes(kept), True


def mapped_graph(path: Path) -> tuple[bytes, int] | None:
    """The model with its large initializers pointing into ``path`` as external data, and how many; None when
    there is nothing to map or the file is not the protobuf this expects (then load the file as it is)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as b:
            b.madvise(mmap.MADV_RANDOM)  # only the headers are read: no read-ahead into the weights
            out, mapped = bytearray(), 0
            for fn, wt, i, p, k in _fields(b, 0, len(b)):
                if fn != _MODEL_GRAPH or wt != 2:
                    out += b[i:k]
                    continue
                graph = bytearray()
                for gfn, gwt, gi, gp, gk in _fields(b, p, k):
                    if gfn == _GRAPH_INITIALIZER and gwt == 2:
                        t, changed = _tensor(b, gp, gk, path.name)
                        graph += _field(_GRAPH_INITIALIZER, t)
                        mapped += changed
                    else:
                        graph += b[gi:gk]
                out += _field(_MODEL_GRAPH, bytes(graph))
    except (_Malformed, OSError, ValueError, IndexError):  # ValueError: mmap of an empty file
        return None
    return (bytes(out), mapped) if mapped else None
