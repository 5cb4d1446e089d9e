"""What every sampler shares (samplers.py, flow_samplers.py): the state carried between
steps and the methods common to all samplers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class SamplerState:
    """What a sampler carries between steps.

    pred_original_sample: (B, ...) float32, the x0 predicted at the last step (zeros
        before the first); DPM-Solver++ 2M uses it as its previous model output.
    steps_taken: () int32, steps done since `init_state` (first-order start of DPM).
    """

    pred_original_sample: jax.Array
    steps_taken: jax.Array


class SamplerMethods:
    """Methods every sampler shares; subclasses hold `timesteps` and `init_noise_sigma`."""

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]

    def initial_latents(self, noise: jax.Array) -> jax.Array:
        """x_T from unit Gaussian noise (B, ...): noise * init_noise_sigma."""
        return (noise * self.init_noise_sigma).astype(noise.dtype)

    def init_state(self, x: jax.Array) -> SamplerState:
        """The state before step 0 for latents x (B, ...)."""
        return SamplerState(pred_original_sample=jnp.zeros(x.shape, jnp.float32),
                            steps_taken=jnp.zeros((), jnp.int32))

    def scale_model_input(self, x: jax.Array, i) -> jax.Array:
        """The UNet input at step i; identity except for Euler."""
        return x


def next_state(state: SamplerState, pred_original_sample: jax.Array) -> SamplerState:
    return SamplerState(pred_original_sample=pred_original_sample,
                        steps_taken=state.steps_taken + 1)


def as_float32(x):
    return jnp.asarray(x, jnp.float32)
