"""Classifier-free guidance: one batched call, diffusers' combination and rescale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
# The same function the SD pipelines use, from a module that does not import transformers.
from diffusers.guiders.guider_utils import rescale_noise_cfg as torch_rescale
from parity import assert_within_rounding

from consist_jax.diffusion import guidance

SHAPES = [(2, 8, 8, 4), (2, 3, 4, 4, 4)]  # (B, h, w, C) and (B, F, h, w, C)


def _rescale_float64(guided, cond, guidance_rescale):
    """diffusers' rescale_noise_cfg evaluated in float64 (torch) on the float32 inputs."""
    as64 = lambda v: torch.from_numpy(np.asarray(v, np.float64))  # noqa: E731
    return torch_rescale(as64(guided), as64(cond), guidance_rescale).numpy()


def _rescale_error_scale(guided, cond, guidance_rescale):
    """What float32 rounding allows rescale_noise_cfg to be off by, elementwise (B, ...).

    Each std sums n = prod(shape[1:]) terms (up to n roundings of their magnitudes, and
    the deviations inherit the mean's error, in units of mean|x| / std), the ratio of two
    stds doubles that, and the mix adds 3 roundings of its two terms.
    """
    axes = tuple(range(1, guided.ndim))
    n = np.prod(guided.shape[1:])

    def std_error(x):
        x = np.asarray(x, np.float64)
        return (n + 4) * (1 + np.abs(x).mean(axis=axes, keepdims=True) / x.std(axis=axes, keepdims=True, ddof=1))

    guided64 = np.asarray(guided, np.float64)
    ratio = np.asarray(cond, np.float64).std(axis=axes, keepdims=True, ddof=1) / guided64.std(
        axis=axes, keepdims=True, ddof=1)
    rescaled = guidance_rescale * np.abs(guided64) * ratio
    return rescaled * (std_error(guided) + std_error(cond)) + 3 * (rescaled + (1 - guidance_rescale) * np.abs(guided64))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(rng, shape, guidance_rescale):
    cond = rng.standard_normal(shape).astype(np.float32)
    guided = (3.0 * rng.standard_normal(shape) + 0.5).astype(np.float32)
    expected = _rescale_float64(guided, cond, guidance_rescale)
    ours = jax.jit(guidance.rescale_noise_cfg)(guided, cond, guidance_rescale)
    assert_within_rounding(ours, expected, _rescale_error_scale(guided, cond, guidance_rescale), 1, "rescale")
    # diffusers' float32 evaluation carries the same kind of error.
    float32_ref = torch_rescale(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale).numpy()
    assert_within_rounding(float32_ref, expected, _rescale_error_scale(guided, cond, guidance_rescale), 1,
                           "diffusers' float32 rescale")


def _toy_model(weights):
    """A model_fn of (x, t, condition pytree); records the batch sizes it is called with."""
    calls = []

    def model_fn(x, t, condition):
        calls.append(x.shape[0])
        scale = condition["embedding"].mean(axis=(1, 2))  # (batch,)
        shift = condition["reference"][:, None, None, :]
        return jnp.tanh(x * weights) * scale[:, None, None, None] + shift + 1e-3 * t[:, None, None, None]

    return model_fn, calls


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_guided_prediction_is_one_batched_call(rng, guidance_rescale):
    batch, scale = 2, 3.5
    x = jnp.asarray(rng.standard_normal((batch, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([999, 500], jnp.int32)
    cond = {"embedding": jnp.asarray(rng.standard_normal((batch, 3, 16)), jnp.float32),
            "reference": jnp.asarray(rng.standard_normal((batch, 4)), jnp.float32)}
    uncond = jax.tree_util.tree_map(jnp.zeros_like, cond)
    model_fn, calls = _toy_model(jnp.asarray(rng.standard_normal(4), jnp.float32))

    guided_fn = jax.jit(guidance.make_guided_model_fn(model_fn, cond, uncond, scale, guidance_rescale))
    result = guided_fn(x, t)
    assert calls == [2 * batch]  # traced once, with both branches stacked

    uncond_out = np.asarray(model_fn(x, t, uncond), np.float64)
    cond_out = np.asarray(model_fn(x, t, cond), np.float64)
    expected = uncond_out + scale * (cond_out - uncond_out)
    # The combination's 3 roundings of |uncond| + scale |cond - uncond|, plus a few ulps of
    # the outputs themselves (XLA's tanh in a batched vs an unbatched program).
    combine_scale = 8 * (np.abs(uncond_out) + scale * (np.abs(cond_out) + np.abs(uncond_out)))
    assert result.shape == x.shape
    if not guidance_rescale:
        assert_within_rounding(result, expected, combine_scale, 1, "guided output")
        return
    rescaled = _rescale_float64(expected, cond_out, guidance_rescale)
    ratio = np.abs(rescaled / np.where(expected == 0, 1.0, expected))  # how the rescale scales errors
    scale_ = _rescale_error_scale(expected, cond_out, guidance_rescale) + combine_scale * (1 + ratio)
    assert_within_rounding(result, rescaled, scale_, 1, "rescaled guided output")


def test_scalar_timestep_and_stacking_order(rng):
    cond = {"embedding": jnp.ones((1, 2, 3)), "reference": jnp.full((1, 4), 2.0)}
    uncond = {"embedding": jnp.zeros((1, 2, 3)), "reference": jnp.zeros((1, 4))}
    stacked = guidance.batch_conditions(cond, uncond)
    np.testing.assert_array_equal(np.asarray(stacked["reference"][:, 0]), [0.0, 2.0])  # [uncond; cond]
    model_fn, _ = _toy_model(jnp.ones(4))
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 4)), jnp.float32)
    out = guidance.guided_prediction(model_fn, x, jnp.int32(10), stacked, 1.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model_fn(x, jnp.full((1,), 10), cond)), rtol=1e-6)


def test_combine_guidance_formula(rng):
    uncond, cond = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    u64, c64 = uncond.astype(np.float64), cond.astype(np.float64)
    for scale in (0.0, 1.0, 7.5):
        # 3 roundings (a difference, a product, a sum) of |uncond| + scale |cond - uncond|.
        assert_within_rounding(guidance.combine_guidance(uncond, cond, scale), u64 + scale * (c64 - u64),
                               np.abs(u64) + scale * (np.abs(c64) + np.abs(u64)), 3, f"scale {scale}")
