"""Two-stage cached sampling vs the joint loop (reference recomputed at every step).

    python bench/sampler.py [--config demo] [--steps 25] [--frames 8] [--runs 3]
    python bench/sampler.py --config sd15_image --steps 4 --frames 1 --runs 2   # SD-1.5 size

Same UNet (random weights: speed does not depend on them), steps, sampler and batched
guidance for both. A config whose VAE / image encoder come from pretrained folders
(configs/sd15_*.py) is built from its architecture alone (``compile_report.abstract_model``:
SD-1.5's UNet, VAE and CLIP image encoder) with random weights, and says so. Runs
alternate (cached, joint, cached, ...) on this machine. Prints seconds per generated
image (F = 1) and per video frame (F = --frames), the ratio joint/cached, and the FLOP
ratio from XLA's cost analysis of the parts (it counts a loop body once): the reference
encode E (VAE + image encoder, which both forms run), the cached form's reference pass,
and one guided step of each form. In UNet image passes, with guidance's two branches
batched (what the sampler runs), the joint loop costs E + 4T and the cached one
E + 1 + 2T: without an encode (pixel codec) the ideal image ratio is 4T / (2T + 1)
(2T / (T + 1) without guidance); an expensive encode pulls it towards 1.
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
from consist_jax.diffusion.samplers import make_sampler  # noqa: E402
from consist_jax.diffusion.schedule import NoiseSchedule  # noqa: E402
from consist_jax import factory  # noqa: E402
from consist_jax.factory import build_model  # noqa: E402
from consist_jax.sampling.two_stage import (  # noqa: E402
    GuidanceConfig, cached_model_fn, denoise, extract_reference, guided, joint_model_fn)
from consist_jax.training.compile_report import abstract_model  # noqa: E402


def _flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", 0.0))


def bench_model(config):
    """(model, params, frozen) with random weights: as training builds it where no
    pretrained folder is needed, else from the architecture (N(0, 0.02) weights)."""
    try:
        factory.check_paths(config.model)
    except ValueError as missing:
        print(f"# {missing}: using the architecture with random weights")
        model, params, frozen = abstract_model(config.model)
        leaves, tree = jax.tree_util.tree_flatten((params, frozen))
        keys = jax.random.split(jax.random.key(0), len(leaves))
        params, frozen = jax.tree_util.tree_unflatten(
            tree, [0.02 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)])
        return model, params, frozen
    return build_model(config.model, jax.random.key(0))


def bench(config, frames: int, steps: int, runs: int) -> dict:
    model, params, frozen = bench_model(config)
    h, w = config.data.pipeline.resolution
    f = model.codec.factor
    schedule = NoiseSchedule.from_config(config.diffusion)
    sampler = make_sampler("ddim", schedule, steps, prediction_type=config.diffusion.prediction_type)
    guidance = GuidanceConfig(scale=3.0)
    rng = np.random.default_rng(0)
    reference = jnp.asarray(rng.uniform(-1, 1, (1, h, w, 3)), jnp.float32)
    ref_pose = jnp.asarray(rng.uniform(0, 1, (1, h, w, 3)), jnp.float32)
    poses = jnp.asarray(rng.uniform(0, 1, (1, frames, h, w, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((1, frames, h // f, w // f, model.codec.latent_channels)), jnp.float32)

    # The weights are arguments, not closed-over constants (SD-1.5's would be 4.8 GB of them).
    @jax.jit
    def cached(params, frozen, reference, ref_pose, poses, noise):
        ref = extract_reference(model, params, frozen, reference, ref_pose)
        return denoise(model, params, ref, sampler, noise, poses, guidance)

    @jax.jit
    def joint(params, frozen, reference, ref_pose, poses, noise):
        ref = extract_reference(model, params, frozen, reference, ref_pose)  # for its context only
        return denoise(model, params, ref, sampler, noise, poses, guidance, joint=True, reference_pose=ref_pose)

    args = (params, frozen, reference, ref_pose, poses, noise)
    times = {"cached": [], "joint": []}
    for fn in (cached, joint) if runs else ():
        jax.block_until_ready(fn(*args))  # compile
    for _ in range(runs):
        for name, fn in (("cached", cached), ("joint", joint)):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)

    # FLOPs: XLA does not multiply a loop body by its trip count, so count the parts.
    ref = jax.eval_shape(functools.partial(extract_reference, model), params, frozen, reference, ref_pose)
    t = sampler.timesteps[0]

    def reference_pass(params, frozen, r, p):
        return extract_reference(model, params, frozen, r, p).cache

    def cached_step(params, ref, x):
        model_fn = functools.partial(cached_model_fn(model, params, ref), target_pose=poses)
        return guided(model_fn, ref.context, guidance)(x, t)

    def joint_step(params, ref, x):
        model_fn = functools.partial(joint_model_fn(model, params, ref, ref_pose), target_pose=poses)
        return guided(model_fn, ref.context, guidance)(x, t)

    def encode(frozen, r):  # what both forms compute from the reference image: latents and context
        return model.encode(frozen, r), model.embed_reference(frozen, r)

    encode_flops = _flops(encode, frozen, reference)
    stage1 = _flops(reference_pass, params, frozen, reference, ref_pose)  # encode included
    cached_step = _flops(cached_step, params, ref, noise)
    joint_step = _flops(joint_step, params, ref, noise)
    cached_s, joint_s = (statistics.median(times[name]) if runs else float("nan") for name in ("cached", "joint"))
    return dict(frames=frames, cached_s=cached_s, joint_s=joint_s, per_frame_cached=cached_s / frames,
                per_frame_joint=joint_s / frames, time_ratio=joint_s / cached_s,
                gflop_cached=(stage1 + steps * cached_step) / 1e9, gflop_encode=encode_flops / 1e9,
                gflop_joint=(encode_flops + steps * joint_step) / 1e9,
                flop_ratio=(encode_flops + steps * joint_step) / (stage1 + steps * cached_step))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="a configs/ module")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each; 0: FLOPs only")
    parser.add_argument("--dtype", default="float32", help="the UNet's compute dtype (CPUs have no fast bf16)")
    parser.add_argument("--attention_impl", default=None, help="override model.unet.attention_impl")
    args = parser.parse_args()
    config = importlib.import_module(f"configs.{args.config}").get_config()
    config.model.unet.dtype = args.dtype
    config.model.unet.remat = False  # sampling takes no gradients
    if args.attention_impl:
        config.model.unet.attention_impl = args.attention_impl
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}; "
          f"config {args.config} ({config.model.unet.dtype}, attention_impl={config.model.unet.attention_impl}), "
          f"{args.steps} steps, guidance batched")
    print("| F | cached s (per frame) | joint s (per frame) | joint/cached | GFLOP cached / joint "
          "(reference encode in both) | FLOP ratio |")
    print("|---|---|---|---|---|---|")
    for frames in sorted({1, args.frames}):
        r = bench(config, frames, args.steps, args.runs)
        print(f"| {frames} | {r['cached_s']:.3f} ({r['per_frame_cached']:.3f}) | {r['joint_s']:.3f} "
              f"({r['per_frame_joint']:.3f}) | {r['time_ratio']:.2f} | {r['gflop_cached']:.1f} / "
              f"{r['gflop_joint']:.1f} ({r['gflop_encode']:.1f}) | {r['flop_ratio']:.2f} |", flush=True)
    t = args.steps
    print(f"ideal image FLOP ratio without an encode: 2T/(T+1) = {2 * t / (t + 1):.2f} without guidance, "
          f"4T/(2T+1) = {4 * t / (2 * t + 1):.2f} with both branches batched")


if __name__ == "__main__":
    main()
