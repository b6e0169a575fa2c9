"""Device URLs and fleet inventories: pure parsing, no server and no bundle (so no remote/needs_export marker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.errors import ConfigError, UnknownKeyError
from edgeship.profiling.remote import ConnectOptions, DeviceURL, load_inventory, profile_fleet, transport_for


@pytest.mark.parametrize(("text", "message"), [
    ('[[device]]\nurl = "ssh://a"\nport = 3\n', "unknown key"),
    ('[[device]]\nname = "x"\n', "needs url"),
    ("devices = 3\n", r"\[\[device\]\]"),
    ('[[device]]\nurl = "ssh://pi:hunter2@a"\n', "passwords in device URLs are refused"),
    ('[[device]]\nurl = "ssh://a"\ntarget = "raspbery-pi-5"\n', "Did you mean 'raspberry-pi-5'"),
    ("[[device]\n", "not valid TOML"),
])
def test_bad_inventory(tmp_path: Path, text: str, message: str) -> None:
    inv = tmp_path / "inv.toml"
    inv.write_text(text)
    with pytest.raises((ConfigError, UnknownKeyError), match=message) as e:
        load_inventory(inv)
    assert "hunter2" not in str(e.value)


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
