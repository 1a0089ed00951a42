#!/usr/bin/env bash
# Creates .venv if absent and installs the exact lock (the core and every extra) and the package into it.
# PYTHON picks the interpreter: python3.11 (default), python3.12 or python3.13.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# The package itself (the `autorad` command), its dependencies being the lock's.
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
