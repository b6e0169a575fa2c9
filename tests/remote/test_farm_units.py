"""The farm's pieces that need no coordinator: filters, addresses, stale holders, the target tag, CLI checks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edgeship.cli import main
from edgeship.errors import ConfigError, RuntimeMissingError
from edgeship.profiling.remote import farm
from edgeship.profiling.results import RunConfig


def test_where_filters() -> None:
    assert farm.parse_where(["target=raspberry-pi-5", "room=b2"]) == {"target": "raspberry-pi-5", "room": "b2"}
    for bad in ("target", "Target=x", "target=a b", "=x", "t=x"):
        with pytest.raises(ConfigError, match="expected TAG=VALUE"):
            farm.parse_where([bad])


def test_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(farm.ADDRESS_ENV, raising=False)
    assert farm.coordinator_address("lab.example") == "lab.example:20408"
    assert farm.coordinator_address("127.0.0.1:5000") == "127.0.0.1:5000"
    with pytest.raises(ConfigError, match=r"pass --farm HOST\[:PORT\].*LG_COORDINATOR"):
        farm.coordinator_address(None)
    monkeypatch.setenv(farm.ADDRESS_ENV, "10.0.0.2:7000")
    assert farm.coordinator_address(None) == "10.0.0.2:7000"


def _place(acquired: str | None, **tags: str) -> farm.Place:
    return farm.Place("pi5-lab-3", tags, acquired, None, "ssh://pi@10.0.0.3:22")


def test_stale_holder_is_a_dead_edgeship_process_on_this_host() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, me = socket.gethostname(), farm.holder_name()
    user = me.split("/", 1)[1].rsplit(".edgeship-", 1)[0]
    assert me.startswith(f"{host}/") and me.endswith(".edgeship-" + str(os.getpid()))
    assert _place(f"{host}/{user}.edgeship-{dead.pid}").stale_holder() == dead.pid
    assert _place(me).stale_holder() is None  # alive
    assert _place(f"other-host/{user}.edgeship-{dead.pid}").stale_holder() is None  # cannot tell from here
    assert _place(f"{host}/{user}").stale_holder() is None  # labgrid-client, not edgeship
    assert _place(None).stale_holder() is None


def test_matches_tags_and_name() -> None:
    p = _place(None, target="raspberry-pi-5", room="b2")
    assert p.matches({"target": "raspberry-pi-5"}) and p.matches({"name": "pi5-lab-3"}) and p.matches({})
    assert not p.matches({"target": "raspberry-pi-5", "room": "a1"})


def test_target_tag_picks_the_profile() -> None:
    base = RunConfig(progress=False)
    cfg = farm._place_config(_place(None, target="raspberry-pi-5"), base)
    assert cfg.power_target == "raspberry-pi-5" and cfg.threads == 4
    assert farm._place_config(_place(None, target="raspberry-pi-5"), RunConfig(threads=1)).threads == 1
    assert farm._place_config(_place(None, target="our-own-jig"), base) == base  # not an edgeship target: as given


def test_without_labgrid_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "labgrid.remote.client", None)
    monkeypatch.setitem(sys.modules, "labgrid.remote", None)
    with pytest.raises(RuntimeMissingError, match=r"pip install 'edgeship\[farm\]'"):
        farm.Coordinator("127.0.0.1:1")


def test_cli_option_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    assert main(["profile", str(f), str(f), "--no-history"]) == 2
    assert "several bundles in one profile run need --farm" in capsys.readouterr().err
    assert main(["profile", str(f), "--where", "target=x", "--no-history"]) == 2
    assert "add --farm HOST[:PORT]" in capsys.readouterr().err
    assert main(["profile", str(f), "--farm", "127.0.0.1:1", "--device", "ssh://a@b", "--no-history"]) == 2
    assert "leave out --device" in capsys.readouterr().err
    assert main(["profile", str(f), "--farm", "127.0.0.1:1", "--count", "0", "--no-history"]) == 2
    assert "need a count >= 1" in capsys.readouterr().err
