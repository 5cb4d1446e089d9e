"""Samplers as pure step functions: DDIM, DPM-Solver++ 2M and Euler, equal to diffusers
(the flow-matching samplers of velocity models, same interface: flow_samplers.py).

Each sampler is a pytree (flax struct dataclass) of per-step tables computed once on the
host, exactly as diffusers' `set_timesteps` computes them, plus static options. Its
`step` is pure, so a whole denoising loop compiles into one XLA program:

    sampler = make_sampler("ddim", schedule, 30, prediction_type="v_prediction",
                           timestep_spacing="trailing")
    x = sampler.initial_latents(noise)            # noise * init_noise_sigma
    state = sampler.init_state(x)
    for i in range(sampler.num_inference_steps):  # or lax.fori_loop / sample_loop
        out = unet(sampler.scale_model_input(x, i), sampler.timesteps[i])
        x, state = sampler.step(state, i, out, x)

Shapes: latents x (B, ...) with the batch first ((B, h, w, C) or (B, F, h, w, C));
model outputs have x's shape; `i` is the step index 0 .. T-1 (a Python or traced int).
Arithmetic is float32 in the order diffusers uses; the result is cast to x's dtype.
Built from a diffusers config, the tables equal diffusers' bit for bit (see schedule.py);
the steps agree to rounding, not bit for bit: XLA fuses a * b + c into one FMA and
computes x / s for a scalar s as x * (1 / s), and torch's float32 sqrt (MKL) is off by
up to 0.75 ulp, so each step differs by a few ulps of its terms (1e-5 relative is the
tested bar, more only where a step cancels: see EulerSampler).
`sampler.timesteps` is int32 for DDIM / DPM-Solver and float32 for Euler (fractional for
linspace spacing or Karras sigmas, as diffusers' float timesteps); pass it to the model
as is. Samplers are pytrees: pass them into `jit` as arguments (static options are
metadata, so each configuration and step count compiles once).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from consist_jax.diffusion.flow_samplers import FLOW_SAMPLER_CLASSES
from consist_jax.diffusion.sampler_base import SamplerMethods, SamplerState, as_float32, next_state
from consist_jax.diffusion.schedule import NoiseSchedule, x0_and_epsilon_from_scales

SAMPLERS = ("ddim", "dpmpp_2m", "euler", "flow_euler", "flow_unipc")  # flow_*: flow_samplers.py
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' per-class default spacing (a config without the key gets these; the flow
# samplers ignore it).
DEFAULT_SPACING = {"ddim": "leading", "dpmpp_2m": "linspace", "euler": "linspace",
                   "flow_euler": "linspace", "flow_unipc": "linspace"}
# The prediction type make_sampler assumes when none is given.
DEFAULT_PREDICTION_TYPE = {"flow_euler": "flow_prediction", "flow_unipc": "flow_prediction"}
# diffusers clamps abar at the last timestep of a zero-terminal-SNR schedule to this in
# the sigma-based schedulers, so sigma = sqrt((1 - abar) / abar) stays finite (4096).
ZERO_SNR_ALPHA_BAR = 2.0**-24


# ----------------------------------------------------------------------------------
# Timesteps (diffusers' set_timesteps, per scheduler)
# ----------------------------------------------------------------------------------


def set_timesteps(sampler: str, num_train_timesteps: int, num_inference_steps: int,
                  timestep_spacing: str, steps_offset: int = 0) -> np.ndarray:
    """The model timesteps of each inference step, (T,), as diffusers' `set_timesteps`.

    ddim / dpmpp_2m: int64, from DDIMScheduler / DPMSolverMultistepScheduler.
    euler: float32 (linspace spacing gives fractional timesteps, as in diffusers).
    `steps_offset` applies to "leading" spacing only (as in diffusers). With Karras
    sigmas the samplers replace these (see their `create`); `sampler.timesteps` is what
    the model must be called with.
    """
    n_train, n = num_train_timesteps, num_inference_steps
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected {TIMESTEP_SPACINGS}")
    if n > n_train:
        raise ValueError(f"num_inference_steps {n} > num_train_timesteps {n_train}")
    if sampler == "ddim":
        return _ddim_timesteps(n_train, n, timestep_spacing, steps_offset)
    if sampler == "dpmpp_2m":
        return _dpm_solver_timesteps(n_train, n, timestep_spacing, steps_offset)
    if sampler == "euler":
        return _euler_timesteps(n_train, n, timestep_spacing, steps_offset)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")


def _trailing(n_train: int, n: int) -> np.ndarray:
    # Same float arange as diffusers, so odd step counts give the same (rounded) values.
    return np.round(np.arange(n_train, 0, -n_train / n)) - 1


def _ddim_timesteps(n_train, n, spacing, steps_offset):
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n) * (n_train // n))[::-1].astype(np.int64) + steps_offset
    return _trailing(n_train, n).astype(np.int64)


def _dpm_solver_timesteps(n_train, n, spacing, steps_offset):
    # DPM-Solver spaces n + 1 points and drops the last (t = 0) for linspace / leading.
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        step = n_train // (n + 1)
        return (np.arange(n + 1) * step)[::-1][:-1].astype(np.int64) + steps_offset
    return _trailing(n_train, n).astype(np.int64)


def _euler_timesteps(n_train, n, spacing, steps_offset):
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(n) * (n_train // n))[::-1].astype(np.float32) + np.float32(steps_offset)
    return _trailing(n_train, n).astype(np.float32)


# ----------------------------------------------------------------------------------
# Sigma tables (host, numpy; float32 where diffusers is float32)
# ----------------------------------------------------------------------------------


def _alphas_cumprod_for_sigmas(schedule: NoiseSchedule) -> np.ndarray:
    """abar as float32 numpy, with a zero terminal abar clamped like diffusers does."""
    alpha_bar = np.array(schedule.alphas_cumprod, dtype=np.float32)
    if alpha_bar[-1] == 0.0:
        alpha_bar[-1] = ZERO_SNR_ALPHA_BAR
    return alpha_bar


def _train_sigmas(alpha_bar: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar) / abar) per training timestep, (N,) float32."""
    return np.sqrt((1 - alpha_bar) / alpha_bar)


