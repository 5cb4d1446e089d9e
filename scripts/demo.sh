#!/usr/bin/env bash
# The main job: install, train the demo config on synthetic people (CPU), then sample
# held-out identities and score them against the copy-reference and no-reference baselines.
# Outputs: runs/demo (checkpoints, TensorBoard), outputs/demo (GIFs, metrics.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
.venv/bin/python train.py --config=configs/demo.py --workdir=runs/demo "$@"
.venv/bin/python evaluate.py --checkpoint=runs/demo --out=outputs/demo --videos=20 --frames=8
