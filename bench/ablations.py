"""The paper's ablations at demo scale: train the demo model under one budget with
  (a) SCD's causal reference/target attention      configs/demo.py
  (b) full bidirectional attention                  configs/ablations/full_attention.py
  (c) no reference-pose injection                    configs/ablations/no_ref_pose.py
for each seed, evaluate every run on the held-out identities (evaluate.py, which also
scores the copy-reference and no-reference baselines), and print a markdown table of
mean and spread (half the range over seeds) with each run's training time.

    python bench/ablations.py [--seeds 0 1] [--steps N] [--videos 20] [--out runs/ablations]

Every run trains configs/demo.py's budget (its num_steps) unless --steps says otherwise.

A finished run is not retrained (train.py resumes at its last step), so the script can
be rerun to add seeds or rebuild the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from consist_jax import files  # noqa: E402

VARIANTS = {
    "causal (SCD)": "configs/demo.py",
    "full attention": "configs/ablations/full_attention.py",
    "no reference pose": "configs/ablations/no_ref_pose.py",
}
BASELINES = {"copy_reference": "copy reference", "no_reference": "no reference (SCD model, reference dropped)"}
METRICS = ("PSNR", "PSNR_masked", "SSIM", "SSIM_masked", "L1")


def run(cmd: list[str]) -> float:
    """Runs ``cmd`` (stdout passed through); its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def train_and_evaluate(name: str, config: str, seed: int, args) -> dict:
    workdir = os.path.join(args.out, f"{name.split()[0]}_s{seed}")
    out = os.path.join(workdir, "eval")
    timing = os.path.join(workdir, "train_seconds.json")
    overrides = [f"--config.seed={seed}"]
    if args.steps:
        overrides += [f"--config.train.num_steps={args.steps}", f"--config.optim.decay_steps={args.steps}"]
    if not os.path.exists(timing):
        seconds = run([sys.executable, "train.py", f"--config={config}", f"--workdir={workdir}", *overrides])
        files.write_json(timing, {"seconds": seconds})  # atomic: its presence marks a finished run
    if not os.path.exists(os.path.join(out, "metrics.json")):
        run([sys.executable, "evaluate.py", f"--checkpoint={workdir}", f"--out={out}", f"--videos={args.videos}",
             f"--frames={args.frames}", f"--seed={seed}", "--gifs=2"])
    with open(os.path.join(out, "metrics.json")) as f:
        methods = json.load(f)["methods"]
    with open(timing) as f:
        seconds = json.load(f)["seconds"]
    return {"seconds": seconds, "methods": {m: r["metrics"] for m, r in methods.items()}}


def cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    spread = (max(values) - min(values)) / 2
    return f"{np.mean(values):.3f} ± {spread:.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(results: dict, seeds: list[int]) -> str:
    lines = ["| method | " + " | ".join(METRICS) + " | train time (s) |", "|---" * (len(METRICS) + 2) + "|"]
    for name in VARIANTS:
        runs = [results[(name, s)] for s in seeds]
        values = [cell([r["methods"]["scd"].get(k) for r in runs]) for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(values) + f" | {cell([r['seconds'] for r in runs])} |")
    causal = [results[(next(iter(VARIANTS)), s)] for s in seeds]
    for key, label in BASELINES.items():
        values = [cell([r["methods"][key].get(k) for r in causal]) for k in METRICS]
        lines.append(f"| {label} | " + " | ".join(values) + " | - |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=0, help="training steps of every run (0: the demo's)")
    parser.add_argument("--videos", type=int, default=20, help="held-out test videos evaluated")
    parser.add_argument("--frames", type=int, default=8, help="target frames per test video")
    parser.add_argument("--out", default=os.path.join("runs", "ablations"))
    args = parser.parse_args()
    results = {}
    for seed in args.seeds:
        for name, config in VARIANTS.items():
            results[(name, seed)] = train_and_evaluate(name, config, seed, args)
    budget = f"{args.steps} steps" if args.steps else "the demo config's steps"
    print(f"\n{budget} per run, seeds {args.seeds}, {args.videos} held-out videos x {args.frames} frames; "
          "mean ± half-range over seeds; baselines from the causal runs' evaluations\n")
    print(table(results, args.seeds))


if __name__ == "__main__":
    main()
