#!/usr/bin/env bash
# Sets up .venv if needed, then runs the linter and the test suite (CPU only, simulated devices).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# Two workers, one file each at a time: much of the suite is single-threaded (compiles, process starts).
exec .venv/bin/pytest -n 2 --dist loadfile "$@"
