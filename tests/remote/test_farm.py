"""The device farm against the real thing on loopback: labgrid-coordinator on 127.0.0.1 (a free port),
labgrid-exporter publishing the loopback sshd as tagged places, and edgeship reserving, running, releasing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgeship.cli import main
from edgeship.profiling.results import RunConfig

pytestmark = [pytest.mark.farm, pytest.mark.remote]

BIN = Path(sys.executable).parent
Sshd = Any  # tests/remote/conftest.py's server (importlib mode cannot import a conftest)
FAST = ["--runs", "5", "--min-seconds", "0", "--warmup", "1", "--energy", "estimate", "--quiet"]
PLACES = {"loop-a": "raspberry-pi-5", "loop-b": "raspberry-pi-5", "loop-c": "lab-own-board", "loop-dead": "dead-board"}


@dataclass
class Lab:
    address: str
    dir: Path
    sshd: Sshd
    home: Path  # a HOME whose ~/.ssh/known_hosts trusts the sshd
    workdir: str
    procs: list[subprocess.Popen[bytes]]

    def env(self, history: Path) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.home), "EDGESHIP_HISTORY": str(history), "PYTHONUNBUFFERED": "1"}

    def args(self, *where: str, workdir: str | None = None) -> list[str]:
        return ["--farm", self.address, *[f"--where={w}" for w in where], "--identity", str(self.sshd.identity),
                "--workdir", workdir or self.workdir]

    def status(self) -> dict[str, Any]:
        from edgeship.profiling.remote import farm

        _, places = farm.status(self.address)
        return {p.name: p for p in places}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _lg(lab_dir: Path, address: str, *args: str) -> None:
    subprocess.run([str(BIN / "labgrid-client"), "-x", address, *args], check=True, capture_output=True, timeout=60,
                   cwd=lab_dir)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import socket

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"labgrid-coordinator exited: {log.read_text()[-500:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"labgrid-coordinator did not listen on 127.0.0.1:{port}: {log.read_text()[-500:]}")


def _wait_resources(lab_dir: Path, address: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = subprocess.run([str(BIN / "labgrid-client"), "-x", address, "resources"], capture_output=True,
                             text=True, timeout=60, cwd=lab_dir).stdout
        if all(f"/{p}/NetworkService" in out for p in PLACES):
            return
        time.sleep(0.5)
    raise RuntimeError("labgrid-exporter did not publish its resources")


@pytest.fixture(scope="session")
def lab(sshd: Sshd, device_workdir: str, tmp_path_factory: pytest.TempPathFactory,
        unavailable: Callable[[str, str], None]) -> Iterator[Lab]:
    if not (BIN / "labgrid-coordinator").exists():
        unavailable("farm", "needs labgrid: pip install -c constraints.txt -e '.[farm]' (./run.sh test does)")
    d = tmp_path_factory.mktemp("lab")
    port = free_port()
    address = f"127.0.0.1:{port}"  # loopback only, never a public interface
    procs: list[subprocess.Popen[bytes]] = []
    coord_log = d / "coordinator.log"
    procs.append(subprocess.Popen([str(BIN / "labgrid-coordinator"), "-l", address], cwd=d, stdin=subprocess.DEVNULL,
                                  stdout=open(coord_log, "ab"), stderr=subprocess.STDOUT, start_new_session=True))
    try:
        _wait_port(port, procs[0], coord_log)
        ports = {p: sshd.port if p != "loop-dead" else free_port() for p in PLACES}  # nothing listens for loop-dead
        (d / "exporter.yaml").write_text("".join(
            f"{p}:\n  NetworkService:\n    address: 127.0.0.1\n    username: root\n    port: {ports[p]}\n"
            for p in PLACES))
        procs.append(subprocess.Popen([str(BIN / "labgrid-exporter"), "-c", address, "-n", "loophost",
                                       str(d / "exporter.yaml")], cwd=d, stdin=subprocess.DEVNULL,
                                      stdout=open(d / "exporter.log", "ab"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
        _wait_resources(d, address)
        for place, target in PLACES.items():
            _lg(d, address, "-p", place, "create")
            _lg(d, address, "-p", place, "add-match", f"loophost/{place}/*")
            pool = ["pool=mixed"] if place in ("loop-a", "loop-dead") else []
            _lg(d, address, "-p", place, "set-tags", f"target={target}", "rack=loopback", *pool)
        home = d / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh/known_hosts").write_text(sshd.known_hosts.read_text())
        yield Lab(address, d, sshd, home, device_workdir, procs)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-MatMul ONNX model file: torch-free, so the contention tests need no export."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
                          "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path_factory.mktemp("farm-model") / "mm.onnx"
    onnx.save(m, str(path))
    return path


def _cli(lab: Lab, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setenv("HOME", str(lab.home))
    return main(list(argv))


def test_status_lists_places_tags_and_ssh(lab: Lab, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(lab, monkeypatch, "farm", "status", "--coordinator", lab.address, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    places = {p["name"]: p for p in doc["places"]}
    assert set(places) == set(PLACES)
    assert places["loop-a"]["tags"] == {"target": "raspberry-pi-5", "rack": "loopback", "pool": "mixed"}
    assert places["loop-a"]["ssh_url"] == f"ssh://root@127.0.0.1:{lab.sshd.port}" and places["loop-a"]["acquired"] is None
    assert _cli(lab, monkeypatch, "farm", "status", "--coordinator", lab.address, "--where", "target=lab-own-board") == 0
    out = capsys.readouterr().out
    assert "loop-c" in out and "loop-a" not in out and "free" in out


def test_matrix_on_two_places_matches_ssh_schema_and_goes_to_history(
        lab: Lab, tiny_onnx_bundle: Path, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "h.sqlite"
    rc = _cli(lab, monkeypatch, "profile", str(tiny_onnx_bundle), str(model_file),
              # every place here is the same loopback sshd: one work directory (and runtime venv) per place
              *lab.args("target=raspberry-pi-5", workdir=f"{lab.workdir}/farm-{{place}}"),
              "--count", "2", *FAST, "--json", str(tmp_path / "farm.json"), "--history", str(db), "--html",
              str(tmp_path / "farm.html"))
    assert rc == 0, capsys.readouterr()
    html = (tmp_path / "farm.html").read_text()
    assert "edgeship report" in html and f"127.0.0.1:{lab.sshd.port}" in html  # the HTML names boards by URL
    doc = json.loads((tmp_path / "farm.json").read_text())
    runs = doc["runs"]
    # grouped by bundle, each bundle on both boards
    assert [Path(r["device_identity"]["bundle"]).name for r in runs] == [tiny_onnx_bundle.name] * 2 + ["mm.onnx"] * 2
    assert {r["device_identity"]["place"] for r in runs[:2]} == {r["device_identity"]["place"] for r in runs[2:]} == {
        "loop-a", "loop-b"}
    for r in runs:
        assert r["status"] == "ok", r["error"]
        assert r["device_identity"]["tags"]["target"] == "raspberry-pi-5"
        assert r["device_identity"]["farm"] == lab.address
        assert r["config"]["power_target"] == "raspberry-pi-5"  # the target tag picked the profile
        assert r["config"]["threads"] == 4  # raspberry-pi-5's thread count, as an inventory target gives
    # the same per-device schema as a direct ssh:// run
    assert _cli(lab, monkeypatch, "profile", str(tiny_onnx_bundle), "--device", f"{lab.sshd.url}?workdir={lab.workdir}",
                "--identity", str(lab.sshd.identity), *FAST, "--json", str(tmp_path / "ssh.json"), "--history",
                str(db)) == 0
    direct = json.loads((tmp_path / "ssh.json").read_text())["runs"][0]
    assert set(runs[0]) == set(direct)
    assert set(runs[0]["device_identity"]) - set(direct["device_identity"]) == {"place", "tags", "farm", "bundle"}
    assert [set(x) for x in runs[0]["results"]] == [set(x) for x in direct["results"]]
    # every run is in the history, under its place name
    capsys.readouterr()
    assert main(["history", "--history", str(db), "--json"]) == 0
    devices = {e["device"] for e in json.loads(capsys.readouterr().out)}
    assert devices == {"loop-a", "loop-b", lab.sshd.url}
    places = lab.status()
    assert places["loop-a"].acquired is None and places["loop-b"].acquired is None  # released


def test_a_dead_board_fails_alone(lab: Lab, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc = _cli(lab, monkeypatch, "profile", str(model_file), *lab.args("pool=mixed"), "--count", "2", *FAST,
              "--json", str(tmp_path / "r.json"), "--no-history")
    out = capsys.readouterr().out
    assert rc == 1
    runs = {r["device_identity"]["place"]: r for r in json.loads((tmp_path / "r.json").read_text())["runs"]}
    assert runs["loop-a"]["status"] == "ok" and runs["loop-a"]["results"][0]["latency"]["count"] >= 5
    assert runs["loop-dead"]["status"] == "error" and "connection refused" in runs["loop-dead"]["error"]
    assert "loop-dead: ERROR cannot connect to 127.0.0.1:" in out
    places = lab.status()
    assert places["loop-a"].acquired is None and places["loop-dead"].acquired is None


def _client(lab: Lab, model: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "edgeship", "profile", str(model), *lab.args("name=loop-c"), "--energy", "estimate",
           "--warmup", "1", "--json", str(out), *extra]
    return subprocess.Popen(cmd, env=lab.env(out.with_suffix(".sqlite")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_held(lab: Lab, place: str, proc: subprocess.Popen[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = lab.status()[place].acquired
        if holder:
            return holder
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
    raise AssertionError(f"{place} was never acquired")


def test_second_client_waits_then_runs(lab: Lab, model_file: Path, tmp_path: Path) -> None:
    first = _client(lab, model_file, tmp_path / "a.json", "--runs", "5", "--min-seconds", "4")
    holder = _wait_held(lab, "loop-c", first)
    assert holder.endswith(f".edgeship-{first.pid}")
    second = _client(lab, model_file, tmp_path / "b.json", "--runs", "5", "--min-seconds", "0")
    _, err_a = first.communicate(timeout=180)
    _, err_b = second.communicate(timeout=180)
    assert first.returncode == 0, err_a
    assert second.returncode == 0, err_b
    assert "waiting for 1 place(s) to become free" in err_b
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["runs"][0] for n in "ab")
    # one board, one job at a time: the second measured after the first had finished
    assert b["created_utc"] >= a["created_utc"] and a["device_identity"]["place"] == b["device_identity"]["place"]
    assert lab.status()["loop-c"].acquired is None


def test_sigterm_releases_and_sigkill_is_reclaimed(lab: Lab, model_file: Path, tmp_path: Path) -> None:
    term = _client(lab, model_file, tmp_path / "t.json", "--runs", "100000", "--min-seconds", "120")
    _wait_held(lab, "loop-c", term)
    time.sleep(1.0)
    term.send_signal(signal.SIGTERM)
    term.communicate(timeout=60)
    assert term.returncode != 0
    assert lab.status()["loop-c"].acquired is None  # released on the way out

    killed = _client(lab, model_file, tmp_path / "k.json", "--runs", "100000", "--min-seconds", "120")
    holder = _wait_held(lab, "loop-c", killed)
    os.killpg(killed.pid, signal.SIGKILL)  # no finally runs: the place stays acquired by a dead process
    killed.communicate(timeout=30)
    assert lab.status()["loop-c"].acquired == holder
    nxt = _client(lab, model_file, tmp_path / "n.json", "--runs", "3", "--min-seconds", "0")
    _, err = nxt.communicate(timeout=180)
    assert nxt.returncode == 0, err
    assert f"reclaimed place loop-c: its holder, edgeship process {killed.pid} on this host, is gone" in err
    assert lab.status()["loop-c"].acquired is None


def test_busy_place_times_out_with_who_holds_it(lab: Lab, model_file: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _lg(lab.dir, lab.address, "-p", "loop-c", "acquire")  # labgrid's own client, another user of the lab
    try:
        holder = lab.status()["loop-c"].acquired
        assert holder and ".edgeship-" not in holder
        rc = _cli(lab, monkeypatch, "profile", str(model_file), *lab.args("name=loop-c"), *FAST, "--farm-timeout",
                  "2", "--no-history")
        err = capsys.readouterr().err.strip()
        assert rc == 1 and "\n" not in err
        assert "no free place matching name=loop-c within 2 s" in err and f"loop-c (held by {holder})" in err
        assert not _reservations(lab)  # the waiting reservation was cancelled on the way out
    finally:
        _lg(lab.dir, lab.address, "-p", "loop-c", "release")


def _reservations(lab: Lab) -> str:
    return subprocess.run([str(BIN / "labgrid-client"), "-x", lab.address, "reservations"], capture_output=True,
                          text=True, timeout=60, cwd=lab.dir, check=True).stdout.strip()


def test_no_such_tag_and_coordinator_down_are_one_line(lab: Lab, model_file: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(lab, monkeypatch, "profile", str(model_file), *lab.args("target=jetson-orin-nano"), *FAST,
                "--no-history") == 1
    err = capsys.readouterr().err.strip()
    assert "0 place(s) matching target=jetson-orin-nano, 1 needed; tags there: pool=mixed, rack=loopback, " in err
    assert "\n" not in err
    down = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    assert _cli(lab, monkeypatch, "farm", "status", "--coordinator", down) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"edgeship: error: cannot reach the labgrid coordinator at {down}: is labgrid-coordinator running "
                   "there (and the port right)?")
    assert time.monotonic() - t0 < 30


@pytest.mark.arm64
def test_virtual_pi_as_a_place_of_its_own_exporter(lab: Lab, virtual_pi: Any, model_file: Path) -> None:
    """A second host's exporter (one per host, as in a lab) publishing the virtual arm64 Pi; its timings are
    emulated and say so."""
    from edgeship.profiling.remote.farm import profile_farm

    (lab.dir / "pihost.yaml").write_text(f"vpi5:\n  NetworkService:\n    address: 127.0.0.1\n    username: root\n"
                                         f"    port: {virtual_pi.port}\n")
    exporter = subprocess.Popen([str(BIN / "labgrid-exporter"), "-c", lab.address, "-n", "pihost",
                                 str(lab.dir / "pihost.yaml")], cwd=lab.dir, stdin=subprocess.DEVNULL,
                                stdout=open(lab.dir / "pihost.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _lg(lab.dir, lab.address, "-p", "vpi5", "create")
        _lg(lab.dir, lab.address, "-p", "vpi5", "add-match", "pihost/vpi5/*")
        _lg(lab.dir, lab.address, "-p", "vpi5", "set-tags", "target=raspberry-pi-5", "emulated=qemu")
        deadline = time.monotonic() + 30
        while lab.status()["vpi5"].ssh_url is None:
            assert time.monotonic() < deadline, "the second exporter did not publish the Pi"
            time.sleep(0.3)
        fleet = profile_farm([model_file], address=lab.address, where={"emulated": "qemu"},
                             config=RunConfig(
                                 runs=2, min_seconds=0, warmup=0, energy="estimate", threads=1, progress=False),
                             transport_options={"identity": virtual_pi.identity, "known_hosts": virtual_pi.known_hosts})
        (run,) = fleet.runs
        assert run.status == "ok", run.error
        assert run.identity["place"] == "vpi5" and run.identity["arch"] == "aarch64"
        assert run.identity["emulated"] == "qemu-user" and run.profile is not None
        assert run.profile.device.emulated == "qemu-user" and run.profile.results[0].ok
        assert lab.status()["vpi5"].acquired is None
    finally:
        _lg(lab.dir, lab.address, "-p", "vpi5", "delete")
        exporter.terminate()
        exporter.wait(10)
