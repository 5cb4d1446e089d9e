"""Shared layers against PyTorch: GroupNorm's values and its hand-written gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import relative_error

from consist_jax.models.layers import GroupNorm


@pytest.mark.parametrize("shape, groups", [((2, 8, 8, 64), 32), ((2, 3, 4, 4, 32), 8), ((3, 16, 6), 2)])
def test_group_norm_values_and_gradients_match_torch(rng, shape, groups):
    """float32 against torch.nn.GroupNorm in float64, on image, video (N, F, h, w, C) and
    token shapes, inputs off-centre so the two-pass variance matters. Each output is a few
    float32 roundings of sums over <= 256 terms: <= ~1e-6 of the largest value (4.7e-7 the
    worst of 12 random cases), so 1e-5 holds for every seed."""
    channels = shape[-1]
    x = (rng.standard_normal(shape) * 3 + rng.standard_normal()).astype(np.float32)
    d_out = rng.standard_normal(shape).astype(np.float32)
    params = {"scale": rng.standard_normal(channels).astype(np.float32),
              "bias": rng.standard_normal(channels).astype(np.float32)}
    norm = GroupNorm(groups)

    def loss(params, x):
        return jnp.sum(norm.apply({"params": params}, x) * d_out)

    out = jax.jit(norm.apply)({"params": params}, x)
    d_params, d_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    to_torch = lambda a: torch.tensor(np.moveaxis(a, -1, 1), dtype=torch.float64)  # noqa: E731
    theirs = torch.nn.GroupNorm(groups, channels).double()
    theirs.weight.data, theirs.bias.data = (torch.tensor(params[k], dtype=torch.float64) for k in ("scale", "bias"))
    x_torch = to_torch(x).requires_grad_()
    out_torch = theirs(x_torch)
    (out_torch * to_torch(d_out)).sum().backward()
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)  # noqa: E731

    assert relative_error(out, back(out_torch)) <= 1e-5
    assert relative_error(d_x, back(x_torch.grad)) <= 1e-5
    assert relative_error(d_params["scale"], theirs.weight.grad.numpy()) <= 1e-5
    assert relative_error(d_params["bias"], theirs.bias.grad.numpy()) <= 1e-5


def test_group_norm_keeps_bfloat16_inputs_and_gradients(rng):
    """bf16 activations: statistics in float32, the output in the module's dtype and the
    input's gradient in the input's dtype (the backward pass is hand-written)."""
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 16)), jnp.bfloat16)
    norm = GroupNorm(4, dtype=jnp.bfloat16)
    params = norm.init(jax.random.PRNGKey(0), x)
    out = norm.apply(params, x)
    d_x = jax.grad(lambda x: jnp.sum(norm.apply(params, x).astype(jnp.float32)))(x)
    reference = GroupNorm(4).apply(params, x.astype(jnp.float32))
    assert out.dtype == jnp.bfloat16 and d_x.dtype == jnp.bfloat16
    assert relative_error(out, reference) <= 2 ** -8  # one bfloat16 rounding of the output


def test_bench_grouped_form_is_the_same_group_norm(rng):
    """bench/group_norm.py times ours against the grouped form (autodiff of one reduction
    over (positions, channels of a group)); both are GroupNorm: values and gradients agree
    to float32 rounding of sums over 128 terms (<= ~1e-6 of the largest)."""
    from bench.group_norm import grouped_form

    from consist_jax.models.layers import group_norm

    x = (rng.standard_normal((2, 8, 8, 32)) * 2 + 0.5).astype(np.float32)
    d_out = rng.standard_normal(x.shape).astype(np.float32)
    scale, bias = (rng.standard_normal(32).astype(np.float32) for _ in range(2))
    outs = [f(x, scale, bias, 8, 1e-5) for f in (group_norm, grouped_form)]
    grads = [jax.grad(lambda x, s, b, f=f: jnp.sum(f(x, s, b, 8, 1e-5) * d_out), argnums=(0, 1, 2))(x, scale, bias)
             for f in (group_norm, grouped_form)]
    assert relative_error(*outs) <= 1e-5
    for grad, grad_ref in zip(*grads):
        assert relative_error(grad, grad_ref) <= 1e-5
