"""SCD on the Wan DiT: one guided step, cached vs joint vs full attention.

    nice -n 19 python bench/wan_scd.py --flops            # Wan2.1-1.3B, 480p, 81 frames (compile only)
    python bench/wan_scd.py --time [--runs 5]             # a small DiT, timed on this machine

Forms of one guided denoising step (both guidance branches batched, B = 2):
  * cached: SCD's stage 2, the targets' queries against [cached reference K/V ; target K/V]
    (the reference ran once, in stage 1, for the whole video);
  * joint: the causal rule with the reference recomputed at every step;
  * full: full attention over [reference ; targets], the reference recomputed at every step
    (Wan-Animate's form; the ``full`` rule).
FLOPs come from XLA's cost analysis of the compiled step (``jax.jit(...).lower(...)
.compile()``) with ``jax.eval_shape`` parameters: nothing is allocated. The ideal ratios
count token work: every token costs the same in the projections and the feed-forward, and
a score costs the same everywhere, so with N_r reference and N_t target tokens

    cached / full = N_t (N_r + N_t) / (N_r + N_t)^2 = N_t / (N_r + N_t)      (attention)
                  = N_t / (N_r + N_t)                                          (per-token work)
    joint / full  = (N_r^2 + N_t (N_r + N_t)) / (N_r + N_t)^2 in the attention, 1 elsewhere.

At 480p and 81 frames N_r = 30 x 52 = 1560 (one latent frame) and N_t = 21 N_r, so the
ideal cached / full is 21 / 22 = 0.955: a video DiT's reference is one frame among 22,
unlike the UNet's, where it is half of every image pair.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from consist_jax.models.self_attention import CACHE_COLLECTION, AttentionConfig  # noqa: E402
from consist_jax.models.wan_scd import WanSCD, WanSCDConfig, init_wan_scd_params  # noqa: E402
from consist_jax.models.wan_transformer import WanTransformerConfig  # noqa: E402

FORMS = ("cached", "joint", "full")
TEXT_TOKENS = 512  # Wan's text length
BATCH = 2  # both guidance branches


def scd_config(transformer: WanTransformerConfig, form: str) -> WanSCDConfig:
    rule = "full" if form == "full" else "causal"
    return WanSCDConfig(transformer, attention=AttentionConfig(rule=rule), pose_channels=16)


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def step_function(transformer: WanTransformerConfig, form: str):
    """(params, cache, targets, t, context, reference, reference_pose, target_pose) -> prediction."""
    model = WanSCD(scd_config(transformer, form))

    def step(params, cache, targets, t, context, reference, reference_pose, target_pose):
        if form == "cached":
            return model.apply({"params": params, CACHE_COLLECTION: cache}, targets, t, context,
                               target_pose=target_pose, use_reference_cache=True)
        return model.apply({"params": params}, targets, t, context, reference=reference,
                           reference_pose=reference_pose, target_pose=target_pose)

    return step


def extract_function(transformer: WanTransformerConfig):
    """Stage 1: (params, reference, context, reference_pose) -> the cache."""
    model = WanSCD(scd_config(transformer, "cached"))

    def extract(params, reference, context, reference_pose):
        _, cache = model.apply({"params": params}, reference, None, context, reference_pose,
                               method="extract_reference", mutable=[CACHE_COLLECTION])
        return cache[CACHE_COLLECTION]

    return extract


def argument_specs(transformer: WanTransformerConfig, frames: int, height: int, width: int):
    """Shapes of every argument of a step (params and cache from eval_shape: no allocation)."""
    c = transformer
    config = scd_config(c, "cached")
    params = jax.eval_shape(lambda: init_wan_scd_params(config, jax.random.key(0), 1, (height, width)))
    reference = spec((BATCH, height, width, c.in_channels))
    reference_pose = spec((BATCH, height, width, config.pose_channels))
    context = spec((BATCH, TEXT_TOKENS, c.text_dim))
    cache = jax.eval_shape(extract_function(c), params, reference, context, reference_pose)
    return dict(params=params, cache=cache, targets=spec((BATCH, frames, height, width, c.in_channels)),
                t=spec((BATCH,)), context=context, reference=reference, reference_pose=reference_pose,
                target_pose=spec((BATCH, frames, height, width, config.pose_channels)))


def compiled_step(transformer, form, args):
    return jax.jit(step_function(transformer, form)).lower(*args.values()).compile()


def flops_of(compiled) -> float:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis.get("flops", 0.0))


def ideal_ratios(n_ref: int, n_tgt: int) -> dict:
    """Token-work ratios to the full form (module docstring): {form: (attention, per-token)}."""
    full = (n_ref + n_tgt) ** 2
    return {"cached": (n_tgt * (n_ref + n_tgt) / full, n_tgt / (n_ref + n_tgt)),
            "joint": ((n_ref ** 2 + n_tgt * (n_ref + n_tgt)) / full, 1.0), "full": (1.0, 1.0)}


def report_flops(transformer, frames, height, width):
    args = argument_specs(transformer, frames, height, width)
    tokens_per_frame = (height // transformer.patch_size[1]) * (width // transformer.patch_size[2])
    ideal = ideal_ratios(tokens_per_frame, frames * tokens_per_frame)
    flops = {}
    for form in FORMS:
        start = time.perf_counter()
        flops[form] = flops_of(compiled_step(transformer, form, args))
        print(f"  compiled {form} in {time.perf_counter() - start:.0f} s", flush=True)
    extract = jax.jit(extract_function(transformer)).lower(
        args["params"], args["reference"], args["context"], args["reference_pose"]).compile()
    print(f"tokens: reference {tokens_per_frame}, targets {frames * tokens_per_frame} "
          f"({frames} latent frames of {height}x{width}); batch {BATCH} (both guidance branches)")
    print(f"stage 1 (once per video): {flops_of(extract) / 1e12:.4g} TFLOP")
    print("| form | TFLOP / guided step | / full | ideal (attention, per-token work) |")
    print("|---|---|---|---|")
    for form in FORMS:
        a, t = ideal[form]
        print(f"| {form} | {flops[form] / 1e12:.4g} | {flops[form] / flops['full']:.4f} | {a:.4f}, {t:.4f} |")


def report_time(transformer, frames, height, width, runs):
    args = argument_specs(transformer, frames, height, width)
    draw = np.random.default_rng(0)
    values = {name: jax.tree_util.tree_map(lambda s: jnp.asarray(0.1 * draw.standard_normal(s.shape), s.dtype), tree)
              for name, tree in args.items()}  # (a dict comprehension keeps the argument order)
    compiled = {form: compiled_step(transformer, form, args) for form in FORMS}
    times = {form: [] for form in FORMS}
    for form in FORMS:  # warm up
        jax.block_until_ready(compiled[form](*values.values()))
    for _ in range(runs):  # alternate the forms, so a busy moment of the machine hits each alike
        for form in FORMS:
            start = time.perf_counter()
            jax.block_until_ready(compiled[form](*values.values()))
            times[form].append(time.perf_counter() - start)
    print(f"{transformer.num_layers} layers, {transformer.num_attention_heads} x {transformer.attention_head_dim} "
          f"heads, {frames} latent frames of {height}x{width}, batch {BATCH}; {jax.devices()[0]}")
    print("| form | median s / guided step | / full |")
    print("|---|---|---|")
    full = statistics.median(times["full"])
    for form in FORMS:
        median = statistics.median(times[form])
        print(f"| {form} | {median:.4f} | {median / full:.3f} |")


SMALL = functools.partial(WanTransformerConfig, num_attention_heads=4, attention_head_dim=32, in_channels=16,
                          out_channels=16, text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", action="store_true", help="XLA FLOPs of Wan2.1-1.3B at 480p, 81 frames")
    parser.add_argument("--time", action="store_true", help="time a small DiT on this machine")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.flops:
        report_flops(WanTransformerConfig.wan21_t2v_1_3b(), frames=21, height=60, width=104)
    if args.time:
        report_time(SMALL(), frames=5, height=32, width=32, runs=args.runs)
    if not (args.flops or args.time):
        parser.error("choose --flops and/or --time")


if __name__ == "__main__":
    main()
