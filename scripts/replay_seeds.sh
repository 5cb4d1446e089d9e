#!/usr/bin/env bash
# Replays the fast, randomly seeded tests over N fresh seeds and prints every failing seed
# with its failed tests; exits non-zero if any seed failed. Replay a printed seed with
#   CONSIST_TEST_SEED=<seed> pytest <test id>
# Usage: bash scripts/replay_seeds.sh N [pytest args...]
#   With no pytest args: the seeded tests (`-m seeded`) of the fast test files below.
#   SEEDS_PER_RUN=k packs k seeds into each pytest process (CONSIST_TEST_SEEDS; the tests
#   are parametrized over them), sharing the ~20 s of imports and the compiles; default 1
#   (one process per seed, CONSIST_TEST_SEED).
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: scripts/replay_seeds.sh N [pytest args...]}
shift
PER_RUN=${SEEDS_PER_RUN:-1}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ $# -eq 0 ]; then
  set -- -m seeded tests/test_schedule.py tests/test_samplers.py tests/test_guidance.py \
    tests/test_eval_metrics.py tests/test_flow.py tests/test_attention.py tests/test_attention_kernels.py \
    tests/test_poses.py tests/test_poses_io.py tests/test_poses_align.py tests/test_poses_sequence.py
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed_seeds=()
done_seeds=0
while [ "$done_seeds" -lt "$N" ]; do
  seeds=()
  while [ "${#seeds[@]}" -lt "$PER_RUN" ] && [ $((done_seeds + ${#seeds[@]})) -lt "$N" ]; do
    seeds+=($(( $(od -An -N4 -tu4 /dev/urandom) % 2147483648 )))
  done
  done_seeds=$((done_seeds + ${#seeds[@]}))
  if [ "${#seeds[@]}" -eq 1 ]; then
    CONSIST_TEST_SEED=${seeds[0]} "$PY" -m pytest -q "$@" >"$log" 2>&1
  else
    CONSIST_TEST_SEEDS=$(IFS=,; echo "${seeds[*]}") "$PY" -m pytest -q "$@" >"$log" 2>&1
  fi
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "[$done_seeds/$N] seed(s) ${seeds[*]}: passed"
    continue
  fi
  echo "[$done_seeds/$N] seed(s) ${seeds[*]}: FAILED (pytest exit $rc)"
  grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
  [ "$rc" -eq 5 ] && echo "    no tests collected: check the pytest arguments"
  if [ "${#seeds[@]}" -eq 1 ]; then
    failed_seeds+=("${seeds[0]}")
  else  # the failing seeds are in the failed tests' ids
    for seed in "${seeds[@]}"; do
      grep -qE "^(FAILED|ERROR) .*seed$seed\b" "$log" && failed_seeds+=("$seed")
    done
    grep -qE '^(FAILED|ERROR) ' "$log" || failed_seeds+=("${seeds[@]}")  # collection / setup error
  fi
done
echo "${#failed_seeds[@]} of $N seeds failed${failed_seeds[*]:+: ${failed_seeds[*]}}"
[ "${#failed_seeds[@]}" -eq 0 ]
