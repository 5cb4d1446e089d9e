#!/usr/bin/env bash
# The main job: install, train the demo config on synthetic people (CPU), sample held-out
# identities and score them against the copy-reference and no-reference baselines, then
# check that sample.py reproduces one of the evaluated videos bit for bit.
# Outputs: runs/demo (checkpoints, TensorBoard), outputs/demo (metrics.json, examples.png: a
# grid of held-out people, metrics_curve.png: figure SSIM/PSNR against training step, GIFs, examples/).
set -euo pipefail
# A CPU demo: with the test extra installed (it carries libtpu for the ahead-of-time TPU
# compiles) JAX would otherwise probe for a TPU first and print libtpu's warnings.
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
# mimalloc in glibc's place for the three runs below: XLA:CPU allocates each step's temporaries
# anew, and mimalloc hands the same pages back (MIMALLOC_PURGE_DELAY=-1: it never returns them),
# 0.91x the step of glibc's malloc with freed memory kept (BENCHMARKS.md "Freed memory kept").
# Optional: where its wheel does not install, train.py keeps glibc's freed memory itself.
RUN=()
MALLOC="glibc's, freed memory kept (mimalloc's library did not install here)"
if .venv/bin/python -m pip install -q "cmeel-mimalloc>=3.4"; then
  lib=$(.venv/bin/python -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["purelib"], "cmeel.prefix", "lib", "libmimalloc.so.3"))')
  if [ -f "$lib" ]; then
    RUN=(env LD_PRELOAD="$lib" MIMALLOC_PURGE_DELAY=-1)
    MALLOC="mimalloc ($lib)"
  fi
fi
echo "malloc: $MALLOC"
"${RUN[@]}" .venv/bin/python train.py --config=configs/demo.py --workdir=runs/demo "$@"
FRAMES=8
"${RUN[@]}" .venv/bin/python evaluate.py --checkpoint=runs/demo --out=outputs/demo --videos=20 --frames=$FRAMES --seed=0 \
  --curve_videos=4
example=$(ls -d outputs/demo/examples/*/ | head -n 1)
"${RUN[@]}" .venv/bin/python sample.py --checkpoint=runs/demo --reference="$example/reference.png" \
  --reference_pose="$example/reference_pose.png" --poses="$example/poses" --out="$example/resampled" \
  --window=$FRAMES --overlap=0 --seed=0  # the run config's sampling steps and guidance, as evaluate.py
if diff -r "$example/generated" "$example/resampled" >/dev/null; then
  echo "sample.py reproduced $example bit for bit"
  echo "held-out people (reference | pose | generated | real): outputs/demo/examples.png"
  echo "metric curve (figure SSIM/PSNR against training step, baselines flat): outputs/demo/metrics_curve.png"
else
  echo "sample.py did NOT reproduce $example" >&2
  exit 1
fi
