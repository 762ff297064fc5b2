#!/usr/bin/env bash
# Install etcd v3 (Debian's etcd-server and etcd-client packages) for the fleet (docs/fleet.md)
# and its tests (tests/fleet/). Idempotent: when `etcd` and `etcdctl` are already on PATH (or in
# $ETCD_BIN_DIR) a run only confirms them and touches nothing.
#
#   scripts/install-etcd.sh            install (or confirm the install); prints the binaries' paths
#   scripts/install-etcd.sh --check    only confirm: exit 3 when not installed
#
# Env: ETCD_BIN_DIR   a folder holding etcd and etcdctl to use instead of PATH (e.g. an upstream
#                     release tarball unpacked by hand); nothing is installed when it has both.
#
# Installing needs root and apt-get (Debian/Ubuntu). Only apt talks to the network, and only to
# the configured mirrors. The packaged etcd.service is not enabled or started: the tests run
# their own members on loopback ports, and a real fleet's etcd is the operator's.
set -euo pipefail

say() { printf 'install-etcd: %s\n' "$*" >&2; }

find_bins() {
  if [ -n "${ETCD_BIN_DIR:-}" ] && [ -x "$ETCD_BIN_DIR/etcd" ] && [ -x "$ETCD_BIN_DIR/etcdctl" ]; then
    ETCD="$ETCD_BIN_DIR/etcd"; ETCDCTL="$ETCD_BIN_DIR/etcdctl"; return 0
  fi
  ETCD=$(command -v etcd 2>/dev/null || true)
  ETCDCTL=$(command -v etcdctl 2>/dev/null || true)
  [ -n "$ETCD" ] && [ -n "$ETCDCTL" ]
}

done_msg() {
  local version
  version=$("$ETCD" --version 2>/dev/null | sed -n 's/^etcd Version: //p' | head -n 1)
  say "$1: etcd ${version:-?}"
  printf 'ETCD=%s\nETCDCTL=%s\nVERSION=%s\n' "$ETCD" "$ETCDCTL" "${version:-unknown}"
}

if find_bins; then
  done_msg "already installed"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  say "etcd is not installed (no etcd and etcdctl on PATH)"
  exit 3
fi
command -v apt-get >/dev/null || { say "apt-get is needed (Debian's etcd-server); not found"; exit 2; }
if [ "$(id -u)" != 0 ]; then
  say "installing etcd-server needs root (run: sudo $0)"
  exit 2
fi

# One installer at a time (parallel test workers may all call this script).
exec 9>/tmp/.qwen-refresher-install-etcd.lock
flock 9
if find_bins; then
  done_msg "installed meanwhile"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d 101: do not start the packaged service while installing (no stray member on 2379).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 0755 "$policy"; made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
if ! apt-get install -y -q --no-install-recommends etcd-server etcd-client >&2; then
  say "apt-get install failed; refreshing the package lists once and retrying"
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends etcd-server etcd-client >&2
fi
find_bins || { say "etcd-server installed but etcd/etcdctl are not on PATH"; exit 1; }
done_msg "installed"
