"""Train-step speed: our jitted step vs a diffusers-PyTorch step of the same UNet.

    python bench/train_step.py [--config small] [--latent 32] [--batch 4] [--runs 5]
        [--attention_impls xla,xla_chunked] [--cpu_devices 1,2]
    python bench/train_step.py --gpu          # on a GPU: SD-1.5 at 512x512, bf16, SCD step, MFU

CPU mode: both sides do forward + backward + AdamW on the same UNet config, batch and
latent size (plain denoising MSE, no reference), alternating runs; ours once per
attention form in --attention_impls (the same model, so each row says what its form
buys) and per entry of --cpu_devices (the batch split over that many CPU devices);
prints the median step times, samples/s and each ratio ours/theirs. It also
times our SCD step (the reference beside each target: twice the images) with the last
form and prints its MFU against the peak given by --peak_tflops (XLA's cost analysis
for the FLOPs).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, ".")
from bench.unet_vs_diffusers import CONFIGS  # noqa: E402
from consist_jax.convert.loading import state_dict_to_params  # noqa: E402
from consist_jax.convert.unet import NEW_WEIGHTS, init_pose_encoder_params, unet_param_shapes  # noqa: E402
from consist_jax.models.scd import NullContext, PixelCodec, SCDModel  # noqa: E402
from consist_jax.models.unet import UNet, UNetConfig  # noqa: E402
from consist_jax.parallel.gradients import flat_mean_value_and_grad  # noqa: E402
from consist_jax.training.sharding import split_cpu_host  # noqa: E402


def timed(fn, runs):
    fn()  # warm-up (compile)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_step(name, batch, latent, context_len):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=latent, **CONFIGS[name]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 4, latent, latent)
    t = torch.randint(0, 1000, (batch,))
    ctx = torch.randn(batch, context_len, CONFIGS[name]["cross_attention_dim"])
    target = torch.randn_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x, t, encoder_hidden_states=ctx).sample, target)
        loss.backward()
        opt.step()

    return model, step


def our_plain_step(model, name, batch, latent, context_len, attention_impl="xla", cpu_devices=1):
    """Our step on diffusers' weights; with cpu_devices > 1 the batch is split over that
    many CPU devices (params replicated, gradients averaged as one vector; as the demo's
    ``mesh.cpu_devices`` and ``mesh.flat_gradients``)."""
    config = UNetConfig.from_diffusers(dict(model.config), pose_block_out_channels=None, attention_impl=attention_impl)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    mesh = Mesh(np.asarray(jax.devices()[:cpu_devices]), ("data",))
    replicated = NamedSharding(mesh, P())

    def put(a, spec=P()):
        return jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))

    params = jax.tree_util.tree_map(put, state_dict_to_params(
        state, unet_param_shapes(config), may_be_missing=NEW_WEIGHTS))
    unet = UNet(config)
    opt = optax.adamw(1e-5)
    rng = np.random.default_rng(0)
    x = put(rng.standard_normal((batch, latent, latent, 4)).astype(np.float32), P("data"))
    t = put(rng.integers(0, 1000, (batch,)), P("data"))
    ctx = put(rng.standard_normal((batch, context_len, config.cross_attention_dim)).astype(np.float32), P("data"))
    target = put(rng.standard_normal(x.shape).astype(np.float32), P("data"))

    def value_and_grad(params, inputs, _rng):
        x, t, ctx, target = inputs
        return jax.value_and_grad(lambda p: jnp.mean((unet.apply({"params": p}, x, t, ctx) - target) ** 2))(params)

    if cpu_devices > 1:  # as the demo's mesh.flat_gradients: one all-reduce a step, not one per parameter
        value_and_grad = flat_mean_value_and_grad(value_and_grad, mesh, ("data",))

    # Updated in place (donated), as torch's optimizer does; the state keeps its sharding.
    @functools.partial(jax.jit, donate_argnums=(0, 1), out_shardings=replicated)
    def step(params, opt_state, x, t, ctx, target):
        loss, grads = value_and_grad(params, (x, t, ctx, target), None)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    carry = [params, jax.device_put(opt.init(params), replicated)]
    data = (x, t, ctx, target)
    compiled = step.lower(*carry, *data).compile()  # run, and read for its FLOPs and HLO

    def run():
        carry[0], carry[1], loss = compiled(*carry, *data)
        loss.block_until_ready()

    run.hlo_text = compiled.as_text  # for bench/step_profile.py
    return run, compiled.cost_analysis()["flops"] * cpu_devices, config  # one device's FLOPs, times all


def our_scd_step(config, batch, latent, context_len, dtype=jnp.float32):
    """The full SCD train step (reference + target, pose encoder) from consist_jax.training."""
    from consist_jax.diffusion.schedule import NoiseSchedule
    from consist_jax.training.state import OptimizerConfig, create_train_state, make_optimizer
    from consist_jax.training.step import LossConfig, make_train_step

    config = dataclasses.replace(config, pose_block_out_channels=(16, 32, 64, 128), dtype=dtype)
    shapes = unet_param_shapes(config)
    params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, jnp.float32), shapes)
    params["pose_encoder"] = init_pose_encoder_params(config)
    optim = OptimizerConfig(warmup_steps=0)  # otherwise the run configs' defaults (AdamW, lr 1e-5)
    opt = make_optimizer(optim, params)
    model = SCDModel(UNet(config), PixelCodec(1), NullContext(config.cross_attention_dim))
    step = jax.jit(make_train_step(model, NoiseSchedule.create(), LossConfig(), opt, optim), donate_argnums=0)
    rng = np.random.default_rng(0)
    pix = latent * 8
    inputs = {
        "reference_latents": jnp.asarray(rng.standard_normal((batch, latent, latent, 4)), jnp.float32),
        "target_latents": jnp.asarray(rng.standard_normal((batch, 1, latent, latent, 4)), jnp.float32),
        "context": jnp.asarray(rng.standard_normal((batch, context_len, config.cross_attention_dim)), jnp.float32),
        "reference_pose": jnp.asarray(rng.uniform(size=(batch, pix, pix, 3)), jnp.float32),
        "target_pose": jnp.asarray(rng.uniform(size=(batch, 1, pix, pix, 3)), jnp.float32),
    }
    carry = [create_train_state(params, opt, ema=False)]
    compiled = step.lower(carry[0], inputs, jax.random.key(0), {}).compile()

    def run():
        carry[0], metrics = compiled(carry[0], inputs, jax.random.key(1), {})
        metrics["loss"].block_until_ready()

    return run, compiled.cost_analysis()["flops"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--attention_impls", default="xla,xla_chunked",
                        help="our attention forms to time, comma-separated (self_attention.ATTENTION_IMPLS)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (CPU: your own figure)")
    parser.add_argument("--gpu", action="store_true", help="SD-1.5, 512x512 (64x64 latents), bf16, SCD step only")
    parser.add_argument("--cpu_devices", default="1",
                        help="comma-separated: also time our step with the batch split over N CPU devices "
                             "(the demo's mesh.cpu_devices; XLA:CPU runs a program's ops one at a time)")
    args = parser.parse_args()
    splits = [int(n) for n in args.cpu_devices.split(",")]
    if not args.gpu and max(splits) > 1:
        split_cpu_host(max(splits))
    device = jax.devices()[0]
    print(f"# {device.platform} {device.device_kind}, jax {jax.__version__}")
    if args.gpu:
        from consist_jax.training.metrics import peak_flops_per_device

        config = UNetConfig.from_diffusers(dict(CONFIGS["sd15"], in_channels=4, out_channels=4))
        run, flops = our_scd_step(config, args.batch, 64, 1, dtype=jnp.bfloat16)
        seconds = timed(run, args.runs)
        peak = (args.peak_tflops * 1e12) or peak_flops_per_device()
        mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a (set --peak_tflops)"
        print(f"SD-1.5 SCD step, batch {args.batch}, 512x512, bf16: {seconds:.3f} s, "
              f"{args.batch / seconds:.2f} samples/s, {flops / 1e12:.2f} TFLOP, MFU {mfu}")
        return
    model, theirs = torch_step(args.config, args.batch, args.latent, args.context)
    steps = {"theirs": theirs}
    flops = {}
    for impl in args.attention_impls.split(","):
        for n in splits:
            label = impl if n == 1 else f"{impl}, {n} CPU devices"
            steps[label], flops[label], config = our_plain_step(
                model, args.config, args.batch, args.latent, args.context, attention_impl=impl, cpu_devices=n)
    times = {label: [] for label in steps}
    for fn in steps.values():
        fn()
    for _ in range(args.runs):
        for label, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    scd_run, scd_flops = our_scd_step(config, args.batch, args.latent, args.context)
    if config.attention_impl != "xla":  # its FLOPs as above: the dense form's count (compiled, not run)
        scd_flops = our_scd_step(dataclasses.replace(config, attention_impl="xla"),
                                 args.batch, args.latent, args.context)[1]
    scd_seconds = timed(scd_run, args.runs)
    # One FLOP count for every form (the same arithmetic): XLA's cost analysis counts a loop
    # body once, so the chunked form's own count misses all its chunks but one.
    flops = dict.fromkeys(flops, flops.get("xla", max(flops.values())))
    size = f"{args.batch} | {args.latent}x{args.latent}"
    print("| step | batch | latents | GFLOP | s/step | samples/s | ours/diffusers |")
    print("|---|---|---|---|---|---|---|")
    for impl in flops:
        print(f"| ours, plain, attention_impl={impl} | {size} | {flops[impl] / 1e9:.0f} | {med[impl]:.3f} | "
              f"{args.batch / med[impl]:.2f} | {med[impl] / med['theirs']:.2f} |")
    print(f"| diffusers (PyTorch), plain | {size} | - | {med['theirs']:.3f} | {args.batch / med['theirs']:.2f} | 1 |")
    print(f"| ours, SCD (reference + target), {config.attention_impl} | {size} | {scd_flops / 1e9:.0f} | "
          f"{scd_seconds:.3f} | {args.batch / scd_seconds:.2f} | - |")
    print("achieved GFLOP/s: " + ", ".join(f"{impl} {flops[impl] / med[impl] / 1e9:.1f}" for impl in flops)
          + f", SCD {scd_flops / scd_seconds / 1e9:.1f}")
    if args.peak_tflops:
        print(f"MFU of the SCD step against {args.peak_tflops} TFLOP/s: {scd_flops / scd_seconds / (args.peak_tflops * 1e12):.1%}")


if __name__ == "__main__":
    main()
