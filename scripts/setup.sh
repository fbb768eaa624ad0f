#!/usr/bin/env bash
# Creates or updates .venv with everything the demo and the tests need.
# JAXSAE_EXTRAS picks the extras (default torch,dev,peers; e.g. cuda,dev on a GPU node, tpu,dev on a TPU VM).
# A no-op when pyproject.toml, this script and the extras are unchanged since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${JAXSAE_EXTRAS:-torch,dev,peers}
# Headless Chromium + chromedriver for the report's browser test (tests/test_report.py): Debian packages.
case ",$extras," in *,dev,*)
  { command -v chromium && command -v chromedriver; } >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver >/dev/null
  } || echo "could not install chromium: tests/test_report.py's browser test will be skipped" >&2 ;;
esac
want=$( (cat pyproject.toml scripts/setup.sh; echo "$extras") | sha256sum | cut -c1-16)
stamp=.venv/.jaxsae-setup
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
echo "setting up .venv (first run: a few minutes, about 2.6 GB)" >&2
python3 -m venv .venv
pip() {  # quiet, minus the warnings this machine's pip configuration prints for every package
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "nor a directory" >&2)
}
pip --upgrade pip
case ",$extras," in *,torch,*|*,peers,*) pip torch==2.13.0 ;; esac  # first: no CUDA torch
pip -e ".[$extras]"
case ",$extras," in *,peers,*) pip --no-deps dictionary-learning==0.1.0 ;; esac
echo "$want" >"$stamp"
