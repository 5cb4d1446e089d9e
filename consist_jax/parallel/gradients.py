"""Data-parallel gradients averaged over the data axes as one flat vector.

Left to itself, XLA's SPMD partitioner all-reduces each parameter's gradient where it is
formed: one collective per parameter leaf (337 a step for the demo's UNet). The TPU and
GPU compilers combine them into a few large ones; XLA:CPU does not, and on a CPU host
split into devices (``mesh.cpu_devices``) every one is a rendezvous of the device threads,
where the thread that finished its part first waits for the other. Here each data shard
computes the loss and gradients of its own examples (``shard_map``) and the gradients are
averaged as one vector: one all-reduce a step (the demo's step on 2 cores: 16% off,
BENCHMARKS.md "The gradients' all-reduce and the chunked attention in the demo").

The parameters must be whole on every device (replicated): the vector is all of them; and
every mesh axis but the data axes must have one device (the body runs per data shard).
The result equals the partitioner's to float32 rounding: the mean of the shards' mean
losses is the batch's mean loss, as the batch split gives every shard as many examples.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

ValueAndGrad = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]


def flat_mean_value_and_grad(value_and_grad: ValueAndGrad, mesh: Mesh, axes: Sequence[str]) -> ValueAndGrad:
    """``value_and_grad(params, inputs, rng) -> (scalar mean loss, grads)``, run by every
    shard of ``axes`` on its part of ``inputs`` (each leaf split on its leading, batch axis;
    params and rng whole), the losses and the gradients averaged over the shards, the
    gradients as one flat vector. Returns a function of the same signature and results."""
    axes = tuple(axes)

    def per_shard(params, inputs, rng):
        value, grads = value_and_grad(params, inputs, rng)  # this shard's own: nothing summed yet
        flat, unravel = ravel_pytree(grads)
        return jax.lax.pmean(value, axes), unravel(jax.lax.pmean(flat, axes))

    # Unchecked (check_vma=False), as the attention kernels' own shard_map: the Pallas kernels
    # called inside declare outputs without a varying type. Differentiated inside the body,
    # the replicated parameters get each shard's own gradient, and the pmean is the only sum.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axes), P()), out_specs=(P(), P()),
                         check_vma=False)
