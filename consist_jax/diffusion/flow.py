"""Rectified flow (flow matching) as Wan trains it: the forward process, the velocity
target and the shifted timestep sampling.

    x_t    = (1 - sigma) x0 + sigma noise,      sigma in (0, 1]  (1: pure noise)
    target = noise - x0                          (the velocity d x_t / d sigma)
    x0     = x_t - sigma v                       (a velocity prediction v back to x0)

The model is called with timestep = sigma * num_train_timesteps (float; Wan's 1000).

Shifted sigmas. Wan, like SD3, spends more training (and sampling) steps at high noise by
the shift map sigma -> shift sigma / (1 + (shift - 1) sigma) (the identity for shift 1;
Wan2.1 ships shift 3.0 for 480p and 5.0 for 720p). Our choice for training follows
diffusers' flow-matching training scripts (train_dreambooth_sd3.py, _flux.py): u in
[0, 1) from a density ("uniform", or SD3's "logit_normal"), then the entry floor(u N)
of FlowMatchEulerDiscreteScheduler(shift=...)'s table, whose entry k is shift((N - k) / N)
in float32. So a training sigma is always one of the N shifted grid values (never 0: x_t
is never the clean latent), uniform u gives every grid point the same probability, and
the loss weight is 1 (their weighting_scheme "none"); the shift is the sampler's.

Conventions: latents (B, ...) with the batch first ((B, F, h, w, C) for Wan's video
latents); per-sample sigmas (B,) broadcast over the rest. Pure JAX except the table
construction (numpy, on the host).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from consist_jax.diffusion.schedule import broadcast_to_batch

TIMESTEP_DENSITIES = ("uniform", "logit_normal")
FLOW_PREDICTION = "flow_prediction"  # the velocity noise - x0 (diffusers' prediction_type name)
WAN_NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """The timestep shift shift * s / (1 + (shift - 1) * s), elementwise, in sigmas' dtype.

    Written in diffusers' operation order, so float32 numpy input gives diffusers' float32
    values and float64 input its float64 ones.
    """
    if not shift > 0:
        raise ValueError(f"flow shift must be > 0, got {shift!r}")
    dtype = np.asarray(sigmas).dtype.type
    return dtype(shift) * sigmas / (dtype(1) + dtype(shift - 1) * sigmas)


def training_sigma_table(shift: float, num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The N shifted training sigmas, (N,) float32, from 1 down to shift(1 / N).

    Equal bit for bit to FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
    .sigmas (its float32 table before set_timesteps).
    """
    n = num_train_timesteps
    if not (isinstance(n, int) and n > 0):
        raise ValueError(f"num_train_timesteps must be a positive int, got {n!r}")
    timesteps = np.linspace(1, n, n, dtype=np.float32)[::-1]
    return shift_sigmas(timesteps / np.float32(n), shift)


def sample_training_sigmas(rng: jax.Array, batch_size: int, sigma_table: jax.Array,
                           density: str = "uniform", logit_mean: float = 0.0,
                           logit_std: float = 1.0) -> jax.Array:
    """Per-sample training sigmas, (batch_size,) float32, drawn from `sigma_table` (N,).

    u ~ density on [0, 1) ("uniform", or "logit_normal": sigmoid of N(logit_mean,
    logit_std^2)), then sigma = sigma_table[floor(u N)]. The timestep for the model is
    `timesteps_from_sigmas(sigma)`.
    """
    if density == "uniform":
        u = jax.random.uniform(rng, (batch_size,), jnp.float32)
    elif density == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch_size,), jnp.float32))
    else:
        raise ValueError(f"unknown flow timestep density {density!r}; expected one of {TIMESTEP_DENSITIES}")
    n = sigma_table.shape[0]
    index = jnp.clip((u * n).astype(jnp.int32), 0, n - 1)  # sigmoid may round to 1.0
    return sigma_table[index]


def timesteps_from_sigmas(sigmas: jax.Array,
                          num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """The model's timestep sigma * N, float32 of sigmas' shape (fractional, as diffusers')."""
    return jnp.asarray(sigmas, jnp.float32) * np.float32(num_train_timesteps)


def add_flow_noise(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """x_t = (1 - sigma) x0 + sigma noise (diffusers' `scale_noise`).

    Args: x0, noise (B, ...); sigmas (B,) or a scalar. Returns x_t (B, ...) in x0's dtype.
    """
    sigma = broadcast_to_batch(jnp.asarray(sigmas, jnp.float32), x0.ndim)
    x_t = sigma * noise.astype(jnp.float32) + (1.0 - sigma) * x0.astype(jnp.float32)
    return x_t.astype(x0.dtype)


def flow_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The velocity the model is trained to predict: noise - x0, (B, ...) in x0's dtype."""
    return (noise.astype(jnp.float32) - x0.astype(jnp.float32)).astype(x0.dtype)


def flow_predict_x0(velocity: jax.Array, x_t: jax.Array, sigmas: jax.Array) -> jax.Array:
    """The clean sample a velocity prediction implies: x_t - sigma v, (B, ...) float32."""
    sigma = broadcast_to_batch(jnp.asarray(sigmas, jnp.float32), x_t.ndim)
    return x_t.astype(jnp.float32) - sigma * velocity.astype(jnp.float32)


@struct.dataclass
class FlowSchedule:
    """Rectified flow as the train step sees a schedule (the interface ``NoiseSchedule``
    also implements, see ``TrainingSchedule`` in diffusion/kinds.py); a pytree.

    sigmas: (N,) the shifted training table (``training_sigma_table``). A per-example
    "timestep" here is its sigma (float32); the model gets ``sigma * N``.
    shift, density, logit_mean, logit_std: static (shift is the samplers' too).
    """

    sigmas: jax.Array
    shift: float = struct.field(pytree_node=False, default=1.0)
    density: str = struct.field(pytree_node=False, default="uniform")
    logit_mean: float = struct.field(pytree_node=False, default=0.0)
    logit_std: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, shift: float = 1.0, num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS,
               density: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0) -> "FlowSchedule":
        if density not in TIMESTEP_DENSITIES:
            raise ValueError(f"unknown flow timestep density {density!r}; expected one of {TIMESTEP_DENSITIES}")
        if not logit_std > 0:
            raise ValueError(f"flow logit_std must be > 0, got {logit_std!r}")
        table = jnp.asarray(training_sigma_table(shift, num_train_timesteps))
        return cls(table, float(shift), density, float(logit_mean), float(logit_std))

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def sample_training_timesteps(self, rng: jax.Array) -> jax.Array:
        """One training sigma, () float32 (``sample_training_sigmas``)."""
        return sample_training_sigmas(rng, 1, self.sigmas, self.density, self.logit_mean, self.logit_std)[0]

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        return add_flow_noise(x0, noise, t)

    def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: str) -> jax.Array:
        if prediction_type != FLOW_PREDICTION:
            raise ValueError(f"diffusion.kind='flow' trains the velocity: diffusion.prediction_type must be "
                             f"{FLOW_PREDICTION!r}, got {prediction_type!r}")
        return flow_target(x0, noise)

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        return timesteps_from_sigmas(t, self.num_train_timesteps)

    def min_snr_loss_weights(self, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
        raise ValueError(f"train.min_snr_gamma={gamma}: min-SNR weighting is implemented for DDPM schedules "
                         "only; diffusion.kind='flow' trains unweighted (set train.min_snr_gamma=0)")
