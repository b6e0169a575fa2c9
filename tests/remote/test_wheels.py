"""The device runtime's wheel selection (no network: the download itself runs in the remote tests)."""

from __future__ import annotations

from importlib import metadata

import pytest

from edgeship.errors import DeviceError
from edgeship.profiling.remote.wheels import Platform, runtime_requirements


def test_platform_tags_cover_every_manylinux_up_to_the_device_glibc() -> None:
    args = Platform(machine="aarch64", python="3.11", glibc="2.36").pip_args()
    plats = [args[i + 1] for i, a in enumerate(args) if a == "--platform"]
    # numpy 2.4 ships manylinux_2_27/2_28 aarch64 wheels only: missing tags would silently pick an old release.
    assert {"manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"} <= set(plats)
    assert "manylinux_2_37_aarch64" not in plats
    assert args[args.index("--python-version") + 1] == "3.11" and "--only-binary=:all:" in args
    with pytest.raises(DeviceError, match="no manylinux wheels"):
        Platform(machine="aarch64", python="3.11", glibc=None).pip_args()


def test_runtime_requirements_pin_the_host_versions_and_leave_out_torch() -> None:
    reqs = runtime_requirements()
    names = [r.split("==")[0] for r in reqs]
    assert "onnxruntime" in names and "numpy" in names and "psutil" in names
    assert not any(n in ("torch", "transformers", "executorch") for n in names)
    assert f"onnxruntime=={metadata.version('onnxruntime')}" in reqs