def _sigma_at_first_train_step(alpha_bar: np.ndarray) -> np.float32:
    return np.sqrt((1 - alpha_bar[0]) / alpha_bar[0])


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas from sigma_max down to sigma_min, (T,) float64."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def timesteps_for_sigmas(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of the given sigmas, (T,) float64.

    Linear interpolation of the timestep index in log-sigma, clamped to [0, N-1]
    (diffusers' `_sigma_to_t`; train_sigmas increase with t).
    """
    log_train_sigmas = np.log(train_sigmas).astype(np.float64)
    log_sigmas = np.log(np.maximum(sigmas, 1e-10))
    return np.interp(log_sigmas, log_train_sigmas, np.arange(len(train_sigmas), dtype=np.float64))


def _final_sigma(final_sigmas_type: str, alpha_bar: np.ndarray):
    """Sigma after the last step: 0 (denoise fully) or the smallest training sigma."""
    if final_sigmas_type == "zero":
        return 0.0
    if final_sigmas_type == "sigma_min":
        return _sigma_at_first_train_step(alpha_bar)
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")


# ----------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------


@struct.dataclass
class DDIMSampler(SamplerMethods):
    """DDIM (Song et al. 2021), equal to diffusers' DDIMScheduler (no thresholding).

    timesteps:         (T,) int32 model timestep at each step.
    alpha_bar:         (T,) float32 abar at the step's timestep.
    alpha_bar_prev:    (T,) float32 abar at t - N // T (the "final alpha" when < 0).
    """

    timesteps: jax.Array
    alpha_bar: jax.Array
    alpha_bar_prev: jax.Array
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    eta: float = struct.field(pytree_node=False, default=0.0)
    clip_sample: bool = struct.field(pytree_node=False, default=False)
    clip_sample_range: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, schedule: NoiseSchedule, num_inference_steps: int, *,
               prediction_type: str = "epsilon", timestep_spacing: str = "leading",
               steps_offset: int = 0, eta: float = 0.0, set_alpha_to_one: bool = True,
               clip_sample: bool = False, clip_sample_range: float = 1.0) -> "DDIMSampler":
        """Tables as diffusers' DDIMScheduler.set_timesteps.

        set_alpha_to_one: after the last step use abar = 1 (True, diffusers' default)
        or abar_0 (False, SD-1.5's config). clip_sample: clip x0 to +-clip_sample_range
        (off, as SD). eta > 0 adds noise and needs `rng` in `step`.
        """
        alpha_bar = np.asarray(schedule.alphas_cumprod, np.float32)
        n_train = schedule.num_train_timesteps
        timesteps = set_timesteps("ddim", n_train, num_inference_steps, timestep_spacing, steps_offset)
        # diffusers steps to t - N // T, not to the next listed timestep (they differ for
        # trailing spacing when T does not divide N); mirror it.
        prev = timesteps - n_train // num_inference_steps
        final = np.float32(1.0) if set_alpha_to_one else alpha_bar[0]
        alpha_bar_prev = np.where(prev >= 0, alpha_bar[np.maximum(prev, 0)], final)
        return cls(timesteps=jnp.asarray(timesteps, jnp.int32),
                   alpha_bar=jnp.asarray(alpha_bar[timesteps]),
                   alpha_bar_prev=jnp.asarray(alpha_bar_prev, jnp.float32),
                   prediction_type=prediction_type, eta=float(eta),
                   clip_sample=bool(clip_sample), clip_sample_range=float(clip_sample_range))

    def step(self, state: SamplerState, i, model_output: jax.Array, x: jax.Array,
             rng: Optional[jax.Array] = None):
        """One DDIM step from x at step i. Returns (x_prev (B, ...), new state)."""
        alpha_t, alpha_prev = self.alpha_bar[i], self.alpha_bar_prev[i]
        beta_t, beta_prev = 1 - alpha_t, 1 - alpha_prev
        sample, output = as_float32(x), as_float32(model_output)
        x0, eps = x0_and_epsilon_from_scales(output, sample, jnp.sqrt(alpha_t), jnp.sqrt(beta_t),
                                             self.prediction_type)
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        variance = (beta_prev / beta_t) * (1 - alpha_t / alpha_prev)
        std = self.eta * jnp.sqrt(variance)
        x_prev = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev - std**2) * eps
        if self.eta > 0:
            if rng is None:
                raise ValueError("DDIM with eta > 0 needs an rng key per step")
            x_prev = x_prev + std * jax.random.normal(rng, x.shape, jnp.float32)
        return x_prev.astype(x.dtype), next_state(state, x0)


# ----------------------------------------------------------------------------------
# DPM-Solver++ 2M
# ----------------------------------------------------------------------------------


@struct.dataclass
class DPMSolverPP2MSampler(SamplerMethods):
    """Multistep DPM-Solver++ (order 2, midpoint), equal to diffusers'
    DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2).

    timesteps:    (T,) int32 model timestep at each step.
    sigmas:       (T + 1,) float32 sigma = sqrt((1 - abar) / abar) at each step, then
                  the final sigma (0 for final_sigmas_type="zero").
    first_order:  (T,) bool, steps forced to first order (lower_order_final / final sigma 0).
    """

    timesteps: jax.Array
    sigmas: jax.Array
    first_order: jax.Array
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @classmethod
    def create(cls, schedule: NoiseSchedule, num_inference_steps: int, *,
               prediction_type: str = "epsilon", timestep_spacing: str = "linspace",
               steps_offset: int = 0, solver_order: int = 2, use_karras_sigmas: bool = False,
               lower_order_final: bool = True, euler_at_final: bool = False,
               final_sigmas_type: str = "zero") -> "DPMSolverPP2MSampler":
        """Tables as diffusers' DPMSolverMultistepScheduler.set_timesteps (solver_order 1 or 2)."""
        if solver_order not in (1, 2):
            raise NotImplementedError("only solver_order 1 or 2 is implemented")
        alpha_bar = _alphas_cumprod_for_sigmas(schedule)
        train_sigmas = _train_sigmas(alpha_bar)
        timesteps = set_timesteps("dpmpp_2m", schedule.num_train_timesteps, num_inference_steps,
                                  timestep_spacing, steps_offset)
        if use_karras_sigmas:
            sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), num_inference_steps)
            timesteps = timesteps_for_sigmas(sigmas, train_sigmas)
            if schedule.beta_schedule != "squaredcos_cap_v2":  # diffusers' rule (else truncates)
                timesteps = timesteps.round()
        else:
            sigmas = train_sigmas[timesteps]
        sigmas = np.append(sigmas, _final_sigma(final_sigmas_type, alpha_bar)).astype(np.float32)
        n = len(timesteps)
        last = np.arange(n) == n - 1
        force_first = euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero"
        first_order = (np.arange(n) == 0) | (last & force_first) | (solver_order == 1)
        return cls(timesteps=jnp.asarray(timesteps.astype(np.int64), jnp.int32),
                   sigmas=jnp.asarray(sigmas), first_order=jnp.asarray(first_order),
                   prediction_type=prediction_type)

    def step(self, state: SamplerState, i, model_output: jax.Array, x: jax.Array,
             rng: Optional[jax.Array] = None):
        """One DPM-Solver++ step from x at step i. Returns (x_prev (B, ...), new state).

        The first step after `init_state` and the steps in `first_order` are first order
        (DDIM-like); the rest use the previous x0 prediction kept in the state.
        """
        del rng  # deterministic solver
        sample, output = as_float32(x), as_float32(model_output)
        alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(self.sigmas[i + 1])
        lambda_s1 = _alpha_sigma_lambda(self.sigmas[jnp.maximum(i - 1, 0)])[2]
        x0, _ = x0_and_epsilon_from_scales(output, sample, alpha_s0, sigma_s0, self.prediction_type)
        h = lambda_t - lambda_s0
        x0_coef = alpha_t * (jnp.exp(-h) - 1.0)
        x_prev = (sigma_t / sigma_s0) * sample - x0_coef * x0
        # Second-order correction -0.5 * x0_coef * D1, D1 = (x0 - x0_prev) / r0. Select the
        # scalar coefficient, not the array: where the step is first order r0 may be 0
        # (first step) or h infinite (final sigma 0), and the coefficient is then inf.
        r0 = (lambda_s0 - lambda_s1) / h
        use_first = self.first_order[i] | (state.steps_taken == 0)
        correction = jnp.where(use_first, 0.0, 0.5 * x0_coef / jnp.where(use_first, 1.0, r0))
        x_prev = x_prev - correction * (x0 - state.pred_original_sample)
        return x_prev.astype(x.dtype), next_state(state, x0)


