"""Samplers of rectified-flow models (Wan): flow-match Euler and UniPC in flow mode.

Same interface as samplers.py (built by `make_sampler`, pure `step`, `sample_loop`):

    sampler = make_sampler("flow_unipc", None, 50, **sampler_options_from_diffusers_config(
        "flow_unipc", wan_scheduler_config))
    x = sampler.initial_latents(noise)              # noise itself: x at sigma ~ 1
    state = sampler.init_state(x)
    for i in range(sampler.num_inference_steps):
        v = transformer(sampler.scale_model_input(x, i), sampler.timesteps[i])
        x, state = sampler.step(state, i, v, x)

The model predicts the velocity v = noise - x0 ("flow_prediction"), so x0 = x - sigma v.
There is no DDPM schedule: `make_sampler`'s `schedule` argument is not used, the sigmas
come from the shift (flow_shift) and num_train_timesteps, and the model timestep is
sigma * num_train_timesteps (float32 for Euler, truncated to int32 for UniPC, as diffusers).

Tables are built on the host with diffusers' own arithmetic (float64 where it uses numpy,
float32 where it uses torch), so timesteps and sigmas equal diffusers' bit for bit; the
steps run in float32 in diffusers' operation order and agree to rounding (see samplers.py).
Shapes: latents x (B, ...) with the batch first; model outputs have x's shape.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from consist_jax.diffusion.flow import FLOW_PREDICTION, WAN_NUM_TRAIN_TIMESTEPS, shift_sigmas
from consist_jax.diffusion.sampler_base import SamplerMethods, SamplerState, as_float32, next_state

UNIPC_SOLVER_TYPES = ("bh1", "bh2")
# diffusers moves a first flow sigma of 1 down by this (log(1 - sigma) must stay finite).
UNIPC_FIRST_SIGMA_EPS = 1e-6


def _check_flow_prediction(sampler: str, prediction_type: str) -> None:
    if prediction_type != FLOW_PREDICTION:
        raise ValueError(f"{sampler} samples velocity models: prediction_type must be "
                         f"{FLOW_PREDICTION!r}, got {prediction_type!r}")


def _check_steps(num_inference_steps, num_train_timesteps) -> None:
    for name, value in (("num_inference_steps", num_inference_steps),
                        ("num_train_timesteps", num_train_timesteps)):
        if not (isinstance(value, (int, np.integer)) and value > 0):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _x0_from_velocity(output, sample, sigma):
    """x0 = x - sigma v, in diffusers' order (float32)."""
    return sample - sigma * output


# ----------------------------------------------------------------------------------
# Flow-match Euler
# ----------------------------------------------------------------------------------


