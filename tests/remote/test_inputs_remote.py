"""``edgeship profile B --inputs FILE --device ssh://...``: the file is pushed with the bundle and tokenized on the
device (a real OpenSSH server on 127.0.0.1, a device venv with the ``inputs`` extra)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from edgeship.manifest import load_bundle
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
    tokenizer = load_bundle(tiny_onnx_bundle, verify=False).manifest.preprocessing["files"]
    assert "tokenizer/vocab.txt" in tokenizer
    # the 2 artifacts, 2 sample files and the manifest, the tokenizer's files and the inputs
    assert run.identity["pushed_files"] + run.identity["skipped_files"] == 5 + len(tokenizer) + 1
    by = {r.artifact: r for r in run.profile.results}
    for r in by.values():
        assert r.ok and r.torch_free, r.error
        u = r.user_inputs
        assert u is not None and (u.name, u.kind, u.count) == ("mine.jsonl", "jsonl", 3)
        assert u.sha256 == hashlib.sha256(texts.read_bytes()).hexdigest()
        assert [(b.label, b.inputs) for b in u.buckets] == [("1-16 tokens", 2), ("33-64 tokens", 1)]
    int8 = by["onnx/int8-dynamic"].user_inputs
    assert int8 is not None and int8.agreement is not None and int8.agreement_vs == "onnx/fp32"
    assert int8.agreement.n_samples == 3
    assert list(Path(device_workdir, "inputs").glob(f"{int8.sha256[:16]}/mine.jsonl"))  # kept, like the bundle
