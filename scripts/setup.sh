#!/usr/bin/env bash
# Creates or updates .venv with everything the demo and the tests need.
# A no-op when pyproject.toml and this script are unchanged since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp=.venv/.jaxsae-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setting up .venv (first run: a few minutes, about 2.6 GB)" >&2
python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" torch==2.13.0            # first, so nothing pulls a CUDA build
"${pip[@]}" -e ".[torch,dev,peers]"
"${pip[@]}" --no-deps dictionary-learning==0.1.0
echo "$want" >"$stamp"
