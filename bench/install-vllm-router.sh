#!/bin/sh
# Installs vllm-router (the PyPI wheel), the router steer-bench-router compares Steer with, into
# a venv in the cache outside the repo: ${STEER_CACHE:-/var/cache/steer}/vllm-router-<version>/.
# A quick no-op when already installed. Prints the vllm-router executable's path, last.
set -eu
VERSION=0.1.17
CACHE="${STEER_CACHE:-/var/cache/steer}"
VENV="$CACHE/vllm-router-$VERSION"
BIN="$VENV/bin/vllm-router"
# Written last: an interrupted install has no marker and is redone from scratch.
DONE="$VENV/.installed"
if [ -f "$DONE" ]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$CACHE"
rm -rf "$VENV"
python3 -m venv "$VENV" >&2
"$VENV/bin/pip" install --disable-pip-version-check --quiet --only-binary :all: \
    "vllm-router==$VERSION" >&2
"$BIN" --help >/dev/null
touch "$DONE"
echo "$BIN"
