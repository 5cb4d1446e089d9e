"""Causal reference/target attention: joint masked vs decomposed vs kernels, one layer.

    python bench/attention.py [--latents 64x64 96x96] [--head-dims 40 80 160] [--heads 8]
                              [--frames 1] [--forms joint decomposed chunked pallas splash]
                              [--runs 1] [--head-chunk 1] [--dtype float32] [--gpu]
    python bench/attention.py --memory-only --latents 64x128 --head-dims 40

One SD-1.5 self-attention layer, batch 1: N_r = N_t = h*w latent tokens (64x64 ->
4096 + 4096), ``--frames`` target frames, 8 heads. Forms (``attention_impl``):
joint = ``xla_joint`` (one masked joint sequence), decomposed = ``xla``, chunked =
``xla_chunked`` (the decomposed form in query chunks), and the kernels ``pallas``,
``splash``, ``cudnn`` (off their platform, the Pallas kernels run as ``*_interpret``). Every form is compiled ahead of time; the timed calls exclude compilation.

Printed per form: model FLOPs (4 H D x the score count of the form: joint
(N_r + F N_t)^2, decomposed N_r^2 + F N_t (N_r + N_t)), the compiled temporaries
(XLA's memory analysis), the median time, time / joint, the FLOP-proportional
ideal flops / joint (0.75 for one frame), and (with ``--gpu``) achieved TFLOP/s.

``--head-chunk K`` runs the heads K at a time under ``lax.map`` (the same for every
form): on a CPU it bounds the xla forms' score matrices to K heads.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax.models.self_attention import reference_target_attention

FORM_IMPLS = {
    "joint": "xla_joint",
    "decomposed": "xla",
    "chunked": "xla_chunked",
    "pallas": "pallas",
    "splash": "splash",
    "cudnn": "cudnn",
}
KERNEL_PLATFORMS = {"pallas": "gpu", "splash": "tpu", "cudnn": "gpu"}


def form_impl(form: str) -> str:
    """The form's ``attention_impl``; a Pallas kernel off its platform runs interpreted."""
    impl = FORM_IMPLS[form]
    if form in ("pallas", "splash") and KERNEL_PLATFORMS[form] != jax.default_backend():
        return f"{impl}_interpret"
    return impl


DEFAULT_FORMS = {
    "cpu": ["joint", "decomposed", "chunked", "pallas", "splash"],
    "gpu": ["joint", "decomposed", "cudnn", "pallas"],
    "tpu": ["joint", "decomposed", "splash"],
}


def score_count(form: str, n_ref: int, n_tgt: int, frames: int) -> int:
    """Query-key pairs a form computes: the masked block costs the joint form only."""
    if form == "joint":
        return (n_ref + frames * n_tgt) ** 2
    return n_ref**2 + frames * n_tgt * (n_ref + n_tgt)


def model_flops(form, n_ref, n_tgt, frames, heads, head_dim) -> int:
    """Two matmuls (scores, scores @ V) of 2 flops per multiply-add."""
    return 4 * heads * head_dim * score_count(form, n_ref, n_tgt, frames)


def head_chunked(impl: str, chunk: int):
    """The rule, heads ``chunk`` at a time under lax.map. (B, N, H, D) layouts."""

    def attend(ref, tgt):
        return reference_target_attention(ref, tgt, impl=impl)

    def run(ref, tgt):
        heads = ref[0].shape[2]
        if chunk >= heads:
            return attend(ref, tgt)
        groups = heads // chunk

        def split(x):  # (..., H, D) -> (H/chunk, ..., chunk, D)
            x = x.reshape(*x.shape[:-2], groups, chunk, x.shape[-1])
            return jnp.moveaxis(x, -3, 0)

        def merge(x):
            x = jnp.moveaxis(x, 0, -3)
            return x.reshape(*x.shape[:-3], heads, x.shape[-1])

        outs = jax.lax.map(lambda rt: attend(*rt), jax.tree.map(split, (ref, tgt)))
        return jax.tree.map(merge, outs)

    return run


def inputs(n_ref, n_tgt, frames, heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)

    def qkv(*lead):
        shape = (*lead, heads, head_dim)
        return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))

    return qkv(1, n_ref), qkv(1, frames, n_tgt)


def compile_form(form, n_ref, n_tgt, frames, heads, head_dim, dtype, chunk):
    shapes = (
        tuple(jax.ShapeDtypeStruct((1, n_ref, heads, head_dim), dtype) for _ in range(3)),
        tuple(jax.ShapeDtypeStruct((1, frames, n_tgt, heads, head_dim), dtype) for _ in range(3)),
    )
    return jax.jit(head_chunked(form_impl(form), chunk)).lower(*shapes).compile()


