"""Noise schedules, the forward process, training targets and SNR weights.

Everything here matches diffusers' DDPM/DDIM conventions:
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,      abar_t = prod_{s<=t} (1 - beta_s)
    v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0
with integer training timesteps t in [0, num_train_timesteps).

Conventions: latents are float arrays with the batch first, any further shape
((B, h, w, C) images, (B, F, h, w, C) videos); timesteps are integer arrays of shape
(B,) (or scalars) and broadcast over the non-batch axes. All functions are pure JAX
and may be used inside `jit`, `scan` and `fori_loop`; only the schedule
construction (`NoiseSchedule.create`) runs on the host, in numpy.

Precision: by default the tables are built with diffusers' float32 arithmetic, bit for
bit (torch's CPU linspace with its fused multiply-adds, float32 `1 - beta`, torch's CPU
cumprod that accumulates in float64 and rounds every element to float32), so samplers
built from a diffusers scheduler config step as diffusers does. `precision="float64"`
builds them in float64 and rounds once: closer to the exact schedule, but up to ~1e-6
relative from diffusers' table, which near t = 0 becomes ~1e-4 in 1 - abar.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PRECISIONS = ("float32", "float64")  # diffusers' float32 arithmetic, or float64 rounded once

# diffusers' scheduler defaults, used for keys a scheduler_config.json leaves out.
_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


# ----------------------------------------------------------------------------------
# Host-side construction (numpy; float32 as diffusers, or float64 rounded once)
# ----------------------------------------------------------------------------------


def make_betas(beta_schedule: str, beta_start: float, beta_end: float,
               num_train_timesteps: int, precision: str = "float32") -> np.ndarray:
    """Betas of a named schedule, (num_train_timesteps,) in `precision`'s dtype.

    linear: evenly spaced betas; scaled_linear: evenly spaced sqrt(betas) (SD-1.5 uses
    0.00085 .. 0.012); squaredcos_cap_v2: the cosine alpha-bar of Nichol & Dhariwal
    with betas capped at 0.999 (beta_start / beta_end are ignored). "float32" gives
    diffusers' float32 betas bit for bit.
    """
    _check_precision(precision)
    n = num_train_timesteps
    linspace = _torch_linspace_float32 if precision == "float32" else _linspace_float64
    if beta_schedule == "linear":
        return linspace(beta_start, beta_end, n)
    if beta_schedule == "scaled_linear":
        return linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return _cosine_betas(n).astype(precision)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES}")


def _linspace_float64(start: float, end: float, n: int) -> np.ndarray:
    return np.linspace(start, end, n, dtype=np.float64)


def _torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on CPU, bit for bit, (n,) float32.

    torch rounds the ends and the step to float32, fills the first half as
    start + step * i and the second as end - step * (n - 1 - i), each a fused
    multiply-add (one rounding). The float64 products and sums below are exact for
    schedule-sized ranges (24-bit step times i < 2**24), so rounding them to float32
    once reproduces the fused result.
    """
    first, last = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([first], np.float32)
    step = np.float64((last - first) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    half = n // 2
    values = np.where(i < half, np.float64(first) + step * i, np.float64(last) - step * (n - 1 - i))
    return values.astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas discretising abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), s in [0, 1], (N,) float64.

    diffusers' Python loop (math.cos, not numpy's vectorised cos, which may differ by an
    ulp), so the float32 rounding of these equals diffusers' float32 betas.
    """
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _cumprod(alphas: np.ndarray) -> np.ndarray:
    """Cumulative product in alphas' dtype; float32 as torch's CPU cumprod does it (a float64
    running product rounded to float32 per element; numpy's float32 cumprod differs)."""
    return np.cumprod(alphas.astype(np.float64)).astype(alphas.dtype)


def rescale_zero_terminal_snr(betas: np.ndarray, sqrt=np.sqrt) -> np.ndarray:
    """Rescale betas so that the last timestep has SNR exactly 0 (Lin et al. 2023, Alg. 1).

    Shifts and scales sqrt(abar) so that sqrt(abar_0) is unchanged and sqrt(abar_T) = 0.
    Args: betas (N,) float32 (diffusers' arithmetic, op for op) or float64; sqrt: the
    square root (correctly rounded; torch's float32 CPU sqrt is not, it is off by one ulp
    for ~1/4 of the values on MKL builds, so diffusers' rescaled table differs from this
    one by a few ulps; tests pass torch's sqrt to check the rest bit for bit).
    Returns: (N,) betas of the same dtype, the last one equal to 1.
    """
    betas = np.asarray(betas)
    betas = betas if betas.dtype in (np.float32, np.float64) else betas.astype(np.float64)
    one = betas.dtype.type(1)
    sqrt_alpha_bar = sqrt(_cumprod(one - betas))
    first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return one - alphas


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown schedule precision {precision!r}; expected one of {PRECISIONS}")


@struct.dataclass
class NoiseSchedule:
    """A discrete DDPM noise schedule; a pytree of float32 arrays.

    betas:          (N,) beta_t.
    alphas_cumprod: (N,) abar_t = prod_{s<=t} (1 - beta_s). With zero-terminal-SNR
                    rescaling abar_{N-1} is exactly 0 (as in diffusers' DDPM/DDIM; the
                    DPM-Solver and Euler samplers clamp it to 2**-24 themselves).
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod: (N,) sqrt(abar_t), sqrt(1 - abar_t),
                    evaluated in the construction's precision (float32: as diffusers'
                    add_noise does; float64: 1 - abar without the float32 cancellation
                    near t = 0).
    beta_schedule:  the schedule's name (static metadata; "trained" for explicit betas).
                    Samplers need it for one diffusers rule (Karras timesteps are not
                    rounded for squaredcos_cap_v2).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    beta_schedule: str = struct.field(pytree_node=False, default="trained")

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @classmethod
    def create(cls, beta_schedule: str = "scaled_linear", beta_start: float = 0.00085,
               beta_end: float = 0.012, num_train_timesteps: int = 1000,
               rescale_betas_zero_snr: bool = False, trained_betas=None,
               precision: str = "float32") -> "NoiseSchedule":
        """Build a schedule (defaults: SD-1.5's scaled_linear 0.00085 .. 0.012, 1000 steps).

        precision: "float32" (default) builds every table with diffusers' float32
        arithmetic, bit for bit; "float64" computes them in float64 and rounds once (more
        accurate near t = 0, where diffusers' float32 abar carries ~1e-6 relative error).
        `trained_betas` (N,), when given, replaces the named schedule.
        """
        _check_precision(precision)
        if trained_betas is not None:
            betas = np.asarray(trained_betas, np.float64).astype(precision)
            beta_schedule = "trained"
        else:
            betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, precision)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        # With zero-SNR rescaling the last beta is exactly 1, so abar_{N-1} is exactly 0.
        alphas_cumprod = _cumprod(betas.dtype.type(1) - betas)
        schedule = cls.from_alphas_cumprod(alphas_cumprod, beta_schedule, precision)
        return schedule.replace(betas=jnp.asarray(betas, jnp.float32))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod, beta_schedule: str = "trained",
                            precision: str = "float32") -> "NoiseSchedule":
        """Build from an explicit abar table (N,), e.g. another implementation's float32 one.

        The derived tables (betas, square roots) use `precision`'s arithmetic; "float32"
        rounds the table to float32 first.
        """
        _check_precision(precision)
        alphas_cumprod = np.asarray(alphas_cumprod, np.float64).astype(precision)
        one = alphas_cumprod.dtype.type(1)
        previous = np.concatenate([[one], alphas_cumprod[:-1]]).astype(precision)
        with np.errstate(divide="ignore", invalid="ignore"):
            alphas = alphas_cumprod / previous
        f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
        return cls(betas=f32(one - alphas), alphas_cumprod=f32(alphas_cumprod),
                   sqrt_alphas_cumprod=f32(np.sqrt(alphas_cumprod)),
                   sqrt_one_minus_alphas_cumprod=f32(np.sqrt(one - alphas_cumprod)),
                   beta_schedule=beta_schedule)

    @classmethod
    def from_config(cls, diffusion: Mapping[str, Any]) -> "NoiseSchedule":
        """From a run config's ``diffusion`` section (configs/common.py), as training and
        sampling both build it."""
        return cls.create(beta_schedule=diffusion["beta_schedule"], beta_start=diffusion["beta_start"],
                          beta_end=diffusion["beta_end"], num_train_timesteps=diffusion["num_train_timesteps"],
                          rescale_betas_zero_snr=diffusion["rescale_zero_terminal_snr"])

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], precision: str = "float32") -> "NoiseSchedule":
        """Build from a diffusers scheduler_config.json dict (missing keys: diffusers' defaults).

        With the default precision the tables equal those of the diffusers scheduler
        built from the same config, bit for bit.
        """
        cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}
        return cls.create(beta_schedule=cfg["beta_schedule"], beta_start=cfg["beta_start"],
                          beta_end=cfg["beta_end"], num_train_timesteps=cfg["num_train_timesteps"],
                          rescale_betas_zero_snr=cfg["rescale_betas_zero_snr"],
                          trained_betas=cfg["trained_betas"], precision=precision)

    # The train step's schedule interface (diffusion/kinds.py: TrainingSchedule; flow.py's
    # FlowSchedule has the same): the module functions below, with integer timesteps.
    def sample_training_timesteps(self, rng: jax.Array) -> jax.Array:
        """One training timestep, () int32 in [0, N)."""
        return sample_training_timesteps(rng, (), self.num_train_timesteps)

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        return add_noise(self, x0, noise, t)

    def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: str) -> jax.Array:
        return training_target(self, x0, noise, t, prediction_type)

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """The timesteps the denoiser gets: the integer t itself."""
        return t

    def min_snr_loss_weights(self, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
        return min_snr_loss_weights(self, t, gamma, prediction_type)


# ----------------------------------------------------------------------------------
# Per-timestep coefficients
# ----------------------------------------------------------------------------------


def broadcast_to_batch(values: jax.Array, ndim: int) -> jax.Array:
    """Reshape per-sample values (B,) (or a scalar) to (B, 1, ..., 1) with `ndim` axes."""
    values = jnp.asarray(values)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def signal_and_noise_scales(schedule: NoiseSchedule, t: jax.Array):
    """(sqrt(abar_t), sqrt(1 - abar_t)) for integer timesteps t; each of t's shape."""
    t = jnp.asarray(t, jnp.int32)
    return schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]


def _scales_like(schedule: NoiseSchedule, t: jax.Array, like: jax.Array):
    """Signal and noise scales at t, broadcastable against `like` (B, ...), float32."""
    signal, noise = signal_and_noise_scales(schedule, t)
    return broadcast_to_batch(signal, like.ndim), broadcast_to_batch(noise, like.ndim)


def _float32(x):
    return jnp.asarray(x, jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


# ----------------------------------------------------------------------------------
# Forward process and training targets
# ----------------------------------------------------------------------------------


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

    Args: x0, noise (B, ...); t (B,) int or scalar. Returns x_t (B, ...) in x0's dtype.
    """
    signal, sigma = _scales_like(schedule, t, x0)
    return (signal * _float32(x0) + sigma * _float32(noise)).astype(x0.dtype)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (diffusers' `get_velocity`). Shapes as add_noise."""
    signal, sigma = _scales_like(schedule, t, x0)
    return (signal * _float32(noise) - sigma * _float32(x0)).astype(x0.dtype)


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
                    prediction_type: str) -> jax.Array:
    """What the model should output at x_t = add_noise(x0, noise, t): noise, v or x0. (B, ...)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(schedule, x0, noise, t)
    return x0


def predict_x0_and_epsilon(schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array,
                           t: jax.Array, prediction_type: str):
    """Convert a model output at (x_t, t) to the predicted clean sample and noise.

    Args: model_output, x_t (B, ...); t (B,) int or scalar.
    Returns: (x0, eps), each (B, ...) float32. With epsilon prediction at abar_t = 0 the
    x0 is infinite (as in diffusers): zero-terminal-SNR schedules need v or x0 prediction.
    """
    _check_prediction_type(prediction_type)
    signal, sigma = _scales_like(schedule, t, x_t)
    return x0_and_epsilon_from_scales(_float32(model_output), _float32(x_t), signal, sigma,
                                      prediction_type)


def predict_x0(schedule, model_output, x_t, t, prediction_type) -> jax.Array:
    """The x0 half of `predict_x0_and_epsilon`. (B, ...) float32."""
    return predict_x0_and_epsilon(schedule, model_output, x_t, t, prediction_type)[0]


def x0_and_epsilon_from_scales(model_output, x_t, signal, sigma, prediction_type: str):
    """The prediction-type conversions given sqrt(abar) (`signal`) and sqrt(1-abar) (`sigma`).

    Operation order follows diffusers' DDIM step so samplers reproduce it to rounding.
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / signal, model_output
    if prediction_type == "v_prediction":
        return signal * x_t - sigma * model_output, signal * model_output + sigma * x_t
    if prediction_type == "sample":
        return model_output, (x_t - signal * model_output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


# ----------------------------------------------------------------------------------
# SNR and min-SNR loss weights
# ----------------------------------------------------------------------------------


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t), of t's shape (diffusers' `compute_snr`)."""
    signal, sigma = signal_and_noise_scales(schedule, t)
    return (signal / sigma) ** 2


def min_snr_loss_weights(schedule: NoiseSchedule, t: jax.Array, gamma: float,
                         prediction_type: str) -> jax.Array:
    """Min-SNR-gamma per-sample loss weights (Hang et al. 2023), of t's shape.

    The paper weights the x0-space loss by min(SNR, gamma); expressed for the model's own
    target that is, as in diffusers' train scripts:
        epsilon:       min(SNR, gamma) / SNR        (= 1 where SNR = 0, its limit)
        v_prediction:  min(SNR, gamma) / (SNR + 1)
        sample:        min(SNR, gamma)
    Multiply the per-sample mean squared error by these weights.
    """
    _check_prediction_type(prediction_type)
    ratio = snr(schedule, t)
    if prediction_type == "epsilon":
        # min(snr, g) / snr written so snr = 0 (zero terminal SNR) gives 1, not 0 / 0.
        return jnp.minimum(1.0, gamma / ratio)
    clipped = jnp.minimum(ratio, gamma)
    if prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped


# ----------------------------------------------------------------------------------
# Training noise and timesteps
# ----------------------------------------------------------------------------------


def sample_training_noise(rng: jax.Array, shape, offset: float = 0.0,
                          dtype=jnp.float32) -> jax.Array:
    """Gaussian training noise with an optional offset-noise term.

    noise = N(0, 1) of `shape` + offset * N(0, 1) of shape (B, 1, ..., 1, C): one value per
    sample and channel, broadcast over space (and frames), as the peers do in NCHW with
    (B, C, 1, 1[, 1]). Channels are last, e.g. shape (B, h, w, C) or (B, F, h, w, C).
    """
    shape = tuple(shape)
    noise_rng, offset_rng = jax.random.split(rng)
    noise = jax.random.normal(noise_rng, shape, jnp.float32)
    if offset:
        per_channel = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
        noise = noise + offset * jax.random.normal(offset_rng, per_channel, jnp.float32)
    return noise.astype(dtype)


def sample_training_timesteps(rng: jax.Array, shape, num_train_timesteps: int) -> jax.Array:
    """Uniform integer timesteps in [0, num_train_timesteps) of ``shape`` (an int, a
    tuple, or () for one), int32."""
    return jax.random.randint(rng, shape, 0, num_train_timesteps, dtype=jnp.int32)
