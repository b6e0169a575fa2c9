from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.errors import ConfigError, UnknownKeyError
from edgeship.targets import get_profile, list_profiles, load_profile_file
from edgeship.targets.schema import PROFILE_DIR

REQUIRED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "pixel-8", "galaxy-s24", "x86-64-laptop"}


def test_builtin_profiles_load_and_are_complete() -> None:
    names = {p.name for p in list_profiles()}
    assert REQUIRED <= names
    for p in list_profiles():
        assert p.source.strip(), p.name
        assert p.cores >= 1 and 1 <= p.threads <= p.cores
        assert p.peak_int8_gops > p.peak_fp32_gflops > 0
        assert p.formats and p.recipes
        assert 0 < p.min_mean_cosine("fp32") <= 1


def test_snapdragon_profile_routes_npu_through_qnn() -> None:
    s24 = get_profile("galaxy-s24")
    assert [r.backend for r in s24.preferred_backends("pte")] == ["qnn"]
    assert not any(r.installable_here for r in s24.preferred_backends("pte"))


def test_unknown_target_suggests_closest() -> None:
    with pytest.raises(UnknownKeyError) as e:
        get_profile("raspbery-pi-5")
    assert "Did you mean 'raspberry-pi-5'" in str(e.value)


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "custom.toml"
    p.write_text(text)
    return p


def test_profile_file_errors_name_the_key(tmp_path: Path) -> None:
    base = (PROFILE_DIR / "raspberry-pi-5.toml").read_text()
    ok = load_profile_file(_write(tmp_path, base.replace('name = "raspberry-pi-5"', 'name = "my-pi"')))
    assert ok.name == "my-pi"
    with pytest.raises(ConfigError, match="unknown key"):
        load_profile_file(_write(tmp_path, base + '\nsurprise = 1\n'))
    with pytest.raises(ConfigError, match="threads"):
        load_profile_file(_write(tmp_path, base.replace("threads = 4", "threads = 64")))
    with pytest.raises(ConfigError, match="unknown recipe 'int3'"):
        load_profile_file(_write(tmp_path, base.replace('"int8-dynamic", "fp32"', '"int3", "fp32"')))
    with pytest.raises(ConfigError, match="must be float"):
        load_profile_file(_write(tmp_path, base.replace("ram_gb = 8", 'ram_gb = "eight"')))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile_file(_write(tmp_path, "name = "))
    with pytest.raises(ConfigError, match="schema_version 2"):
        load_profile_file(_write(tmp_path, base.replace("schema_version = 1", "schema_version = 2")))