def flow_euler_sigmas(num_inference_steps: int, shift: float = 1.0,
                      num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(shift).set_timesteps(T).sigmas, (T + 1,) float32.

    diffusers spaces T points evenly between its shifted training table's ends (1 and
    shift(1 / N), both float32) and shifts those again (in float64): the shift applies
    twice, and we mirror it so the steps land where diffusers' do. The last sigma is 0.
    """
    _check_steps(num_inference_steps, num_train_timesteps)
    n = num_train_timesteps
    ends = shift_sigmas(np.array([n, 1], np.float32) / np.float32(n), shift)
    timesteps = np.linspace(float(ends[0]) * n, float(ends[1]) * n, num_inference_steps)
    sigmas = shift_sigmas(timesteps / n, shift).astype(np.float32)
    return np.append(sigmas, np.float32(0))


@struct.dataclass
class FlowEulerSampler(SamplerMethods):
    """Euler on the flow ODE dx/dsigma = v, equal to diffusers' FlowMatchEulerDiscreteScheduler
    (static shift, no dynamic shifting, no stochastic sampling).

    timesteps:  (T,) float32 model timestep sigma_i * N at each step.
    sigmas:     (T + 1,) float32 sigma at each step, then 0.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, schedule, num_inference_steps: int, *, prediction_type: str = FLOW_PREDICTION,
               timestep_spacing: Optional[str] = None, steps_offset: int = 0, shift: float = 1.0,
               num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS) -> "FlowEulerSampler":
        """Tables as diffusers' set_timesteps. `schedule`, `timestep_spacing` and
        `steps_offset` are not used (the class has none: its sigmas follow the shift)."""
        del schedule, timestep_spacing, steps_offset
        _check_flow_prediction("flow_euler", prediction_type)
        sigmas = flow_euler_sigmas(num_inference_steps, shift, num_train_timesteps)
        timesteps = sigmas[:-1] * np.float32(num_train_timesteps)  # float32, as torch
        return cls(timesteps=jnp.asarray(timesteps), sigmas=jnp.asarray(sigmas))

    def step(self, state: SamplerState, i, model_output: jax.Array, x: jax.Array,
             rng: Optional[jax.Array] = None):
        """x + (sigma_{i+1} - sigma_i) v. Returns (x_next (B, ...), new state)."""
        del rng  # deterministic
        sample, output = as_float32(x), as_float32(model_output)
        sigma = self.sigmas[i]
        x_next = sample + (self.sigmas[i + 1] - sigma) * output
        return x_next.astype(x.dtype), next_state(state, _x0_from_velocity(output, sample, sigma))


# ----------------------------------------------------------------------------------
# UniPC (flow sigmas)
# ----------------------------------------------------------------------------------


def _unipc_flow_sigmas_float64(num_inference_steps: int, flow_shift: float,
                               num_train_timesteps: int) -> np.ndarray:
    """diffusers' float64 flow sigmas before the final one, (T,): T shifted points of
    linspace(1, 1 / N, T + 1)[:-1], a first sigma of 1 moved down by 1e-6."""
    _check_steps(num_inference_steps, num_train_timesteps)
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, flow_shift)
    if np.fabs(sigmas[0] - 1) < UNIPC_FIRST_SIGMA_EPS:
        sigmas[0] -= UNIPC_FIRST_SIGMA_EPS
    return sigmas


def unipc_flow_sigmas(num_inference_steps: int, flow_shift: float = 1.0,
                      num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS,
                      final_sigmas_type: str = "zero") -> np.ndarray:
    """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift).set_timesteps(T).sigmas,
    (T + 1,) float32: the flow sigmas, then 0 ("zero") or the last of them ("sigma_min")."""
    sigmas = _unipc_flow_sigmas_float64(num_inference_steps, flow_shift, num_train_timesteps)
    if final_sigmas_type == "zero":
        last = 0.0
    elif final_sigmas_type == "sigma_min":
        last = sigmas[-1]
    else:
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    return np.append(sigmas, last).astype(np.float32)


@struct.dataclass
class UniPCState:
    """What UniPC carries between steps (diffusers' model_outputs, last_sample, this_order).

    pred_original_sample: (B, ...) float32, x0 predicted at the last step (m_{i-1}).
    older_pred:           (B, ...) float32, x0 predicted the step before (m_{i-2}).
    last_sample:          (B, ...) float32, the (corrected) sample the last step started from.
    last_order:           () int32, the predictor order of the last step (the corrector's).
    steps_taken:          () int32, steps done since `init_state`.
    """

    pred_original_sample: jax.Array
    older_pred: jax.Array
    last_sample: jax.Array
    last_order: jax.Array
    steps_taken: jax.Array


