#!/usr/bin/env bash
# Sets up .venv if needed, then runs the end-to-end demo: `bash scripts/demo.sh [--out runs/demo]`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/jaxsae demo "${@:---out=runs/demo}"
