"""The diffusion kind of a run (``config.diffusion.kind``): which schedule trains, which
samplers sample, one home for the switch.

    "ddpm" (default): ``NoiseSchedule`` (schedule.py), integer timesteps, epsilon / v /
           x0 prediction; samplers ddim (default), dpmpp_2m, euler.
    "flow":  rectified flow as Wan trains it, ``FlowSchedule`` (flow.py) with
           ``diffusion.flow_shift`` and the timestep density ``diffusion.flow_density``
           (uniform or logit_normal over the shifted sigma table); the model predicts the
           velocity (``diffusion.prediction_type = "flow_prediction"``) at timestep
           sigma * 1000; samplers flow_unipc (default, as Wan's scheduler config),
           flow_euler, both at the same shift.

The train step calls only the ``TrainingSchedule`` methods, so the loss has no branch
on the kind.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Union

import jax

from consist_jax.diffusion.flow import FLOW_PREDICTION, FlowSchedule
from consist_jax.diffusion.samplers import make_sampler
from consist_jax.diffusion.schedule import NoiseSchedule

KINDS = ("ddpm", "flow")
SAMPLERS = {"ddpm": ("ddim", "dpmpp_2m", "euler"), "flow": ("flow_unipc", "flow_euler")}  # default first


class TrainingSchedule(Protocol):
    """What the SCD loss asks of a schedule (training/step.py: scd_loss). ``t`` is a
    per-example training "timestep" in the schedule's own units (DDPM: an int index;
    flow: sigma)."""

    num_train_timesteps: int

    def sample_training_timesteps(self, rng: jax.Array) -> jax.Array: ...  # one t, ()

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array: ...  # x_t, x0's shape

    def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array,
                        prediction_type: str) -> jax.Array: ...

    def model_timesteps(self, t: jax.Array) -> jax.Array: ...  # what the denoiser is called with

    def min_snr_loss_weights(self, t: jax.Array, gamma: float, prediction_type: str) -> jax.Array: ...


Schedule = Union[NoiseSchedule, FlowSchedule]


def diffusion_kind(diffusion: Mapping[str, Any]) -> str:
    """``diffusion.kind`` ("ddpm" when absent: configs written before flow matching)."""
    kind = diffusion.get("kind", "ddpm")
    if kind not in KINDS:
        raise ValueError(f"diffusion.kind={kind!r}: expected one of {KINDS}")
    return kind


def schedule_from_config(diffusion: Mapping[str, Any]) -> Schedule:
    """The schedule of a run config's ``diffusion`` section, as training and sampling build
    it; a prediction_type that does not fit the kind is a one-line error."""
    kind = diffusion_kind(diffusion)
    flow_prediction = diffusion["prediction_type"] == FLOW_PREDICTION
    if (kind == "flow") != flow_prediction:
        raise ValueError(f"diffusion.prediction_type={diffusion['prediction_type']!r} with diffusion.kind={kind!r}: "
                         f"{FLOW_PREDICTION!r} goes with (and only with) kind 'flow'")
    if kind == "ddpm":
        return NoiseSchedule.from_config(diffusion)
    return FlowSchedule.create(shift=diffusion.get("flow_shift", 1.0),
                               num_train_timesteps=diffusion["num_train_timesteps"],
                               density=diffusion.get("flow_density", "uniform"),
                               logit_mean=diffusion.get("flow_logit_mean", 0.0),
                               logit_std=diffusion.get("flow_logit_std", 1.0))


def training_schedule(config: Any) -> Schedule:
    """``schedule_from_config(config.diffusion)``, refusing loss options the kind lacks
    (min-SNR weighting with flow) before anything compiles."""
    schedule = schedule_from_config(config.diffusion)
    gamma = config.train.get("min_snr_gamma", 0.0)
    if gamma and isinstance(schedule, FlowSchedule):
        schedule.min_snr_loss_weights(None, gamma, config.diffusion.prediction_type)  # raises its one line
    return schedule


def schedule_kind(schedule: Schedule) -> str:
    return "flow" if isinstance(schedule, FlowSchedule) else "ddpm"


def sampler_name(schedule: Schedule, name: Optional[str]) -> str:
    """``name`` checked against the schedule's kind (None: the kind's default sampler)."""
    kind = schedule_kind(schedule)
    if name is None or name == "":
        return SAMPLERS[kind][0]
    if name not in SAMPLERS[kind]:
        raise ValueError(f"sampler {name!r} does not sample this model (diffusion.kind={kind!r}); "
                         f"expected one of {SAMPLERS[kind]}")
    return name


def make_sampler_for(schedule: Schedule, name: Optional[str], num_inference_steps: int, *,
                     prediction_type: Optional[str] = None, timestep_spacing: Optional[str] = None):
    """The sampler ``name`` (checked, see ``sampler_name``) for a model trained with
    ``schedule``: a flow sampler at the schedule's shift and train timesteps."""
    name = sampler_name(schedule, name)
    if isinstance(schedule, FlowSchedule):
        shift_key = "flow_shift" if name == "flow_unipc" else "shift"
        return make_sampler(name, None, num_inference_steps, prediction_type=prediction_type,
                            **{shift_key: schedule.shift, "num_train_timesteps": schedule.num_train_timesteps})
    return make_sampler(name, schedule, num_inference_steps, prediction_type=prediction_type,
                        timestep_spacing=timestep_spacing)
