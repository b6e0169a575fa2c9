"""arm64 tier: the real MiniLM int8 artifacts on the virtual Raspberry Pi 5 (qemu-user, Cortex-A76) over ssh://.

Timings there are emulated and only checked for being marked so; outputs, memory and the SSH
path are real, so aarch64 outputs are checked against the bundle's reference outputs and x86.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.cli import main
from edgeship.manifest import load_bundle
from edgeship.profiling import report
from edgeship.profiling.remote import ConnectOptions, DeviceURL, profile_fleet, transport_for
from edgeship.profiling.results import ProfileResult, RunConfig
from edgeship.profiling.runner import profile
from edgeship.targets import get_profile

pytestmark = [pytest.mark.arm64, pytest.mark.remote, pytest.mark.slow, pytest.mark.needs_export]

# ~0.7 s per MiniLM int8 inference under emulation: a couple of timed runs, no minimum duration.
EMULATED = RunConfig(runs=2, min_seconds=0, warmup=0, energy="estimate", progress=True)


@pytest.fixture(scope="module")
def minilm_int8_bundle(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgeship.pipeline import export

    out = tmp_path_factory.mktemp("minilm-int8") / "B"
    export(minilm_dir, target="raspberry-pi-5", out=out, formats=["onnx", "tflite"], recipes=["int8-dynamic"], log=lambda m: None)
    return out


def _opts(pi: Any) -> ConnectOptions:
    return ConnectOptions(identity=pi.identity, known_hosts=pi.known_hosts)


def test_virtual_pi_is_an_emulated_pi5_on_cortex_a76(virtual_pi: Any) -> None:
    with transport_for(DeviceURL.parse(virtual_pi.url), _opts(virtual_pi)) as t:
        code, out, _ = t.run("uname -m; grep -m1 '^Model' /proc/cpuinfo; grep -m1 'CPU part' /proc/cpuinfo; "
                             "echo $QEMU_CPU $EDGESHIP_EMULATED")
    assert code == 0
    machine, model, part, env = out.splitlines()
    assert machine == "aarch64" and "Raspberry Pi 5" in model and part.endswith("0xd0b")
    assert env == "cortex-a76 qemu-user"  # never "max": qemu 7.2 corrupts int8 results with it


def test_device_cli_status(virtual_pi: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["device", "virtual-pi", "status", "--workdir", virtual_pi.workdir]) == 0
    assert json.loads(capsys.readouterr().out)["url"] == virtual_pi.url


def _aarch64_outputs(pi: Any, bundle_dir: str, art_path: str, fmt: str, tmp: Path) -> dict[str, np.ndarray]:
    """Run one artifact on the Pi's sample inputs with the device venv; fetch the raw outputs."""
    code = (
        "import os, numpy as np; from edgeship.manifest import load_bundle; from edgeship.profiling import backends\n"
        f"b = load_bundle(os.path.expanduser({bundle_dir!r}), verify=False); a = b.manifest.artifact({art_path!r})\n"
        f"m = backends.load(b.path_of(a), {fmt!r}, threads=2, options={{}})\n"
        "z = np.load(b.root / b.manifest.samples['inputs']); n = next(iter(z.values())).shape[0]\n"
        "outs = [m.run(m.adapt_feeds({k: z[k][i:i + 1] for k in z.files})) for i in range(n)]\n"
        "np.savez('/tmp/edgeship-aarch64-out.npz', **{k: np.concatenate([o[k] for o in outs]) for k in outs[0]})\n")
    with transport_for(DeviceURL.parse(pi.url), _opts(pi)) as t:
        rc, _, err = t.run(f"~/.cache/edgeship-device/venv/bin/python -c {shlex.quote(code)}", timeout=900)
        assert rc == 0, err[-2000:]
        t.get("/tmp/edgeship-aarch64-out.npz", tmp / "aarch64.npz")
    with np.load(tmp / "aarch64.npz") as z:
        return {k: z[k] for k in z.files}


