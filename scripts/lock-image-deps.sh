#!/usr/bin/env bash
# Regenerate deploy/requirements.lock: the container image's dependencies, pinned with hashes.
#
#   scripts/lock-image-deps.sh
#
# The image installs exactly these (pip --require-hashes), then the package itself with
# --no-deps, so a rebuild months later gets the same bytes, and a tampered wheel fails the
# build. Run it after changing [project].dependencies in pyproject.toml; tests/test_deploy.py
# fails while the lock and pyproject disagree. Uses pip-tools in a throw-away venv.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q pip-tools
"$tools/venv/bin/pip-compile" -q --generate-hashes --strip-extras --allow-unsafe \
    --no-header --no-emit-index-url --no-emit-find-links --output-file deploy/requirements.lock pyproject.toml
{ echo "# The container image's dependencies, pinned with hashes (scripts/lock-image-deps.sh)."
  echo "# Regenerate after changing [project].dependencies in pyproject.toml."
  cat deploy/requirements.lock; } > deploy/requirements.lock.new
mv deploy/requirements.lock.new deploy/requirements.lock
echo "wrote deploy/requirements.lock" >&2
