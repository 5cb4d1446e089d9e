"""Two-stage cached sampling vs the joint loop (reference recomputed at every step).

    python bench/sampler.py [--config demo] [--steps 25] [--frames 8] [--runs 3]

Same UNet (random weights: speed does not depend on them), steps, sampler and batched
guidance for both; runs alternate (cached, joint, cached, ...) on this machine. Prints
seconds per generated image (F = 1) and per video frame (F = --frames), the ratio
joint/cached, and the FLOP ratio from XLA's cost analysis of one reference pass and
one guided step of each form. Without guidance the ideal ratio on images is
2T / (T + 1); with guidance's two branches batched (what the sampler runs) the joint
loop also computes the reference for both branches, so 4T / (2T + 1).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from consist_jax.convert.build import build_model  # noqa: E402
from consist_jax.diffusion.samplers import make_sampler  # noqa: E402
from consist_jax.sampling.two_stage import (  # noqa: E402
    GuidanceConfig, cached_model_fn, denoise, extract_reference, guided, joint_model_fn)
from consist_jax.training.trainer import noise_schedule  # noqa: E402


def _flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", 0.0))


def bench(config, frames: int, steps: int, runs: int) -> dict:
    model, params, frozen = build_model(config.model, jax.random.key(0))
    h, w = config.data.pipeline.resolution
    f = model.codec.factor
    sampler = make_sampler("ddim", noise_schedule(config), steps, prediction_type=config.diffusion.prediction_type)
    guidance = GuidanceConfig(scale=3.0)
    rng = np.random.default_rng(0)
    reference = jnp.asarray(rng.uniform(-1, 1, (1, h, w, 3)), jnp.float32)
    ref_pose = jnp.asarray(rng.uniform(0, 1, (1, h, w, 3)), jnp.float32)
    poses = jnp.asarray(rng.uniform(0, 1, (1, frames, h, w, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((1, frames, h // f, w // f, model.codec.latent_channels)), jnp.float32)

    @jax.jit
    def cached(reference, ref_pose, poses, noise):
        ref = extract_reference(model, params, frozen, reference, ref_pose)
        return denoise(model, params, ref, sampler, noise, poses, guidance)

    @jax.jit
    def joint(reference, ref_pose, poses, noise):
        ref = extract_reference(model, params, frozen, reference, ref_pose)  # for its context only
        return denoise(model, params, ref, sampler, noise, poses, guidance, joint=True, reference_pose=ref_pose)

    args = (reference, ref_pose, poses, noise)
    times = {"cached": [], "joint": []}
    for fn in (cached, joint):
        jax.block_until_ready(fn(*args))  # compile
    for _ in range(runs):
        for name, fn in (("cached", cached), ("joint", joint)):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)

    # FLOPs: XLA does not multiply a loop body by its trip count, so count the parts.
    ref = extract_reference(model, params, frozen, reference, ref_pose)
    t = sampler.timesteps[0]
    stage1 = _flops(lambda r, p: extract_reference(model, params, frozen, r, p).cache, reference, ref_pose)
    cached_fn = functools.partial(cached_model_fn(model, params, ref), target_pose=poses)
    joint_fn = functools.partial(joint_model_fn(model, params, ref, ref_pose), target_pose=poses)
    cached_step = _flops(lambda x: guided(cached_fn, ref.context, guidance)(x, t), noise)
    joint_step = _flops(lambda x: guided(joint_fn, ref.context, guidance)(x, t), noise)
    cached_s, joint_s = statistics.median(times["cached"]), statistics.median(times["joint"])
    return dict(frames=frames, cached_s=cached_s, joint_s=joint_s, per_frame_cached=cached_s / frames,
                per_frame_joint=joint_s / frames, time_ratio=joint_s / cached_s,
                gflop_cached=(stage1 + steps * cached_step) / 1e9, gflop_joint=steps * joint_step / 1e9,
                flop_ratio=(steps * joint_step) / (stage1 + steps * cached_step))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="a configs/ module (fresh UNet, pixel codec)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    config = importlib.import_module(f"configs.{args.config}").get_config()
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}; "
          f"config {args.config}, {args.steps} steps, guidance batched")
    print("| F | cached s (per frame) | joint s (per frame) | joint/cached | GFLOP cached / joint | FLOP ratio |")
    print("|---|---|---|---|---|---|")
    for frames in (1, args.frames):
        r = bench(config, frames, args.steps, args.runs)
        print(f"| {frames} | {r['cached_s']:.3f} ({r['per_frame_cached']:.3f}) | {r['joint_s']:.3f} "
              f"({r['per_frame_joint']:.3f}) | {r['time_ratio']:.2f} | {r['gflop_cached']:.1f} / "
              f"{r['gflop_joint']:.1f} | {r['flop_ratio']:.2f} |", flush=True)
    t = args.steps
    print(f"ideal image FLOP ratio: 2T/(T+1) = {2 * t / (t + 1):.2f} without guidance, "
          f"4T/(2T+1) = {4 * t / (2 * t + 1):.2f} with both branches batched")


if __name__ == "__main__":
    main()
