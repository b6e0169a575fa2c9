"""Profiling over ssh:// against a real OpenSSH server on 127.0.0.1, and every failure the issue lists."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from edgeship.cli import main
from edgeship.errors import DeviceError
from edgeship.profiling import report
from edgeship.profiling.remote import (
    ConnectOptions,
    DeviceURL,
    FleetProgress,
    profile_fleet,
    transport_for,
)
from edgeship.profiling.results import ProfileResult, RunConfig
from edgeship.profiling.runner import profile

pytestmark = [pytest.mark.remote, pytest.mark.needs_export]

FAST = RunConfig(runs=3, min_seconds=0, warmup=1, energy="estimate", progress=False)


def _fleet(bundle: Path, server: Any, workdir: str, **kw: Any) -> dict[str, Any]:
    kw.setdefault("identity", str(server.identity))
    kw.setdefault("known_hosts", str(server.known_hosts))
    # the document `edgeship profile --device ... --json` writes
    return profile_fleet(bundle, devices=kw.pop("devices", [server.url]), config=kw.pop("config", FAST),
                         workdir=workdir, **kw).to_dict()


def test_profile_over_ssh_has_the_local_schema(tiny_onnx_bundle: Path, sshd: Any, device_workdir: str) -> None:
    runs_dir = Path(device_workdir, "runs")
    # the work dir is shared by the session: the farm tests kill a client mid-run on purpose, and its run dir stays
    earlier = set(runs_dir.iterdir()) if runs_dir.is_dir() else set()
    doc = _fleet(tiny_onnx_bundle, sshd, device_workdir)
    assert doc["schema_version"] == 1 and len(doc["runs"]) == 1
    run = doc["runs"][0]
    assert run["status"] == "ok" and run["error"] is None, run.get("error")
    local = profile(tiny_onnx_bundle, config=FAST).to_dict()
    # Same document as a local run, plus the remote keys.
    assert set(local) <= set(run)
    assert set(run) - set(local) == {"device_url", "device_identity", "status", "error", "timings_s"}
    assert set(run["device"]) == set(local["device"])
    assert [r["artifact"] for r in run["results"]] == [r["artifact"] for r in local["results"]]
    for remote_r, local_r in zip(run["results"], local["results"], strict=True):
        assert remote_r["status"] == "ok", remote_r.get("error")
        assert set(remote_r) == set(local_r)
        assert remote_r["latency"]["count"] >= 3 and remote_r["latency"]["p50_ms"] > 0
        assert remote_r["device_check"]["mean_cosine"] >= 0.99
        assert remote_r["torch_free"] is True
    ident = run["device_identity"]
    assert ident["machine"] == ident["arch"] == "x86_64" and ident["emulated"] is None
    assert ident["host_key"].startswith("ssh-ed25519 SHA256:") and ident["python"].startswith("3.")
    assert ident["runtimes"]["onnxruntime"]
    assert ident["pushed_files"] + ident["skipped_files"] == 5  # 2 artifacts, 2 sample files, the manifest
    # Secrets never reach the results: no key material, no key path.
    text = json.dumps(doc)
    assert "PRIVATE KEY" not in text and str(sshd.identity) not in text
    assert sshd.identity.read_text().splitlines()[1] not in text
    # Nothing changed: the second run pushes nothing and reuses the device venv (its stamp is not rewritten;
    # a check of what changed, not of how long it took, which a loaded 2-core box cannot promise).
    stamp = Path(device_workdir, "venv", "edgeship-runtime.json")
    before = stamp.stat().st_mtime_ns
    again = _fleet(tiny_onnx_bundle, sshd, device_workdir)["runs"][0]
    assert again["status"] == "ok"
    assert again["device_identity"]["pushed_files"] == 0 and again["device_identity"]["skipped_files"] == 5
    assert stamp.stat().st_mtime_ns == before
    assert set(runs_dir.iterdir()) == earlier, "these runs left temporary run files on the device"


def test_one_artifact_and_cli_table(tiny_onnx_bundle: Path, sshd: Any, device_workdir: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI reads ~/.ssh/known_hosts: point HOME at a scratch home that trusts this server.
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/known_hosts").write_text(sshd.known_hosts.read_text())
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path.home() / ".cache"))  # keep the wheel cache
    monkeypatch.setenv("HOME", str(home))
    out = tmp_path / "r.json"
    rc = main(["profile", str(tiny_onnx_bundle), "--device", f"{sshd.url}?workdir={device_workdir}",
               "--identity", str(sshd.identity), "--artifact", "onnx/int8-dynamic", "--runs", "3",
               "--min-seconds", "0", "--warmup", "1", "--quiet", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert [r["artifact"] for r in doc["runs"][0]["results"]] == ["onnx/int8-dynamic"]
    assert "onnx/int8-dynamic" in capsys.readouterr().out


def test_unknown_host_key_is_refused_then_accept_new_records_it(sshd: Any, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    opts = ConnectOptions(identity=str(sshd.identity), known_hosts=str(known))
    with pytest.raises(DeviceError, match=r"SHA256:.* is not in .*known_hosts.*--accept-new-host-key"):
        transport_for(DeviceURL.parse(sshd.url), opts).connect()
    assert not known.exists()
    t = transport_for(DeviceURL.parse(sshd.url), ConnectOptions(identity=str(sshd.identity), known_hosts=str(known),
                                                                accept_new_host_key=True))
    with t:
        assert t.run("echo hi")[:2] == (0, "hi")
    assert known.read_text().split() == [f"[127.0.0.1]:{sshd.port}", *sshd.host_pub.split()]
    with transport_for(DeviceURL.parse(sshd.url), opts) as t2:  # now strict mode trusts it
        assert t2.run("true")[0] == 0


def test_changed_host_key_is_refused_even_with_accept_new(sshd: Any, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    pub = (tmp_path / "k.pub").read_text().split()
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    opts = ConnectOptions(identity=str(sshd.identity), known_hosts=str(known), accept_new_host_key=True)
    with pytest.raises(DeviceError, match="CHANGED.*ssh-keygen -R"):
        transport_for(DeviceURL.parse(sshd.url), opts).connect()


def test_wrong_user_key(sshd: Any, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "wrong")], check=True)
    opts = ConnectOptions(identity=str(tmp_path / "wrong"), known_hosts=str(sshd.known_hosts))
    with pytest.raises(DeviceError, match=r"authentication failed .*authorized_keys"):
        transport_for(DeviceURL.parse(sshd.url), opts).connect()


def test_port_closed(tiny_onnx_bundle: Path, sshd: Any, device_workdir: str) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    doc = _fleet(tiny_onnx_bundle, sshd, device_workdir, devices=[f"ssh://root@127.0.0.1:{port}"])
    run = doc["runs"][0]
    assert run["status"] == "error" and "results" not in run
    assert run["error"] == f"cannot connect to 127.0.0.1:{port}: connection refused (is sshd running on that port?)"


def test_ssh_config_alias(sshd: Any, tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text(f"Host mypi\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n  IdentityFile {sshd.identity}\n"
                   f"  UserKnownHostsFile {sshd.known_hosts}\n")
    with transport_for(DeviceURL.parse("ssh://mypi"), ConnectOptions(ssh_config=str(cfg))) as t:
        assert t.identity()["port"] == sshd.port and t.run("echo $USER")[1] == "root"


def test_server_killed_mid_run_keeps_partial_results(tiny_onnx_bundle: Path, sshd_fresh: Any, device_workdir: str,
                                                     kill_after_first: Any) -> None:
    lines = kill_after_first
    cfg = RunConfig(runs=3, min_seconds=5, warmup=1, energy="off", progress=True)
    doc = _fleet(tiny_onnx_bundle, sshd_fresh, device_workdir, config=cfg, progress=FleetProgress(stream=lines))
    run = doc["runs"][0]
    assert lines.killed.is_set(), lines.getvalue()[-2000:]
    assert run["status"] == "error"
    assert run["error"].startswith(f"connection to root@127.0.0.1:{sshd_fresh.port} lost while running a command")
    assert [r["artifact"] for r in run["results"]] == ["onnx/fp32"]  # what finished before the kill is kept
    assert run["results"][0]["status"] == "ok" and run["results"][0]["latency"]["count"] >= 3
    assert run["device"]["arch"] == "x86_64"
    assert "ERROR" not in report.render(ProfileResult.from_dict(run))  # the partial run still renders as a table


def test_device_without_enough_disk(tiny_onnx_bundle: Path, sshd: Any, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    # A real 1 MB filesystem on the device's work directory: nowhere near enough for the runtime.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        run = _fleet(tiny_onnx_bundle, sshd, str(small))["runs"][0]
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert run["status"] == "error"
    assert run["error"].startswith(f"{sshd.url}: only 1.0 MB free in {small}, this run needs about ")
    assert "free space or choose another ?workdir=" in run["error"]


def test_fleet_one_bad_device_does_not_stop_the_other(tiny_onnx_bundle: Path, sshd: Any, device_workdir: str,
                                                      tmp_path: Path) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text(f'[[device]]\nurl = "{sshd.url}"\nname = "loopback"\ntarget = "raspberry-pi-5"\n\n'
                   f'[[device]]\nurl = "ssh://root@127.0.0.1:1"\nname = "gone"\n')
    doc = _fleet(tiny_onnx_bundle, sshd, device_workdir, devices=[], inventory=str(inv))
    by_name = {r["device_identity"]["name"]: r for r in doc["runs"]}
    assert by_name["loopback"]["status"] == "ok" and by_name["gone"]["status"] == "error"
    assert "connection refused" in by_name["gone"]["error"]
    assert by_name["loopback"]["config"]["power_target"] == "raspberry-pi-5"
