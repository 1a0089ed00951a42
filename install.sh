#!/usr/bin/env bash
# Creates .venv (Python 3.11) if absent and installs the pinned requirements into it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
# Only CLIP's BPE vocabulary file is used from open-clip-torch; its dependencies would pull torchvision and a CUDA torch.
.venv/bin/python -m pip install --quiet --no-deps open-clip-torch==3.3.0
