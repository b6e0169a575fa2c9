"""Device URLs and fleet inventories: pure parsing, no server and no bundle (so no remote/needs_export marker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.errors import ConfigError, UnknownKeyError
from edgeship.profiling.remote import (
    ConnectOptions,
    DeviceURL,
    SshOptions,
    load_inventory,
    options_for,
    profile_fleet,
    transport_for,
)


@pytest.mark.parametrize(("text", "message"), [
    ('[[device]]\nurl = "ssh://a"\nport = 3\n', "unknown key"),
    ('[[device]]\nname = "x"\n', "needs url"),
    ("devices = 3\n", r"\[\[device\]\]"),
    ('[[device]]\nurl = "ssh://pi:hunter2@a"\n', "passwords in device URLs are refused"),
    ('[[device]]\nurl = "ssh://a"\ntarget = "raspbery-pi-5"\n', "Did you mean 'raspberry-pi-5'"),
    ("[[device]\n", "not valid TOML"),
    ('[[device]]\nurl = "ssh://a"\nidentity = 3\n', "option identity = 3: expected str"),
    ('[[device]]\nurl = "ssh://a"\nruntime = "adb-natve"\n', "unknown device runtime 'adb-natve'"),
    ("device = [1]\n", "device #1 must be a \\[\\[device\\]\\] table, got int"),
])
def test_bad_inventory(tmp_path: Path, text: str, message: str) -> None:
    inv = tmp_path / "inv.toml"
    inv.write_text(text)
    with pytest.raises((ConfigError, UnknownKeyError), match=message) as e:
        load_inventory(inv)
    assert "hunter2" not in str(e.value)


def test_inventory_entries_carry_their_transports_options(tmp_path: Path) -> None:
    inv = tmp_path / "inv.toml"
    inv.write_text('[[device]]\nurl = "ssh://pi@a"\nidentity = "~/.ssh/pi"\naccept_new_host_key = true\n'
                   'connect_timeout = 5\nruntime = "python-venv"\n')
    (e,) = load_inventory(inv)
    assert e.runtime == "python-venv" and dict(e.options) == {"identity": "~/.ssh/pi", "accept_new_host_key": True,
                                                               "connect_timeout": 5}
    opts = options_for("ssh", e.options)
    assert isinstance(opts, SshOptions) and opts.identity == "~/.ssh/pi" and opts.connect_timeout == 5
    with pytest.raises(ConfigError, match="unknown ssh:// option.*port; valid: accept_new_host_key"):
        options_for("ssh", {"port": 22})


def test_bad_device_urls(tmp_path: Path) -> None:
    with pytest.raises(UnknownKeyError, match="unknown device transport scheme 'sssh'. Did you mean 'ssh'"):
        transport_for(DeviceURL.parse("sssh://a"), ConnectOptions())
    with pytest.raises(ConfigError, match="passwords in device URLs are refused") as e:
        DeviceURL.parse("ssh://pi:hunter2@host")
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="listed twice"):
        profile_fleet(tmp_path, devices=["ssh://a", "ssh://a"])
    with pytest.raises(ConfigError, match="no device"):
        profile_fleet(tmp_path, devices=[])
