"""What a process's resident memory is made of, from ``/proc/self/smaps`` (Linux and Android; elsewhere nothing).

Peak RSS mixes memory the process owns with clean pages the kernel maps from files: the runtime's shared libraries
and, where a runtime memory-maps its model, the artifact itself. The second kind is the page cache, shared with
other processes and dropped under memory pressure without a write, and how much of a file becomes resident is the
kernel's choice, not the runtime's: a fault maps up to ``fault_around_bytes`` (64 KB by default) of what the page
cache holds around it, so one embedding row looked up from a mapped table can map 16 pages. The split says which
part of a runner's memory is its own, measured once at the end of the run with the model still loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

SMAPS = "/proc/self/smaps"
_LIBRARY = re.compile(r"\.(so|dylib)(\.[0-9.]+)?( \(deleted\))?$")  # libfoo.so, libfoo.so.1.32.0, _ext.cpython-311.so


@dataclass(frozen=True)
class Resident:
    """Resident MB by kind, one reading: ``anon_mb`` the process's own pages (heap, arenas, packed weights, the
    private copies of library data), ``artifact_mb`` clean pages mapped from the artifact's file(s),
    ``libraries_mb`` those of shared libraries, ``other_files_mb`` those of any other file (a runtime's own cache
    file: LiteRT maps the weights XNNPACK packed into one)."""

    anon_mb: float
    artifact_mb: float
    libraries_mb: float
    other_files_mb: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Resident:
        """From its JSON form; keys another version may add are left out, ``other_files_mb`` may be missing."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in d.items() if k in names})

    @property
    def total_mb(self) -> float:
        return self.anon_mb + self.artifact_mb + self.libraries_mb + self.other_files_mb


def _is_mapping_header(line: str) -> bool:
    head = line.split(" ", 1)[0]
    return "-" in head and all(c in "0123456789abcdef-" for c in head)


def parse(text: Iterable[str], artifact: Iterable[str]) -> Resident:
    """The split of one smaps listing; ``artifact`` are the real paths counted as the artifact's (a file, or
    every file under a folder when a path ends with ``/``)."""
    paths = list(artifact)
    files, folders = {p for p in paths if not p.endswith("/")}, [p for p in paths if p.endswith("/")]
    kb = {"anon": 0, "artifact": 0, "libraries": 0, "other_files": 0}
    path, rss, anon_here = "", 0, 0  # of the mapping being read

    def close() -> None:
        if not path or path.startswith("["):  # anonymous, [heap], [stack], [vdso]...: counted by Anonymous
            return
        kind = ("artifact" if path in files or any(path.startswith(f) for f in folders)
                else "libraries" if _LIBRARY.search(path) else "other_files")
        kb[kind] += rss - anon_here

    for line in text:
        if _is_mapping_header(line):
            close()
            parts = line.split(None, 5)
            path, rss, anon_here = (parts[5].strip() if len(parts) > 5 else ""), 0, 0
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Anonymous:"):
            anon_here = int(line.split()[1])
            kb["anon"] += anon_here
    close()
    return Resident(**{f"{k}_mb": v / 1024 for k, v in kb.items()})


def snapshot(artifact: Path) -> Resident | None:
    """The split of this process now; ``artifact`` a model file (its folder too when the format keeps weights
    beside it, as ONNX external data and GenAI folders do). None where there is no ``/proc/self/smaps``."""
    real = os.path.realpath(artifact)
    if os.path.isdir(real):
        paths = [real + "/"]
    else:
        parent = os.path.dirname(real)
        paths = [real, *(os.path.join(parent, n) for n in _siblings(parent, os.path.basename(real)))]
    try:
        with open(SMAPS, encoding="utf-8", errors="replace") as f:
            return parse(f, paths)
    except OSError:
        return None


def _siblings(parent: str, stem: str) -> list[str]:
    """Files an artifact keeps beside itself (``model.onnx`` -> ``model.onnx.data``, ``model.onnx_data``)."""
    try:
        return [n for n in os.listdir(parent) if n != stem and n.startswith(stem)]
    except OSError:
        return []


__all__ = ["Resident", "parse", "snapshot"]