@struct.dataclass
class FlowUniPCSampler(SamplerMethods):
    """UniPC (Zhao et al. 2023) predictor-corrector with flow sigmas, equal to diffusers'
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
    predict_x0=True), solver_order 1 or 2, solver_type bh1 or bh2 (Wan: 2, bh2).

    With flow sigmas alpha = 1 - sigma and lambda = log(alpha / sigma). Step i converts v
    to x0 (m_i), corrects the sample with UniC from the last step's sample and x0s, then
    takes a UniP step of order predictor_order[i] (at most one more than the steps taken).

    timesteps:         (T,) int32 model timestep int(sigma_i * N).
    sigmas:            (T + 1,) float32 sigma at each step, then the final sigma.
    predictor_order:   (T,) int32 UniP order per step (lower_order_final applied).
    corrector_enabled: (T,) bool, False where diffusers' disable_corrector skips UniC.
    """

    timesteps: jax.Array
    sigmas: jax.Array
    predictor_order: jax.Array
    corrector_enabled: jax.Array
    init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)
    solver_type: str = struct.field(pytree_node=False, default="bh2")

    @classmethod
    def create(cls, schedule, num_inference_steps: int, *, prediction_type: str = FLOW_PREDICTION,
               timestep_spacing: Optional[str] = None, steps_offset: int = 0, flow_shift: float = 1.0,
               num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS, solver_order: int = 2,
               solver_type: str = "bh2", lower_order_final: bool = True,
               final_sigmas_type: str = "zero", disable_corrector: Sequence[int] = (),
               use_flow_sigmas: bool = True) -> "FlowUniPCSampler":
        """Tables as diffusers' set_timesteps. `schedule`, `timestep_spacing` and
        `steps_offset` are not used: with flow sigmas diffusers overrides them too."""
        del schedule, timestep_spacing, steps_offset
        _check_flow_prediction("flow_unipc", prediction_type)
        if not use_flow_sigmas:
            raise NotImplementedError("flow_unipc: use_flow_sigmas=False (UniPC on a DDPM schedule) "
                                      "is not implemented")
        if solver_order not in (1, 2):
            raise NotImplementedError(f"flow_unipc: solver_order={solver_order!r} is not implemented "
                                      f"(1 or 2)")
        if solver_type not in UNIPC_SOLVER_TYPES:
            raise ValueError(f"flow_unipc: solver_type must be one of {UNIPC_SOLVER_TYPES}, "
                             f"got {solver_type!r}")
        sigmas = unipc_flow_sigmas(num_inference_steps, flow_shift, num_train_timesteps, final_sigmas_type)
        # diffusers: float64 sigmas * N truncated to int64 (its float32 copy is the table).
        timesteps = (_unipc_flow_sigmas_float64(num_inference_steps, flow_shift, num_train_timesteps)
                     * num_train_timesteps).astype(np.int64)
        steps = np.arange(num_inference_steps)
        order = np.minimum(solver_order, num_inference_steps - steps) if lower_order_final \
            else np.full(num_inference_steps, solver_order)
        corrector = (steps > 0) & ~np.isin(steps - 1, np.asarray(list(disable_corrector), np.int64))
        return cls(timesteps=jnp.asarray(timesteps, jnp.int32), sigmas=jnp.asarray(sigmas),
                   predictor_order=jnp.asarray(order, jnp.int32),
                   corrector_enabled=jnp.asarray(corrector), solver_type=solver_type)

    def init_state(self, x: jax.Array) -> UniPCState:
        """The state before step 0 for latents x (B, ...)."""
        zeros = jnp.zeros(x.shape, jnp.float32)
        return UniPCState(pred_original_sample=zeros, older_pred=zeros, last_sample=zeros,
                          last_order=jnp.ones((), jnp.int32), steps_taken=jnp.zeros((), jnp.int32))

    def step(self, state: UniPCState, i, model_output: jax.Array, x: jax.Array,
             rng: Optional[jax.Array] = None):
        """One UniPC step from x at step i. Returns (x_next (B, ...), new state)."""
        del rng  # deterministic solver
        sample = as_float32(x)
        x0 = _x0_from_velocity(as_float32(model_output), sample, self.sigmas[i])
        use_corrector = self.corrector_enabled[i] & (state.steps_taken > 0)
        corrected = self._correct(state, i, x0, sample)
        sample = jnp.where(use_corrector, corrected, sample)
        order = jnp.minimum(self.predictor_order[i], state.steps_taken + 1)
        x_next = self._predict(i, order, sample, x0, state.pred_original_sample)
        new_state = UniPCState(pred_original_sample=x0, older_pred=state.pred_original_sample,
                               last_sample=sample, last_order=order, steps_taken=state.steps_taken + 1)
        return x_next.astype(x.dtype), new_state

    def _coefficients(self, sigma_t, sigma_s0):
        """(sigma_t / sigma_s0, alpha_t, h, h_phi_1, B_h) of the step sigma_s0 -> sigma_t."""
        alpha_t, lambda_t = _alpha_lambda(sigma_t)
        lambda_s0 = _alpha_lambda(sigma_s0)[1]
        h = lambda_t - lambda_s0
        h_phi_1 = jnp.expm1(-h)  # predict_x0: hh = -h
        b_h = h_phi_1 if self.solver_type == "bh2" else -h
        return sigma_t / sigma_s0, alpha_t, h, h_phi_1, b_h

    def _predict(self, i, order, sample, m0, m1):
        """UniP (diffusers' multistep_uni_p_bh_update): m0 = x0 now, m1 = x0 one step back."""
        ratio, alpha_t, h, h_phi_1, b_h = self._coefficients(self.sigmas[i + 1], self.sigmas[i])
        x_t = ratio * sample - (alpha_t * h_phi_1) * m0
        # Second order: D1 = (m1 - m0) / r with r = (lambda_{i-1} - lambda_i) / h, weight 0.5.
        # The coefficients are selected as scalars (r and h may be 0 or inf where unused).
        second = order == 2
        r = (_alpha_lambda(self.sigmas[jnp.maximum(i - 1, 0)])[1] - _alpha_lambda(self.sigmas[i])[1]) / h
        d1 = (m1 - m0) / jnp.where(second, r, 1.0)
        return x_t - (alpha_t * b_h) * (jnp.where(second, 0.5, 0.0) * d1)

    def _correct(self, state: UniPCState, i, model_t, this_sample):
        """UniC (diffusers' multistep_uni_c_bh_update) of this_sample at step i, of the
        order the last predictor used; m0 = x0 of the last step, m1 the one before."""
        last = jnp.maximum(i - 1, 0)
        ratio, alpha_t, h, h_phi_1, b_h = self._coefficients(self.sigmas[i], self.sigmas[last])
        x_t = ratio * state.last_sample - (alpha_t * h_phi_1) * state.pred_original_sample
        second = state.last_order == 2
        r = (_alpha_lambda(self.sigmas[jnp.maximum(i - 2, 0)])[1] - _alpha_lambda(self.sigmas[last])[1]) / h
        r = jnp.where(second, r, 0.0)
        # rhos solve [[1, 1], [r, 1]] rho = [b1, b2], b_k the B(h) weights of the phi functions.
        hh = -h
        h_phi_k = h_phi_1 / hh - 1
        b1 = h_phi_k / b_h
        b2 = (h_phi_k / hh - 0.5) * 2 / b_h
        rho_last = jnp.where(second, (b2 - r * b1) / (1 - r), 0.5)  # order 1: 0.5
        rho_d1 = jnp.where(second, b1 - rho_last, 0.0)
        d1 = (state.older_pred - state.pred_original_sample) / jnp.where(second, r, 1.0)
        d1_t = model_t - state.pred_original_sample
        return x_t - (alpha_t * b_h) * (rho_d1 * d1 + rho_last * d1_t)


def _alpha_lambda(sigma):
    """(alpha, lambda) of a flow sigma: alpha = 1 - sigma, lambda = log(alpha) - log(sigma)."""
    alpha = 1 - sigma
    return alpha, jnp.log(alpha) - jnp.log(sigma)


FLOW_SAMPLER_CLASSES = {"flow_euler": FlowEulerSampler, "flow_unipc": FlowUniPCSampler}