def _alpha_sigma_lambda(sigma):
    """(alpha_t, sigma_t, log(alpha_t / sigma_t)) of the VP process with this sigma ratio."""
    alpha = 1 / jnp.sqrt(sigma**2 + 1)
    sigma_vp = sigma * alpha
    return alpha, sigma_vp, jnp.log(alpha) - jnp.log(sigma_vp)


# ----------------------------------------------------------------------------------
# Euler
# ----------------------------------------------------------------------------------


@struct.dataclass
class EulerSampler(SamplerMethods):
    """Euler on the sigma ODE (Karras et al.), equal to diffusers' EulerDiscreteScheduler
    (no churn, linear interpolation).

    Numerics: where the first step falls from a huge sigma_max (4096 with zero terminal
    SNR, ~2e4 for squaredcos_cap_v2 with linspace / trailing spacing) to a sigma R times
    smaller (R ~ 900 for the cosine schedule at 37 steps), diffusers' update
    x + (x - x0) / sigma * dt cancels terms R times larger than its result, so one ulp
    of rounding there is R ulps of the result, in diffusers as here (and carried by the
    later steps). We keep its formula so the two agree to those rounding differences.

    timesteps:         (T,) float32 model timestep at each step (fractional for linspace
                       spacing or Karras sigmas, as in diffusers).
    sigmas:            (T + 1,) float32 sigma at each step, then the final sigma.
    init_noise_sigma:  () float32, the scale of x_T.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @classmethod
    def create(cls, schedule: NoiseSchedule, num_inference_steps: int, *,
               prediction_type: str = "epsilon", timestep_spacing: str = "linspace",
               steps_offset: int = 0, use_karras_sigmas: bool = False,
               final_sigmas_type: str = "zero") -> "EulerSampler":
        """Tables as diffusers' EulerDiscreteScheduler.set_timesteps."""
        alpha_bar = _alphas_cumprod_for_sigmas(schedule)
        train_sigmas = _train_sigmas(alpha_bar)
        timesteps = set_timesteps("euler", schedule.num_train_timesteps, num_inference_steps,
                                  timestep_spacing, steps_offset)
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        if use_karras_sigmas:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
            timesteps = timesteps_for_sigmas(sigmas, train_sigmas)
        sigmas = np.append(sigmas, _final_sigma(final_sigmas_type, alpha_bar)).astype(np.float32)
        max_sigma = sigmas.max()
        # diffusers: x_T ~ N(0, sigma_max^2) except for "leading", which uses sigma^2 + 1.
        init_sigma = max_sigma if timestep_spacing in ("linspace", "trailing") else np.sqrt(max_sigma**2 + 1)
        return cls(timesteps=jnp.asarray(timesteps, jnp.float32), sigmas=jnp.asarray(sigmas),
                   init_noise_sigma=jnp.asarray(init_sigma, jnp.float32),
                   prediction_type=prediction_type)

    def scale_model_input(self, x: jax.Array, i) -> jax.Array:
        """x / sqrt(sigma_i^2 + 1): the VP-scaled input the UNet was trained on."""
        sigma = self.sigmas[i]
        return (as_float32(x) / jnp.sqrt(sigma**2 + 1)).astype(x.dtype)

    def step(self, state: SamplerState, i, model_output: jax.Array, x: jax.Array,
             rng: Optional[jax.Array] = None):
        """One Euler step from sigma_i to sigma_{i+1}. Returns (x_prev (B, ...), new state)."""
        del rng  # no churn: deterministic
        sample, output = as_float32(x), as_float32(model_output)
        sigma = self.sigmas[i]
        if self.prediction_type == "epsilon":
            x0 = sample - sigma * output
        elif self.prediction_type == "v_prediction":
            x0 = output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
        elif self.prediction_type == "sample":
            x0 = output
        else:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}")
        derivative = (sample - x0) / sigma
        x_prev = sample + derivative * (self.sigmas[i + 1] - sigma)
        return x_prev.astype(x.dtype), next_state(state, x0)


