#!/usr/bin/env bash
# Services the remote tests need, started by `./run.sh test` before pytest:
# - sshd's privilege-separation directory (the tests start their own sshd on 127.0.0.1 with throwaway keys);
# - the virtual Raspberry Pi's rootfs tarball. Building it from nothing takes ~4 minutes, so it is built in the
#   background while the other tests run; the arm64 fixture waits for it (a file lock), a cached one takes seconds.
# Tiers named in EDGESHIP_REQUIRE (.ci/run sets remote,arm64,slow,needs_export) must have their services: a missing
# one is an error here, with what to install. Tiers not required skip, and this script says which.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${EDGESHIP_VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python3
required() { [[ ",${EDGESHIP_REQUIRE:-}," == *",$1,"* ]]; }
missing=0
problem() {  # tier, message
  if required "$1"; then
    echo "test-services: ERROR: required tier '$1' (EDGESHIP_REQUIRE): $2" >&2
    missing=1
  else
    echo "test-services: $2: the $1 tests will skip (set EDGESHIP_REQUIRE=$1 to make that an error)" >&2
  fi
}
if [ "$(id -u)" != 0 ]; then
  problem remote "not root (the tests run sshd on 127.0.0.1)"
  problem arm64 "not root (the virtual Pi needs chroot and binfmt)"
  exit "$missing"
fi
if [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null; then
  mkdir -p /run/sshd
else
  problem remote "no OpenSSH server: apt-get install openssh-server openssh-client"
fi
if command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null; then
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/edgeship/virtual-pi"
  mkdir -p "$cache"
  echo "test-services: preparing the virtual Pi rootfs in the background (log: $cache/prepare.log)" >&2
  nohup "$PY" -m edgeship.virtual_pi prepare >"$cache/prepare.log" 2>&1 &
else
  problem arm64 "no qemu-user-static or debootstrap: apt-get install qemu-user-static binfmt-support debootstrap zstd"
fi
exit "$missing"
