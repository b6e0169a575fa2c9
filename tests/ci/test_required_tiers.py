"""EDGESHIP_REQUIRE: a skipped test of a required tier fails the run; elsewhere it skips and says so.

Runs pytest in a subprocess on a probe file next to a copy of the real tests/conftest.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import pytest

@pytest.mark.remote
def test_needs_a_service(unavailable):
    unavailable("remote", "needs OpenSSH: apt-get install openssh-server")

@pytest.mark.arm64
def test_skips_itself():
    pytest.skip("no qemu here")

@pytest.mark.farm
def test_needs_labgrid(unavailable):
    unavailable("farm", "needs labgrid: pip install 'edgeship[farm]'")

def test_plain():
    pass
'''


def _run(tmp_path: Path, require: str | None, probe: str = PROBE, *,
         plain: bool = False) -> subprocess.CompletedProcess[str]:
    d = tmp_path / "probe"
    d.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).parents[1] / "conftest.py", d / "conftest.py")
    (d / "test_probe.py").write_text(probe)
    if plain:  # another file whose test passes, as in a real run
        (d / "test_plain.py").write_text("def test_plain():\n    pass\n")
    (d / "pytest.ini").write_text("[pytest]\nmarkers =\n    remote: r\n    arm64: a\n    slow: s\n    needs_export: e\n"
                                  "    farm: f\n")
    env = {k: v for k, v in os.environ.items() if k != "EDGESHIP_REQUIRE"}
    if require is not None:
        env["EDGESHIP_REQUIRE"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(d)], cwd=d, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_local_run_skips_and_says_so(tmp_path: Path) -> None:
    r = _run(tmp_path, None)
    assert r.returncode == 0, r.stdout
    assert "3 skipped" in r.stdout and "skipped on this machine; CI sets EDGESHIP_REQUIRE" in r.stdout


def test_required_tier_fails_with_the_install_hint(tmp_path: Path) -> None:
    r = _run(tmp_path, "remote,arm64")
    assert r.returncode == 1, r.stdout
    assert "required tier 'remote' (EDGESHIP_REQUIRE) cannot run: needs OpenSSH: apt-get install openssh-server" \
        in r.stdout
    assert "FAILED (skipped in required tier arm64): test_probe.py::test_skips_itself: no qemu here" in r.stdout


def test_farm_is_a_tier(tmp_path: Path) -> None:
    r = _run(tmp_path, "farm")
    assert r.returncode == 1, r.stdout
    assert "required tier 'farm' (EDGESHIP_REQUIRE) cannot run: needs labgrid" in r.stdout


MODULE_SKIP = '''
import pytest

pytest.importorskip("edgeship_no_such_module_for_the_probe")


def test_never_collected():
    pass
'''


def test_a_module_skipped_at_collection_fails_a_required_export_tier(tmp_path: Path) -> None:
    """A module-level importorskip skips before the file's markers exist; it counts as needs_export."""
    r = _run(tmp_path, "needs_export", MODULE_SKIP, plain=True)
    assert r.returncode == 1, r.stdout
    assert "FAILED (skipped in required tier needs_export): test_probe.py: could not import " \
           "'edgeship_no_such_module_for_the_probe'" in r.stdout
    r = _run(tmp_path, None, MODULE_SKIP, plain=True)
    assert r.returncode == 0, r.stdout
    assert "skipped on this machine; CI sets EDGESHIP_REQUIRE" in r.stdout


def test_ci_requires_every_tier() -> None:
    """.ci/run's default EDGESHIP_REQUIRE names every tier tests/conftest.py knows, so none can skip in CI."""
    import re

    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    default = re.search(r'EDGESHIP_REQUIRE="\$\{EDGESHIP_REQUIRE:-([a-z_,0-9]+)\}"', ci)
    assert default is not None
    conftest = (Path(__file__).parents[1] / "conftest.py").read_text()
    tiers = re.search(r"_TIERS = \(([^)]*)\)", conftest)
    assert tiers is not None
    assert set(re.findall(r'"(\w+)"', tiers.group(1))) == set(default.group(1).split(","))


def test_only_the_required_tiers_count(tmp_path: Path) -> None:
    r = _run(tmp_path, "slow")
    assert r.returncode == 0, r.stdout


def _services(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess[str]:
    """scripts/test-services.sh on a PATH without qemu or debootstrap (only the few tools the script itself uses)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("bash", "id", "dirname", "mkdir", "ssh-keygen"):
        if (found := shutil.which(tool)) and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), **({"EDGESHIP_REQUIRE": require} if require else {})}
    script = Path(__file__).parents[2] / "scripts" / "test-services.sh"
    return subprocess.run([str(bin_dir / "bash"), str(script)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_services_script_fails_a_required_tier_and_names_the_packages(tmp_path: Path) -> None:
    r = _services(tmp_path, "remote,arm64")
    assert r.returncode == 1
    assert "required tier 'arm64'" in r.stderr and "apt-get install qemu-user-static" in r.stderr


def test_services_script_lets_a_local_run_skip_saying_so(tmp_path: Path) -> None:
    r = _services(tmp_path, None)
    assert r.returncode == 0
    assert "the arm64 tests will skip" in r.stderr
