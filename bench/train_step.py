"""Train-step speed: our jitted step vs a diffusers-PyTorch step of the same UNet.

    python bench/train_step.py [--config small] [--latent 32] [--batch 4] [--runs 5]
        [--attention_impls xla,xla_chunked] [--cpu_devices 1,2] [--default_malloc]
    python bench/train_step.py --gpu [--batch 8]   # on a GPU: SD-1.5 at 512x512, bf16

CPU mode: both sides do forward + backward + AdamW on the same UNet config, batch and
latent size (plain denoising MSE, no reference), alternating runs; ours once per
attention form in --attention_impls (the same model, so each row says what its form
buys) and per entry of --cpu_devices (the batch split over that many CPU devices);
prints the median step times, samples/s and each ratio ours/theirs. It also
times our SCD step (the reference beside each target: twice the images) with the last
form and prints its MFU against the peak given by --peak_tflops (XLA's cost analysis
for the FLOPs). Both sides run with glibc's malloc keeping freed memory, as train.py on the
CPU (consist_jax/host_memory.py); --default_malloc leaves it as it is.

GPU mode (``--gpu``): the same comparison at SD-1.5's size, 512x512 (64x64 latents), bf16
compute with float32 parameters on both sides (PyTorch under ``torch.autocast``, its
attention SDPA), our forms ``xla`` and ``auto`` (cuDNN flash attention where cuDNN takes
the head dim) by default; then our SCD step per form, each time printed as it is measured.
Then each step's TFLOP/s and MFU against the device's bf16 peak
(``consist_jax.training.metrics.PEAK_TFLOPS``), from XLA:CPU's FLOP count of our steps,
compiled in a CPU-only subprocess (the GPU's own count leaves out cuBLAS and cuDNN calls;
PyTorch's step does the same arithmetic).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
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
from consist_jax import host_memory  # noqa: E402
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


def torch_step(name, batch, latent, context_len, device="cpu", bf16=False):
    """diffusers' UNet, forward + backward + AdamW; on ``device``, under bf16 autocast if asked."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=latent, **CONFIGS[name]).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    ctx = torch.randn(batch, context_len, CONFIGS[name]["cross_attention_dim"], device=device)
    target = torch.randn_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t, encoder_hidden_states=ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return model, step


def step_flops(compiled):
    """XLA's FLOP count of a compiled step; None on a GPU, whose compiled count leaves out the
    library calls (cuBLAS matmuls, cuDNN convolutions and attention: it gave 2.7 of SD-1.5's
    18.8 TFLOP). ``cpu_flop_counts`` counts the GPU mode's steps on XLA:CPU instead."""
    if jax.default_backend() == "gpu":
        return None
    return compiled.cost_analysis()["flops"]


def our_plain_step(model, name, batch, latent, context_len, attention_impl="xla", cpu_devices=1,
                   dtype=jnp.float32):
    """Our step on diffusers' weights (float32 parameters, ``dtype`` compute); with
    cpu_devices > 1 the batch is split over that many CPU devices (params replicated,
    gradients averaged as one vector; as the demo's ``mesh.cpu_devices`` and
    ``mesh.flat_gradients``)."""
    config = UNetConfig.from_diffusers(dict(model.config), pose_block_out_channels=None,
                                       attention_impl=attention_impl, dtype=dtype)
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
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
        def loss(p):
            return jnp.mean((unet.apply({"params": p}, x, t, ctx).astype(jnp.float32) - target) ** 2)

        return jax.value_and_grad(loss)(params)

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
    count = step_flops(compiled)
    return run, count and count * cpu_devices, config  # one device's FLOPs, times all


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

    return run, step_flops(compiled)


