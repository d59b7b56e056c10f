#!/usr/bin/env bash
# Sets up parallm from the project's own files on a fresh Debian/Ubuntu machine (or macOS) that has
# only python3: apt packages first (as root, or with sudo), then uv, then the locked environment.
#   bash scripts/bootstrap.sh            # runtime + test extras into .venv
# Idempotent and quiet on a machine that already has everything.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=""
if command -v apt-get >/dev/null 2>&1; then
  # python3-venv/pip: Debian splits them out of python3. libopenblas0-pthread: a second source of
  # an optimized BLAS (PyPI's cmeel-openblas is the first) for MLX's CPU backend.
  for p in python3-venv python3-pip libopenblas0-pthread ca-certificates; do
    dpkg -s "$p" >/dev/null 2>&1 || need_apt="$need_apt $p"
  done
fi
if [ -n "$need_apt" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null 2>&1; then
    echo "bootstrap: apt-get install$need_apt" >&2
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need_apt >/dev/null
  else
    echo "bootstrap: missing apt packages ($need_apt) and no root; continuing" >&2
  fi
fi

UV=${UV:-}
if [ -z "$UV" ]; then
  if command -v uv >/dev/null 2>&1; then UV=$(command -v uv)
  else
    # uv goes into a small tool venv of our own, so nothing is installed into the system python.
    if [ ! -x .tools/bin/uv ]; then
      python3 -m venv .tools
      .tools/bin/python -m pip install -q --disable-pip-version-check "uv>=0.5"
    fi
    UV=$PWD/.tools/bin/uv
  fi
fi
EXTRAS=${PARALLM_EXTRAS:-"--extra test"}
# --frozen: install exactly uv.lock; CI fails if pyproject.toml and uv.lock disagree (uv lock --check).
"$UV" lock --check -q 2>/dev/null || { echo "bootstrap: uv.lock is out of date with pyproject.toml; run 'uv lock'" >&2; exit 1; }
"$UV" sync --frozen -q $EXTRAS