# ----------------------------------------------------------------------------------
# Construction and the loop
# ----------------------------------------------------------------------------------

_SAMPLER_CLASSES = {"ddim": DDIMSampler, "dpmpp_2m": DPMSolverPP2MSampler, "euler": EulerSampler}


def _sampler_class(name: str):
    """The class of a sampler name (the flow samplers live in flow_samplers.py)."""
    return {**_SAMPLER_CLASSES, **FLOW_SAMPLER_CLASSES}[name]


def make_sampler(name: str, schedule: Optional[NoiseSchedule], num_inference_steps: int, *,
                 prediction_type: Optional[str] = None, timestep_spacing: Optional[str] = None,
                 steps_offset: int = 0, **options):
    """Build a sampler: "ddim", "dpmpp_2m", "euler", or for rectified-flow (velocity)
    models "flow_euler" / "flow_unipc" (flow_samplers.py; they take no `schedule`).

    timestep_spacing: "leading" | "trailing" | "linspace"; None takes diffusers' default
        for that scheduler class (ddim: leading, dpmpp_2m / euler: linspace).
    prediction_type: None takes "epsilon" ("flow_prediction" for the flow samplers).
    options: the sampler's own keywords, see DDIMSampler.create (eta, set_alpha_to_one,
        clip_sample, clip_sample_range), DPMSolverPP2MSampler.create (use_karras_sigmas,
        lower_order_final, euler_at_final, final_sigmas_type, solver_order),
        EulerSampler.create (use_karras_sigmas, final_sigmas_type), FlowEulerSampler.create
        (shift, num_train_timesteps) and FlowUniPCSampler.create (flow_shift, solver_order,
        solver_type, lower_order_final, final_sigmas_type, disable_corrector, ...).
    Runs on the host (numpy); call it outside jit and pass the result in.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLERS}")
    spacing = timestep_spacing or DEFAULT_SPACING[name]
    prediction_type = prediction_type or DEFAULT_PREDICTION_TYPE.get(name, "epsilon")
    return _sampler_class(name).create(schedule, num_inference_steps, prediction_type=prediction_type,
                                       timestep_spacing=spacing, steps_offset=steps_offset, **options)


# Scheduler-config keys each sampler understands (everything else in the config is ignored).
_CONFIG_KEYS = {
    "ddim": ("prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one",
             "clip_sample", "clip_sample_range"),
    "dpmpp_2m": ("prediction_type", "timestep_spacing", "steps_offset", "use_karras_sigmas",
                 "lower_order_final", "euler_at_final", "final_sigmas_type", "solver_order"),
    "euler": ("prediction_type", "timestep_spacing", "steps_offset", "use_karras_sigmas",
              "final_sigmas_type"),
    "flow_euler": ("shift", "num_train_timesteps"),
    "flow_unipc": ("prediction_type", "flow_shift", "num_train_timesteps", "solver_order", "solver_type",
                   "lower_order_final", "final_sigmas_type", "disable_corrector", "use_flow_sigmas"),
}
# diffusers' DDIMScheduler defaults to clip_sample=True; SD checkpoints switch it off. Its
# UniPCMultistepScheduler defaults to a DDPM schedule (which flow_unipc refuses by name).
_DIFFUSERS_CLASS_DEFAULTS = {"ddim": {"clip_sample": True},
                             "flow_unipc": {"prediction_type": "epsilon", "use_flow_sigmas": False}}


# Config values whose non-default settings these samplers do not implement.
_UNSUPPORTED = {
    "ddim": {"thresholding": False},
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "thresholding": False,
                 "use_lu_lambdas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                 "use_flow_sigmas": False, "lambda_min_clipped": -float("inf"), "variance_type": None},
    "euler": {"interpolation_type": "linear", "timestep_type": "discrete", "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None},
    "flow_euler": {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
                   "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                   "stochastic_sampling": False},
    "flow_unipc": {"predict_x0": True, "thresholding": False, "solver_p": None, "use_karras_sigmas": False,
                   "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_dynamic_shifting": False,
                   "shift_terminal": None},
}


def sampler_options_from_diffusers_config(name: str, config: Mapping[str, Any]) -> dict:
    """make_sampler keywords from a diffusers scheduler_config.json dict.

    Keys the config leaves out take the diffusers class defaults (as `from_config` would),
    so `make_sampler(name, schedule, T, **sampler_options_from_diffusers_config(name, cfg))`
    behaves as diffusers' scheduler of that kind loaded from the same config. Raises
    NotImplementedError for settings these samplers do not implement (e.g. thresholding).
    """
    for key, default in _UNSUPPORTED[name].items():
        if config.get(key, default) != default:
            raise NotImplementedError(f"{name}: {key}={config[key]!r} is not implemented")
    options = dict(_DIFFUSERS_CLASS_DEFAULTS.get(name, {}))
    options.update({k: config[k] for k in _CONFIG_KEYS[name] if config.get(k) is not None})
    return options


def sample_loop(sampler, model_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array,
                rng: Optional[jax.Array] = None, progress: Optional[Callable[[], None]] = None) -> jax.Array:
    """Run the whole denoising loop in one `lax.fori_loop`.

    model_fn(model_input (B, ...), timestep () int32 / float32) -> model output (B, ...),
        e.g. a UNet call wrapped with classifier-free guidance.
    noise: (B, ...) unit Gaussian noise; the loop scales it by init_noise_sigma.
    rng: needed only by stochastic samplers (DDIM eta > 0); folded with the step index.
    progress: a host function called after every step (a progress bar); it does not
        change the result.
    Returns the final latents x_0 (B, ...).
    """
    x = sampler.initial_latents(noise)

    def body(i, carry):
        x, state = carry
        model_output = model_fn(sampler.scale_model_input(x, i), sampler.timesteps[i])
        step_rng = None if rng is None else jax.random.fold_in(rng, i)
        carry = sampler.step(state, i, model_output, x, step_rng)
        if progress is not None:
            jax.debug.callback(progress)
        return carry

    x, _ = jax.lax.fori_loop(0, sampler.num_inference_steps, body, (x, sampler.init_state(x)))
    return x
