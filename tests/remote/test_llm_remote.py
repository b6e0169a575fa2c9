"""LLM bundles profiled over ssh:// against a real OpenSSH server on 127.0.0.1 (the ``llm`` job kind of the remote
session): the device venv gets onnxruntime-genai from pushed wheels, each artifact runs in a fresh process there,
and the results name the device and read back through report and history."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edgeship.cli import main
from edgeship.errors import DeviceError, InputError, UnknownKeyError
from edgeship.profiling.llm.bench import LLMRunConfig, profile_llm
from edgeship.profiling.llm.remote import profile_llm_remote
from edgeship.profiling.llm.results import LLMProfileResult
from edgeship.profiling.remote import FleetProgress

pytestmark = [pytest.mark.remote, pytest.mark.needs_export]

FAST = LLMRunConfig(prompt_lengths=(8, 16), new_tokens=16, energy="auto", idle_seconds=0.2)
RECIPES = ["fp32", "int4-weight"]


def _llm_fixtures() -> Any:
    """tests/llm/conftest.py's tiny-model builders (importlib mode cannot import a conftest by name)."""
    spec = importlib.util.spec_from_file_location("edgeship_llm_test_models",
                                                  Path(__file__).resolve().parents[1] / "llm" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Llama as ONNX GenAI folders (fp32 and block-wise int4): the cheapest LLM export."""
    from edgeship.llm import export_llm

    model = _llm_fixtures()._tiny("llama", tmp_path_factory.mktemp("tiny-llama"))
    out = tmp_path_factory.mktemp("llm-remote") / "b"
    export_llm(model, target="x86-64-laptop", out=out, formats=["onnx"], recipes=RECIPES, max_context=128,
               allow_degraded=True, log=lambda m: None)
    return out


def _remote(bundle: Path, server: Any, workdir: str, **kw: Any) -> list[LLMProfileResult]:
    return profile_llm_remote(bundle, devices=kw.pop("devices", [server.url]), config=kw.pop("config", FAST),
                              identity=str(server.identity), known_hosts=str(server.known_hosts), workdir=workdir,
                              progress=kw.pop("progress", FleetProgress(enabled=False)), **kw)


def _run_dirs(workdir: str) -> set[Path]:
    runs = Path(workdir, "runs")
    return set(runs.iterdir()) if runs.is_dir() else set()


@pytest.fixture(scope="module")
def remote_run(llm_bundle: Path, sshd: Any, device_workdir: str) -> tuple[LLMProfileResult, set[Path], set[Path]]:
    before = _run_dirs(device_workdir)  # the farm tests leave a killed client's run dir in this shared work dir
    [res] = _remote(llm_bundle, sshd, device_workdir)
    return res, before, _run_dirs(device_workdir)


def test_remote_llm_profile_measures_every_artifact_on_the_device(remote_run: Any, sshd: Any,
                                                                  device_workdir: str) -> None:
    res, before, after = remote_run
    assert res.status == "ok" and res.error is None and res.ok, res.error
    assert [r.artifact for r in res.results] == [f"onnx/{q}" for q in RECIPES]
    for r in res.results:
        assert r.status == "ok", r.error
        assert [p.prompt_tokens for p in r.prompts] == [8, 16]
        assert all(p.ttft_ms > 0 and p.prefill_tokens_per_s > 0 for p in r.prompts)
        assert r.decode_tokens == 16 and len(r.token_ns) == 16 and min(r.token_ns) > 0
        assert r.decode_tokens_per_s is not None and r.decode_tokens_per_s > 0
        assert r.peak_rss_mb is not None and r.peak_rss_mb > 0 and r.load_seconds is not None
        assert r.torch_free is True and r.runtime["runtime"] == "onnxruntime-genai"
        # no power meter in this container: the energy is the target model's, and it says so
        assert r.energy is not None and r.energy.estimated and r.joules_per_token is not None and r.joules_per_token > 0
    # the result names the device it ran on
    assert res.device_url == sshd.url and res.device_name == sshd.url
    ident = res.device_identity
    assert ident["host_key"].startswith("ssh-ed25519 SHA256:") and ident["machine"] == "x86_64"
    assert ident["runtimes"]["onnxruntime"]
    # measured by the device venv's python (built from pushed wheels), not this test's interpreter
    assert str(res.device.python_executable).startswith(f"{device_workdir}/venv/")
    assert set(res.timings_s) == {"connect", "check", "push", "runtime", "profile"}
    # onnxruntime-genai came from pushed wheels and is recorded in the venv, so the next run does not reinstall it
    stamp = json.loads(Path(device_workdir, "venv", "edgeship-runtime.json").read_text())
    assert any(e.startswith("onnxruntime-genai==") for e in stamp["extras"])
    assert after == before, "the run left temporary files in the device work dir"


def test_remote_result_has_the_local_structure(remote_run: Any, llm_bundle: Path) -> None:
    remote = remote_run[0].to_dict()
    local = profile_llm(llm_bundle, config=FAST).to_dict()
    assert set(local) <= set(remote)
    assert set(remote) - set(local) == {"device_url", "device_identity", "status", "error", "timings_s"}
    assert set(remote["device"]) == set(local["device"]) and remote["config"] == local["config"]
    for r, lo in zip(remote["results"], local["results"], strict=True):
        assert (r["artifact"], r["status"]) == (lo["artifact"], lo["status"])
        assert set(r) == set(lo) and set(r["decode_token_ms"]) == set(lo["decode_token_ms"])
        assert set(r["energy"]) == set(lo["energy"])
    # and it round-trips
    assert LLMProfileResult.from_dict(json.loads(json.dumps(remote))).to_dict() == remote


def test_cli_remote_llm_json_report_and_history(llm_bundle: Path, sshd: Any, device_workdir: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI reads ~/.ssh/known_hosts: point HOME at a scratch home that trusts this server.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/known_hosts").write_text(sshd.known_hosts.read_text())
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path.home() / ".cache"))  # keep the wheel cache
    monkeypatch.setenv("HOME", str(home))
    out, db = tmp_path / "r.json", tmp_path / "h.sqlite"
    rc = main(["profile", str(llm_bundle), "--device", f"{sshd.url}?workdir={device_workdir}", "--identity",
               str(sshd.identity), "--artifact", "onnx/int4-weight", "--prompt-lengths", "8", "--new-tokens", "12",
               "--json", str(out), "--history", str(db)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert f"== {sshd.url}" in text.out and "onnx/int4-weight" in text.out and "(est.)" in text.out
    assert "ESTIMATE from the target power model" in text.out
    doc = json.loads(out.read_text())
    assert doc["kind"] == "llm" and doc["device_url"] == sshd.url
    assert [r["artifact"] for r in doc["results"]] == ["onnx/int4-weight"]
    assert main(["report", str(out)]) == 0
    assert "PICK" in capsys.readouterr().out
    assert main(["history", "--history", str(db), "--device", sshd.url]) == 0
    assert "onnx/int4-weight" in capsys.readouterr().out


def test_unknown_artifact_and_context_are_refused_before_connecting(llm_bundle: Path, sshd: Any,
                                                                    device_workdir: str) -> None:
    before = _run_dirs(device_workdir)
    with pytest.raises(UnknownKeyError, match=r"onnx/int8.*onnx/fp32"):
        _remote(llm_bundle, sshd, device_workdir, artifact="onnx/int8")
    with pytest.raises(InputError, match="exceed the artifact's max context 128"):
        _remote(llm_bundle, sshd, device_workdir, config=dataclasses.replace(FAST, prompt_lengths=(120,)))
    assert _run_dirs(device_workdir) == before


def test_cli_unknown_artifact_is_one_line(llm_bundle: Path, sshd: Any, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["profile", str(llm_bundle), "--device", sshd.url, "--artifact", "tflite/int8-dynamic"])
    err = capsys.readouterr().err
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "tflite/int8-dynamic" in err
    assert "Traceback" not in err


def test_pte_llm_runtime_that_cannot_be_installed_is_refused(llm_bundle: Path, sshd: Any, device_workdir: str,
                                                             tmp_path: Path) -> None:
    # The same files declared as a .pte artifact: the format decides the runtime, and checksums still verify.
    bundle = tmp_path / "b"
    shutil.copytree(llm_bundle, bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["artifacts"][1]["format"] = "pte"
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DeviceError, match=r"^pte/int4-weight: cannot be profiled on a remote device: edgeship does "
                                          r"not install the executorch runtime .*--artifact"):
        _remote(bundle, sshd, device_workdir)
    [res] = _remote(bundle, sshd, device_workdir, artifact="onnx/fp32")  # the others still can
    assert res.ok and [r.artifact for r in res.results] == ["onnx/fp32"]


def test_device_without_room_for_the_bundle(llm_bundle: Path, sshd: Any, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    # A real 1 MB filesystem on the device's work directory: no room for the bundle and its runtime.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        [res] = _remote(llm_bundle, sshd, str(small))
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert res.status == "error" and not res.ok and res.results == ()
    assert res.error is not None and "\n" not in res.error
    assert res.error.startswith(f"{sshd.url}: only 1.0 MB free in {small}, this run needs about ")
    assert res.device_name == sshd.url


def test_connection_lost_mid_run_keeps_the_finished_artifacts(llm_bundle: Path, sshd_fresh: Any,
                                                              device_workdir: str, kill_after_first: Any) -> None:
    lines = kill_after_first
    # a long decode on the second artifact keeps it running when the first one's record arrives
    cfg = dataclasses.replace(FAST, new_tokens=100, prompt_lengths=(16,))
    [res] = _remote(llm_bundle, sshd_fresh, device_workdir, config=cfg, progress=FleetProgress(stream=lines))
    assert lines.killed.is_set(), lines.getvalue()[-2000:]
    assert res.status == "error" and res.error is not None
    assert res.error.startswith(f"connection to root@127.0.0.1:{sshd_fresh.port} lost while running a command")
    assert [r.artifact for r in res.results] == ["onnx/fp32"] and res.results[0].decode_tokens == 100
    assert res.device.arch == "x86_64" and res.device_url == sshd_fresh.url


def test_runtime_that_has_no_wheel_for_the_device_is_one_line(llm_bundle: Path, sshd: Any, device_workdir: str,
                                                              remote_run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeship.profiling.remote import wheels

    # a release of onnxruntime-genai that PyPI has never had, as a platform without a wheel would answer
    monkeypatch.setattr(wheels, "extra_requirement", lambda dist: f"{dist}==0.0.1")
    stamp = Path(device_workdir, "venv", "edgeship-runtime.json")  # written by remote_run's provisioning
    before = stamp.read_text()
    [res] = _remote(llm_bundle, sshd, device_workdir, artifact="onnx/fp32")
    assert res.status == "error" and res.results == () and res.error is not None and "\n" not in res.error
    assert re.match(rf"{re.escape(sshd.url)}: onnxruntime-genai==0\.0\.1 cannot be installed on this device "
                    r"\(cp3\d+-x86_64-glibc[\d.]+\): pip download", res.error), res.error
    assert stamp.read_text() == before  # the device venv was left as it was


def test_inventory_fleet_of_llm_runs_in_one_file(llm_bundle: Path, sshd: Any, device_workdir: str, tmp_path: Path,
                                                 remote_run: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # Both entries are this one sshd and work dir: ``remote_run`` has provisioned its venv already (two first
    # installs into one work dir at once would collide, as they would on a real device listed twice).
    inv = tmp_path / "devices.toml"
    inv.write_text("".join(f"""[[device]]
url = "{sshd.url}"
name = "{name}"
target = "raspberry-pi-5"
workdir = "{device_workdir}"
identity = "{sshd.identity}"
known_hosts = "{sshd.known_hosts}"
""" for name in ("pi-a", "pi-b")))
    out, db = tmp_path / "fleet.json", tmp_path / "h.sqlite"
    rc = main(["profile", str(llm_bundle), "--inventory", str(inv), "--artifact", "onnx/fp32", "--prompt-lengths",
               "8", "--new-tokens", "10", "--json", str(out), "--history", str(db), "--html", str(tmp_path / "r.html")])
    assert rc == 0, capsys.readouterr().err
    page = (tmp_path / "r.html").read_text()
    assert "onnx/fp32 on pi-a" in page and "onnx/fp32 on pi-b" in page
    doc = json.loads(out.read_text())
    assert doc["kind"] == "llm" and [r["device_identity"]["name"] for r in doc["runs"]] == ["pi-a", "pi-b"]
    for run in doc["runs"]:
        # the inventory's target supplies the power model the estimate comes from
        assert run["config"]["power_target"] == "raspberry-pi-5" and run["results"][0]["energy"]["estimated"]
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "onnx/fp32 on pi-a" in text and "onnx/fp32 on pi-b" in text
    for name in ("pi-a", "pi-b"):
        assert main(["history", "--history", str(db), "--device", name]) == 0
        assert "onnx/fp32" in capsys.readouterr().out
    assert main(["compare", str(out), "--baseline", str(out), "--history", str(db)]) == 0
    rows = capsys.readouterr().out
    assert "pi-a" in rows and "pi-b" in rows and "per-token decode times" in rows


def test_farm_does_not_take_llm_bundles_yet(llm_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", str(llm_bundle), "--farm", "127.0.0.1:1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--farm does not take LLM bundles yet" in err and "--device" in err


def test_requirements_come_from_the_artifacts_formats(llm_bundle: Path) -> None:
    from importlib import metadata

    from edgeship.manifest import load_bundle
    from edgeship.profiling.llm.remote import LLMJob

    arts = load_bundle(llm_bundle).manifest.artifacts
    job = LLMJob(FAST)
    # ONNX GenAI folders need onnxruntime-genai, pinned to the version this host measured with
    assert job.requirements(arts) == (f"onnxruntime-genai=={metadata.version('onnxruntime-genai')}",)
    # LiteRT is part of the plain device runtime: nothing to add
    assert job.requirements([dataclasses.replace(a, format="tflite") for a in arts]) == ()