def time_calls(compiled, args, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.processor() or platform.machine()


def machine() -> str:
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    return f"{kind} ({jax.default_backend()}); host: {os.cpu_count()} x {cpu_model()}"


def bench_config(args, latent: str, head_dim: int) -> list[dict]:
    h, w = (int(s) for s in latent.split("x"))
    n = h * w
    dtype = jnp.dtype(args.dtype)
    ref, tgt = inputs(n, n, args.frames, args.heads, head_dim, dtype)
    joint_flops = model_flops("joint", n, n, args.frames, args.heads, head_dim)
    rows, joint_time = [], None
    for form in args.forms:
        try:
            compiled = compile_form(
                form, n, n, args.frames, args.heads, head_dim, dtype, args.head_chunk
            )
        except Exception as error:  # e.g. cuDNN refusing a head dim: report, go on.
            print(f"{latent} d={head_dim} {form}: not run ({type(error).__name__}: {error})")
            continue
        temp = compiled.memory_analysis().temp_size_in_bytes
        seconds = None
        if not args.memory_only:
            seconds = time_calls(compiled, (ref, tgt), args.warmup, args.runs)
        flops = model_flops(form, n, n, args.frames, args.heads, head_dim)
        if form == "joint":
            joint_time = seconds
        rows.append(
            dict(latent=latent, head_dim=head_dim, form=form, flops=flops, temp=temp,
                 seconds=seconds, ideal=flops / joint_flops, joint_time=joint_time)
        )
    return rows


def print_table(rows: list[dict], gpu: bool, memory_only: bool) -> None:
    header = "| latent | d | form | GFLOP | temp MiB |"
    if not memory_only:
        header += " ms | time/joint | ideal flops/joint | time ratio / ideal |"
        if gpu:
            header += " TFLOP/s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['latent']} | {r['head_dim']} | {r['form']} | {r['flops'] / 1e9:.1f} "
            f"| {r['temp'] / 2**20:.0f} |"
        )
        if not memory_only:
            ratio = r["seconds"] / r["joint_time"] if r["joint_time"] else float("nan")
            ms = r["seconds"] * 1e3
            ms_text = f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"  # an accelerator's are below 1
            line += f" {ms_text} | {ratio:.2f} | {r['ideal']:.2f} | {ratio / r['ideal']:.2f} |"
            if gpu:
                line += f" {r['flops'] / r['seconds'] / 1e12:.1f} |"
        print(line)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latents", nargs="+", default=["64x64", "96x96"])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[40, 80, 160])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--forms", nargs="+", choices=sorted(FORM_IMPLS), default=None)
    parser.add_argument("--runs", type=int, help="timed calls (median); CPU 1, else 20")
    parser.add_argument("--warmup", type=int, help="untimed calls first; CPU 0, else 3")
    parser.add_argument("--head-chunk", type=int, help="heads per lax.map step; CPU 1, else all")
    parser.add_argument("--dtype", default=None, help="CPU float32, accelerators bfloat16")
    parser.add_argument("--gpu", action="store_true", help="require a GPU, report TFLOP/s")
    parser.add_argument(
        "--memory-only", action="store_true", help="compile and report memory, no timing"
    )
    args = parser.parse_args()

    backend = jax.default_backend()
    if args.gpu and backend != "gpu":
        raise SystemExit(f"--gpu asked for, but jax's backend is {backend!r}")
    on_cpu = backend == "cpu"
    args.forms = args.forms or DEFAULT_FORMS.get(backend, DEFAULT_FORMS["cpu"])
    args.runs = args.runs or (1 if on_cpu else 20)
    args.warmup = (0 if on_cpu else 3) if args.warmup is None else args.warmup
    args.head_chunk = args.head_chunk or (1 if on_cpu else args.heads)
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    if "joint" in args.forms:  # time/joint needs the joint time first
        args.forms = ["joint"] + [f for f in args.forms if f != "joint"]

    print(f"machine: {machine()}; jax {jax.__version__}")
    print(
        f"batch 1, {args.heads} heads, {args.frames} frame(s), {args.dtype}, "
        f"heads {args.head_chunk} at a time, median of {args.runs} run(s) "
        f"after {args.warmup} warm-up(s)"
    )
    rows = []
    for latent in args.latents:
        for head_dim in args.head_dims:
            rows += bench_config(args, latent, head_dim)
            print(f"  done {latent} d={head_dim}", flush=True)
    print_table(rows, args.gpu, args.memory_only)


if __name__ == "__main__":
    main()
