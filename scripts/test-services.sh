#!/usr/bin/env bash
# Services the remote tests need, started by `./run.sh test` before pytest:
# - sshd's privilege-separation directory (the tests start their own sshd on 127.0.0.1 with throwaway keys);
# - the virtual Raspberry Pi's rootfs tarball. Building it from nothing takes ~4 minutes, so it is built in the
#   background while the other tests run; the arm64 fixture waits for it (a file lock), a cached one takes seconds.
# Without root or the apt packages (.ci/run installs them) this does nothing and those tests skip.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${EDGESHIP_VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python3
if [ "$(id -u)" != 0 ]; then
  echo "test-services: not root: the remote (sshd) and arm64 (virtual Pi) tests will skip" >&2
  exit 0
fi
mkdir -p /run/sshd
if command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgeship/virtual-pi"
  mkdir -p "$cache"
  echo "test-services: preparing the virtual Pi rootfs in the background (log: $cache/prepare.log)" >&2
  nohup "$PY" -m edgeship.virtual_pi prepare >"$cache/prepare.log" 2>&1 &
fi
exit 0