def alternating_medians(steps: dict, runs: int) -> dict:
    """Median seconds of each step, the steps run in turn ``runs`` times after a warm-up."""
    times = {label: [] for label in steps}
    for fn in steps.values():
        fn()
    for _ in range(runs):
        for label, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def gpu_comparison(batch, context_len, runs, impls, peak_tflops=0.0, name="sd15", latent=64):
    """SD-1.5 at 512x512, bf16: our plain step per attention form against diffusers', then
    our SCD step per form; TFLOP/s and MFU from XLA:CPU's FLOP count of the same steps."""
    from consist_jax.training.metrics import peak_flops_per_device

    model, theirs = torch_step(name, batch, latent, context_len, device="cuda", bf16=True)
    steps = {"diffusers (PyTorch), bf16 autocast, SDPA": theirs}
    for impl in impls:
        label = f"ours, attention_impl={impl}"
        steps[label], _, config = our_plain_step(
            model, name, batch, latent, context_len, attention_impl=impl, dtype=jnp.bfloat16)
    med = alternating_medians(steps, runs)
    theirs_s = med[next(iter(steps))]
    print(f"UNet {name!r}, {latent * 8}x{latent * 8} ({latent}x{latent} latents), batch {batch}, bf16 compute, "
          f"float32 parameters; median of {runs}")
    print("| step | ms/step | samples/s | time / diffusers |")
    print("|---|---|---|---|")
    timings = []  # (label, seconds, which step): the times first, so a time limit keeps them
    for label, seconds in med.items():
        timings.append((label + ", plain", seconds, "plain"))
        print(f"| {label}, plain | {seconds * 1e3:.1f} | {batch / seconds:.1f} | {seconds / theirs_s:.2f} |", flush=True)
    del model, theirs, steps
    for impl in impls:
        run, _ = our_scd_step(dataclasses.replace(config, attention_impl=impl), batch, latent, context_len,
                              dtype=jnp.bfloat16)
        label, seconds = f"ours, SCD step (reference + target, pose encoder), attention_impl={impl}", timed(run, runs)
        timings.append((label, seconds, "scd"))
        print(f"| {label} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | - |", flush=True)
    counts = cpu_flop_counts(name, batch, latent, context_len)
    peak = peak_flops_per_device(peak_tflops)
    print(f"FLOPs (XLA:CPU's count): plain step {counts['plain'] / 1e12:.3g} TFLOP, SCD step "
          f"{counts['scd'] / 1e12:.3g} TFLOP; peak {peak / 1e12 if peak else 'unknown (set --peak_tflops)'} TFLOP/s")
    print("| step | TFLOP/s | MFU |")
    print("|---|---|---|")
    for label, seconds, which in timings:
        achieved = counts[which] / seconds
        print(f"| {label} | {achieved / 1e12:.3g} | {f'{achieved / peak:.1%}' if peak else 'n/a'} |")


def cpu_flop_counts(name, batch, latent, context_len) -> dict:
    """FLOPs of the GPU mode's plain and SCD steps (bf16, ``attention_impl="xla"``), from
    XLA:CPU's cost analysis of the same programs, compiled in a CPU-only subprocess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [sys.executable, os.path.abspath(__file__), "--count_flops", "--config", name,
            "--batch", str(batch), "--latent", str(latent), "--context", str(context_len)]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    if out.returncode:
        reason = (out.stderr.strip().splitlines() or ["no error output"])[-1]
        raise SystemExit(f"counting the steps' FLOPs on XLA:CPU failed: {reason}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # {"plain": ..., "scd": ...}


def print_flop_counts(name, batch, latent, context_len):
    """``--count_flops``: the GPU mode's two steps compiled here (XLA:CPU), their FLOPs as JSON."""
    model, _ = torch_step(name, batch, latent, context_len)
    _, plain, config = our_plain_step(model, name, batch, latent, context_len, dtype=jnp.bfloat16)
    _, scd = our_scd_step(config, batch, latent, context_len, dtype=jnp.bfloat16)
    print(json.dumps({"plain": plain, "scd": scd}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small", choices=sorted(CONFIGS))
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--attention_impls", default=None,
                        help="our attention forms to time, comma-separated (self_attention.ATTENTION_IMPLS); "
                             "default xla,xla_chunked (CPU), xla,auto (--gpu)")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (CPU: your own figure)")
    parser.add_argument("--gpu", action="store_true",
                        help="SD-1.5, 512x512 (64x64 latents), bf16: ours against diffusers on the GPU, then the SCD step")
    parser.add_argument("--cpu_devices", default="1",
                        help="comma-separated: also time our step with the batch split over N CPU devices "
                             "(the demo's mesh.cpu_devices; XLA:CPU runs a program's ops one at a time)")
    parser.add_argument("--default_malloc", action="store_true",
                        help="leave glibc's malloc as it is (default: keep freed memory, as train.py does on CPU; "
                             "consist_jax/host_memory.py); it applies to both sides")
    parser.add_argument("--count_flops", action="store_true", help=argparse.SUPPRESS)  # cpu_flop_counts' subprocess
    args = parser.parse_args()
    if args.count_flops:
        print_flop_counts(args.config, args.batch, args.latent, args.context)
        return
    splits = [int(n) for n in args.cpu_devices.split(",")]
    if not args.gpu and max(splits) > 1:
        split_cpu_host(max(splits))
    device = jax.devices()[0]
    print(f"# {device.platform} {device.device_kind}, jax {jax.__version__}")
    if not args.gpu:
        print("# " + ("host memory: malloc as it is" if args.default_malloc else host_memory.keep_freed_memory()))
    if args.gpu:
        if jax.default_backend() != "gpu":
            raise SystemExit(f"--gpu asked for, but jax's backend is {jax.default_backend()!r}")
        gpu_comparison(args.batch, args.context, args.runs, (args.attention_impls or "xla,auto").split(","),
                       args.peak_tflops)
        return
    model, theirs = torch_step(args.config, args.batch, args.latent, args.context)
    steps = {"theirs": theirs}
    flops = {}
    for impl in (args.attention_impls or "xla,xla_chunked").split(","):
        for n in splits:
            label = impl if n == 1 else f"{impl}, {n} CPU devices"
            steps[label], flops[label], config = our_plain_step(
                model, args.config, args.batch, args.latent, args.context, attention_impl=impl, cpu_devices=n)
    med = alternating_medians(steps, args.runs)
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
