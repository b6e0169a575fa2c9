"""``edgeship profile B --inputs FILE --device ssh://...`` against a real OpenSSH server on 127.0.0.1: the host
tokenizes the inputs and pushes them with the bundle as arrays that still name the user's file; the device, with
only the plain runtime, times them and compares the artifacts on them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from edgeship.profiling.remote import profile_fleet
from edgeship.profiling.results import RunConfig

pytestmark = [pytest.mark.remote, pytest.mark.needs_export]


def test_the_inputs_file_is_pushed_and_tokenized_on_the_device(tiny_onnx_bundle: Path, sshd: Any,
                                                                device_workdir: str, tmp_path: Path) -> None:
    texts = tmp_path / "mine.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                             ["the dog runs", "a red car", " ".join(["the quick brown fox"] * 10)]))
    cfg = RunConfig(runs=3, min_seconds=0, warmup=1, energy="off", progress=False, inputs=str(texts))
    fleet = profile_fleet(tiny_onnx_bundle, devices=[sshd.url], config=cfg, workdir=device_workdir,
                          identity=str(sshd.identity), known_hosts=str(sshd.known_hosts))
    (run,) = fleet.runs
    assert run.ok and run.profile is not None, run.error
    # the 2 artifacts, 2 sample files and the manifest, and the inputs tokenized on the host
    assert run.identity["pushed_files"] + run.identity["skipped_files"] == 5 + 1
    by = {r.artifact: r for r in run.profile.results}
    for r in by.values():
        assert r.ok and r.torch_free, r.error
        u = r.user_inputs
        assert u is not None and (u.name, u.kind, u.count, u.prepared_on) == ("mine.jsonl", "jsonl", 3, "host")
        assert u.sha256 == hashlib.sha256(texts.read_bytes()).hexdigest()
        assert [(b.label, b.inputs) for b in u.buckets] == [("1-16 tokens", 2), ("33-64 tokens", 1)]
    int8 = by["onnx/int8-dynamic"].user_inputs
    assert int8 is not None and int8.agreement is not None and int8.agreement_vs == "onnx/fp32"
    assert int8.agreement.n_samples == 3
    assert list(Path(device_workdir, "inputs").glob(f"{int8.sha256[:16]}/mine.jsonl.npz"))  # kept, like the bundle
