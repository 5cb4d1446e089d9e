"""Where our CPU train step's time goes: per-op thread time of bench/train_step.py's step.

    python bench/step_profile.py [--config small] [--latent 32] [--batch 4]
        [--attention_impl xla_chunked] [--steps 3] [--top 12]

Traces --steps runs of our plain step (forward + backward + AdamW, diffusers' weights)
with ``jax.profiler`` (``create_perfetto_trace=True``: a JSON trace, readable without
TensorBoard), sums each XLA op's time over all threads and steps, and classes the ops by
what the optimized HLO says they compute: YNNPACK fusions as convolutions (by output
shape and window), matmuls or other; XLA's own ops by name (``transpose_copy_fusion``,
``dot``, ...). Prints ms a step per class, then the heaviest convolutions, then the same
time by the part of the model each op came from (``by_module``: the ``op_name`` XLA keeps
in each instruction's metadata; "backward" where JAX's transpose made the op). The profiler
adds its own overhead; compare the shares, not the totals, with bench/train_step.py.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile

import jax

sys.path.insert(0, ".")
from bench.train_step import our_plain_step, torch_step  # noqa: E402

_FUSION = re.compile(r"^\s*%?([\w.\-]+) = \S+ fusion\(.*?calls=%?([\w.\-]+)", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", re.M | re.S)
_CONV = re.compile(r"= (\S+) convolution\(.*?window=\{([^}]*)\}")
_HOST_EVENTS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "while")
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", re.M)
# (part of the model, pattern in the op_name), the first match wins; diffusers' module names.
_MODULES = (
    ("attention core", r"chunked_attention|attn[12]/(?!to_)"),
    ("attention projections", r"attn[12]/to_"),
    ("convolutions", r"conv_general_dilated"),
    ("feed-forward", r"/ff/"),
    ("norms", r"norm"),
    ("optimizer and loss", r"^jit\(step\)/(?!.*UNet)"),
)


def _op_kind(name: str) -> str:
    """An XLA op's name without its instance number: "transpose_copy_fusion.25" -> "transpose_copy_fusion"."""
    return re.sub(r"\.\d+$", "", name)


def op_times(run, steps: int) -> dict:
    """XLA op name -> microseconds of thread time over ``steps`` calls of ``run``."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(_HOST_EVENTS):
            times[event["name"]] += event.get("dur", 0)
    return times


def classify(times: dict, hlo: str) -> tuple[collections.Counter, collections.Counter]:
    """(class -> us, convolution (output shape, window) -> us), from the optimized HLO."""
    called = dict(_FUSION.findall(hlo))
    bodies = dict(_COMPUTATION.findall(hlo))
    classes, convolutions = collections.Counter(), collections.Counter()
    for name, us in times.items():
        kind = _op_kind(name)
        if kind == "ynn_fusion":
            body = bodies.get(called.get(name, ""), "")
            conv = _CONV.search(body)
            kind = "YNNPACK convolution" if conv else "YNNPACK matmul" if "dot(" in body else "YNNPACK other"
            if conv:
                convolutions[conv.groups()] += us
        classes[kind] += us
    return classes, convolutions


def by_module(times: dict, hlo: str) -> collections.Counter:
    """(part of the model, "forward" | "backward" | "outside the model") -> us, from each op's op_name;
    ops without one (copies XLA inserted, runtime events) are ("unattributed", kind)."""
    op_names = dict(_OP_NAME.findall(hlo))
    parts = collections.Counter()
    for name, us in times.items():
        op_name = op_names.get(name)
        if op_name is None:
            parts["unattributed", _op_kind(name)] += us
            continue
        part = next((part for part, pattern in _MODULES if re.search(pattern, op_name)), "other")
        kind = "backward" if "transpose(" in op_name else "forward" if "UNet" in op_name else "outside the model"
        parts[part, kind] += us
    return parts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="small")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--attention_impl", default="xla_chunked")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    model, _ = torch_step(args.config, args.batch, args.latent, 1)
    run, _, _ = our_plain_step(model, args.config, args.batch, args.latent, 1, attention_impl=args.attention_impl)
    for _ in range(3):  # compile and settle
        run()
    times, hlo = op_times(run, args.steps), run.hlo_text()
    classes, convolutions = classify(times, hlo)
    per_step = 1e-3 / args.steps
    print(f"# {args.config}, batch {args.batch}, {args.latent}x{args.latent} latents, {args.attention_impl}: "
          f"{sum(classes.values()) * per_step:.0f} ms of op time a step (all threads, under the profiler)")
    for kind, us in classes.most_common(args.top):
        print(f"{us * per_step:8.1f} ms  {kind}")
    print("# heaviest convolutions (output shape, window)")
    for (shape, window), us in convolutions.most_common(args.top):
        print(f"{us * per_step:8.1f} ms  {shape}  {window}")
    print("# by part of the model")
    for (part, kind), us in by_module(times, hlo).most_common(args.top):
        print(f"{us * per_step:8.1f} ms  {part}, {kind}")


if __name__ == "__main__":
    main()