def test_minilm_int8_on_virtual_pi5_matches_x86(minilm_int8_bundle: Path, virtual_pi: Any, tmp_path: Path) -> None:
    doc = profile_fleet(minilm_int8_bundle, devices=[virtual_pi.url], identity=virtual_pi.identity,
                        known_hosts=virtual_pi.known_hosts, config=EMULATED).to_dict()
    run = doc["runs"][0]
    assert run["status"] == "ok", run.get("error")
    dev = run["device"]
    assert dev["arch"] == "aarch64" and dev["emulated"] == "qemu-user" and "Raspberry Pi 5" in dev["board"]
    assert run["device_identity"]["emulated"] == "qemu-user"
    assert "EMULATED by qemu-user" in report.render(ProfileResult.from_dict(run))
    local = {r.artifact: r.to_dict() for r in profile(minilm_int8_bundle, config=EMULATED).results}
    manifest = load_bundle(minilm_int8_bundle).manifest
    floor = get_profile("raspberry-pi-5").min_mean_cosine("int8-dynamic")
    summary: dict[str, Any] = {"timings_s": run["timings_s"]}
    for r in run["results"]:
        assert r["status"] == "ok", r.get("error")
        arm, x86 = r["device_check"], local[r["artifact"]]["device_check"]
        # aarch64 vs the PyTorch reference within the artifact's fidelity floor, and close to what x86 gives.
        assert arm["mean_cosine"] >= floor, (r["artifact"], arm)
        assert abs(arm["mean_cosine"] - x86["mean_cosine"]) < 5e-3, (r["artifact"], arm, x86)
        art = manifest.artifact(r["artifact"])
        got = _aarch64_outputs(virtual_pi, f"~/.cache/edgeship-device/bundles/{minilm_int8_bundle.name}", art.path,
                               art.format, tmp_path)
        out_name = manifest.outputs[0].name
        with np.load(minilm_int8_bundle / manifest.samples["inputs"]) as z:
            from edgeship.profiling import backends

            m = backends.load(minilm_int8_bundle / art.path, art.format, threads=2, options={})
            ref = np.concatenate([m.run(m.adapt_feeds({k: z[k][i:i + 1] for k in z.files}))[out_name]
                                  for i in range(got[out_name].shape[0])])
        a, b = got[out_name].astype(np.float64), ref.astype(np.float64)
        cos = float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
        assert cos >= floor, (r["artifact"], cos)
        summary[r["artifact"]] = {"x86_vs_aarch64_max_abs": float(np.max(np.abs(a - b))), "x86_vs_aarch64_cos": cos,
                                  "aarch64_vs_torch_cos": arm["mean_cosine"], "x86_vs_torch_cos": x86["mean_cosine"],
                                  "emulated_p50_ms": r["latency"]["p50_ms"]}
    print("VIRTUAL-PI " + json.dumps(summary))
    assert any(r["format"] == "tflite" for r in run["results"])


def test_two_device_fleet_one_combined_file(tiny_onnx_bundle: Path, sshd: Any, device_workdir: str, virtual_pi: Any,
                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/known_hosts").write_text(sshd.known_hosts.read_text() + Path(virtual_pi.known_hosts).read_text())
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    monkeypatch.setenv("HOME", str(home))
    inv = tmp_path / "fleet.toml"
    inv.write_text(f'[[device]]\nname = "x86-loopback"\nurl = "{sshd.url}"\nidentity = "{sshd.identity}"\n'
                   f'workdir = "{device_workdir}"\n\n'
                   f'[[device]]\nname = "virtual-pi5"\nurl = "{virtual_pi.url}"\nidentity = "{virtual_pi.identity}"\n'
                   'target = "raspberry-pi-5"\n')
    out = tmp_path / "fleet.json"
    rc = main(["profile", str(tiny_onnx_bundle), "--inventory", str(inv), "--runs", "3", "--min-seconds", "0",
               "--warmup", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    doc = json.loads(out.read_text())
    runs = {r["device_identity"]["name"]: r for r in doc["runs"]}
    assert set(runs) == {"x86-loopback", "virtual-pi5"}
    assert runs["x86-loopback"]["device"]["arch"] == "x86_64" and runs["x86-loopback"]["device"]["emulated"] is None
    assert runs["virtual-pi5"]["device"]["arch"] == "aarch64" and runs["virtual-pi5"]["device"]["emulated"] == "qemu-user"
    for r in runs.values():
        assert [x["status"] for x in r["results"]] == ["ok", "ok"]
    assert "[virtual-pi5]" in captured.err and "[x86-loopback]" in captured.err  # one progress view for both
    assert captured.out.count("EMULATED") >= 1 and "x86_64" in captured.out
