"""Classifier-free guidance: one batched call, diffusers' combination and rescale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
# The same function the SD pipelines use, from a module that does not import transformers.
from diffusers.guiders.guider_utils import rescale_noise_cfg as torch_rescale
from parity import relative_error

from consist_jax.diffusion import guidance

SHAPES = [(2, 8, 8, 4), (2, 3, 4, 4, 4)]  # (B, h, w, C) and (B, F, h, w, C)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(rng, shape, guidance_rescale):
    cond = rng.standard_normal(shape).astype(np.float32)
    guided = (3.0 * rng.standard_normal(shape) + 0.5).astype(np.float32)
    expected = torch_rescale(torch.from_numpy(guided), torch.from_numpy(cond), guidance_rescale).numpy()
    ours = jax.jit(guidance.rescale_noise_cfg)(guided, cond, guidance_rescale)
    assert relative_error(ours, expected) < 1e-6


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
    if guidance_rescale:
        expected = torch_rescale(torch.from_numpy(expected), torch.from_numpy(cond_out),
                                 guidance_rescale).numpy()
    assert result.shape == x.shape
    assert relative_error(result, expected) < 1e-6


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
    for scale in (0.0, 1.0, 7.5):
        np.testing.assert_allclose(np.asarray(guidance.combine_guidance(uncond, cond, scale)),
                                   uncond + scale * (cond - uncond), rtol=1e-6, atol=1e-6)
