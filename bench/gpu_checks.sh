#!/bin/bash
# The checks that need a GPU, in one go (CI has none): the GPU-only kernel tests, then the
# train-step comparison against diffusers-PyTorch and the attention bench at SD-1.5 size.
#     bash bench/gpu_checks.sh [LOG_DIR]        # logs: LOG_DIR/{tests,train_step,attention}.log
# Each stage has its own time limit, so one slow stage leaves the others' results.
set -o pipefail
logs=${1:-runs/gpu_checks}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS= XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"
timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider -k gpu tests/test_attention_kernels.py 2>&1 | tee "$logs/tests.log" | tail -n 15
timeout "${STEP_S:-420}" python3 bench/train_step.py --gpu --batch "${BATCH:-8}" --runs 10 2>&1 | tee "$logs/train_step.log" | grep -v "^W0000\|^I0000"
timeout "${ATTN_S:-150}" python3 bench/attention.py --gpu --latents ${ATTN_LATENTS:-64x64 96x96} 2>&1 | tee "$logs/attention.log" | grep -v "^W0000\|^I0000"
