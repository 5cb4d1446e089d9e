"""Forward time of our jitted UNet vs diffusers' PyTorch UNet, same weights and inputs.

    python bench/unet_vs_diffusers.py [--configs sd15 small] [--sizes 32x32 32x64] [--runs 5]

Both run fp32, batch 1, on this machine's CPU; runs alternate (ours, theirs, ours,
...) so a noisy machine slows both alike. Prints the median of each, the ratio
ours/theirs and the FLOPs of the forward (XLA's cost analysis of our program).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import UNet2DConditionModel

from consist_jax.convert.loading import state_dict_to_params
from consist_jax.convert.unet import NEW_WEIGHTS, unet_param_shapes
from consist_jax.models.unet import UNet, UNetConfig

CONFIGS = {
    "sd15": dict(  # Stable Diffusion 1.5's UNet
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,
        cross_attention_dim=768,
    ),
    "small": dict(
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=4,
        cross_attention_dim=256,
    ),
}


def build(name: str):
    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=64, **CONFIGS[name]).eval()
    config = UNetConfig.from_diffusers(dict(model.config), pose_block_out_channels=None)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = state_dict_to_params(state, unet_param_shapes(config), may_be_missing=NEW_WEIGHTS)
    return model, UNet(config), jax.tree_util.tree_map(jnp.asarray, params)


def bench(name: str, size: str, runs: int) -> dict:
    model, module, params = build(name)
    h, w = (int(s) for s in size.split("x"))
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, h, w, 4)).astype(np.float32)
    t = np.array([500])
    context = rng.standard_normal((1, 77, CONFIGS[name]["cross_attention_dim"])).astype(np.float32)
    forward = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    compiled = forward.lower(params, sample, t, context).compile()
    flops = compiled.cost_analysis()["flops"]
    torch_args = (torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context))

    def ours():
        compiled(params, sample, t, context).block_until_ready()

    def theirs():
        with torch.no_grad():
            model(torch_args[0], torch_args[1], encoder_hidden_states=torch_args[2])

    ours(), theirs()  # warm-up
    times = {"ours": [], "theirs": []}
    for _ in range(runs):
        for label, fn in (("ours", ours), ("theirs", theirs)):
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(config=name, size=size, flops=flops, **med, ratio=med["ours"] / med["theirs"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", default=["small", "sd15"])
    parser.add_argument("--sizes", nargs="+", default=["32x32", "32x64"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
          f"torch threads {torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}")
    print("| config | latents | GFLOP | ours (s) | diffusers (s) | ours/diffusers |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        for size in args.sizes:
            r = bench(name, size, args.runs)
            print(f"| {r['config']} | {r['size']} | {r['flops'] / 1e9:.0f} | {r['ours']:.3f} | "
                  f"{r['theirs']:.3f} | {r['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
