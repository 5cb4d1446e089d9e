"""GroupNorm forward + backward: ours (``layers.group_norm``) vs autodiff of the grouped form vs PyTorch.

    python bench/group_norm.py [--shapes 4x32x32x64 4x16x16x128 4x8x8x256] [--groups 32] [--runs 30]

Each row times value-and-gradient (input, scale, bias) of sum(norm(x) * dy) at one NHWC
activation shape, float32: ours (per-channel sums first, the backward written out), the
grouped form (mean and variance as one reduction over (positions, channels of a group),
differentiated by JAX: what ``GroupNorm`` was before 2026-12-03) and torch.nn.GroupNorm
(NCHW, same values). The default shapes are the small UNet's of ``bench/train_step.py``.
Prints the median ms of each and ours / torch.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from bench.train_step import timed  # noqa: E402
from consist_jax.models.layers import group_norm  # noqa: E402

EPSILON = 1e-5


def grouped_form(x, scale, bias, num_groups, epsilon):
    """One reduction over (positions, channels of a group), differentiated by JAX."""
    grouped = x.reshape(x.shape[0], -1, num_groups, x.shape[-1] // num_groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(grouped - mean).mean(axis=(1, 3), keepdims=True)
    return ((grouped - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape) * scale + bias


def torch_step(x, scale, bias, d_out, groups):
    import torch

    channels = x.shape[-1]
    x_t = torch.tensor(np.moveaxis(x, -1, 1).copy(), requires_grad=True)
    d_out_t = torch.tensor(np.moveaxis(d_out, -1, 1).copy())
    norm = torch.nn.GroupNorm(groups, channels, eps=EPSILON)
    norm.weight.data, norm.bias.data = torch.tensor(scale), torch.tensor(bias)

    def step():
        x_t.grad = None
        norm.zero_grad(set_to_none=True)
        (norm(x_t) * d_out_t).sum().backward()

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["4x32x32x64", "4x16x16x128", "4x8x8x256"])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; forward + backward, float32, median of {args.runs}")
    print("| shape (NHWC) | ours (ms) | grouped form, autodiff (ms) | PyTorch (ms) | ours / PyTorch |")
    print("|---|---|---|---|---|")
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split("x"))
        rng = np.random.default_rng(0)
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
        d_out = rng.standard_normal(shape).astype(np.float32)
        scale, bias = (rng.standard_normal(shape[-1]).astype(np.float32) for _ in range(2))
        times = {}
        for name, norm in (("ours", group_norm), ("grouped", grouped_form)):
            grad = jax.jit(jax.grad(
                lambda x, s, b, norm=norm: jnp.sum(norm(x, s, b, args.groups, EPSILON) * d_out), argnums=(0, 1, 2)))
            times[name] = 1e3 * timed(lambda grad=grad: jax.block_until_ready(grad(x, scale, bias)), args.runs)
        times["torch"] = 1e3 * timed(torch_step(x, scale, bias, d_out, args.groups), args.runs)
        print(f"| {text} | {times['ours']:.2f} | {times['grouped']:.2f} | {times['torch']:.2f} | "
              f"{times['ours'] / times['torch']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
