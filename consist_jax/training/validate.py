"""Numeric ranges of a run config, checked before anything is built or compiled.

    check_run_config(config)   # train.py, trainer.preflight
    checks.check_sample_settings(...)  # sample.py, evaluate.py flags and config.sample

A value that makes no sense (a negative learning rate trains by gradient ascent, a
batch of 0 has nothing to stack) raises ValueError with one line naming the key, the
value and the allowed range (consist_jax.checks). Unknown keys are ml_collections'
business; names of enums (schedules, samplers) are checked where they are used.
"""
from __future__ import annotations

from typing import Any

from consist_jax import checks


def _check_section(section: Any, prefix: str, rules: dict) -> None:
    """Applies ``rules`` {key: check(name, value)} to the keys ``section`` has."""
    for key, check in rules.items():
        if key in section and section[key] is not None:
            check(f"{prefix}.{key}", section[key])


def _resolution(name: str, value) -> None:
    checks.positive_ints(name, (value, value) if isinstance(value, int) else value)


def _crop_scale(name: str, value) -> None:
    if isinstance(value, (str, bytes)) or len(value) != 2:
        raise ValueError(f"{name}={value!r}: must be (min, max) with 0 < min <= max <= 1")
    low, high = (checks.check_number(f"{name}[{i}]", v, 0, 1, low_open=True) for i, v in enumerate(value))
    if low > high:
        raise ValueError(f"{name}={tuple(value)!r}: must be (min, max) with 0 < min <= max <= 1")


TRAIN_RULES = {
    "global_batch_size": checks.positive_int,
    "num_steps": checks.positive_int,
    "drop_reference_prob": checks.probability,
    "drop_context_prob": checks.probability,
    "min_snr_gamma": checks.non_negative_number,
    "noise_offset": checks.non_negative_number,
    "figure_loss_weight": checks.positive_number,
}
OPTIM_RULES = {
    "lr": checks.positive_number,
    "warmup_steps": checks.non_negative_int,
    "decay_steps": checks.positive_int,
    "final_lr_fraction": checks.probability,
    "b1": checks.fraction_below_one,
    "b2": checks.fraction_below_one,
    "eps": checks.non_negative_number,
    "weight_decay": checks.non_negative_number,
    "clip_norm": checks.non_negative_number,  # 0: no clipping
    "grad_accum_steps": checks.positive_int,
    "ema_decay": checks.fraction_below_one,  # 0: no EMA
}
def _beta(name: str, value) -> None:
    checks.check_number(name, value, 0, 1, low_open=True, high_open=True)


DIFFUSION_RULES = {
    "beta_start": _beta,
    "beta_end": _beta,
    "num_train_timesteps": checks.positive_int,
}
PIPELINE_RULES = {
    "batch_size": checks.positive_int,
    "clip_length": checks.positive_int,
    "frame_stride": checks.positive_int,
    "resolution": _resolution,
    "crop_scale": _crop_scale,
    "flip_probability": checks.probability,
    "pose_confidence_threshold": checks.probability,
    "pose_stroke_scale": checks.positive_number,
    "num_epochs": checks.positive_int,
    "worker_count": checks.non_negative_int,
    "worker_buffer_size": checks.positive_int,
    "read_threads": checks.positive_int,
    "read_prefetch": checks.positive_int,
}
# every_steps=0: no periodic saves (the final and preemption saves still happen).
CHECKPOINT_RULES = {"every_steps": checks.non_negative_int, "keep": checks.positive_int}
LOG_RULES = {"every_steps": checks.positive_int, "peak_tflops_per_device": checks.non_negative_number}


def check_run_config(config: Any) -> None:
    """Every numeric key of a train.py config in its range; raises ValueError naming the key."""
    checks.seed("seed", config.seed)
    sections = (("train", TRAIN_RULES), ("optim", OPTIM_RULES), ("diffusion", DIFFUSION_RULES),
                ("checkpoint", CHECKPOINT_RULES), ("log", LOG_RULES))
    for name, rules in sections:
        if name in config:
            _check_section(config[name], name, rules)
    _check_section(config.data.pipeline, "data.pipeline", PIPELINE_RULES)
    checks.non_negative_int("mesh.cpu_devices", config.get("mesh", {}).get("cpu_devices", 0))
    d = config.diffusion
    if d.beta_end < d.beta_start:
        raise ValueError(f"diffusion.beta_end={d.beta_end} must be >= diffusion.beta_start={d.beta_start}")
    checks.non_negative_int("train.reference_timestep", config.train.reference_timestep,
                            d.num_train_timesteps - 1)
    if "sample" in config:
        s = config.sample
        checks.check_sample_settings("sample", steps=s.steps, guidance=s.guidance, window=s.window,
                              overlap=s.overlap, guidance_rescale=s.get("guidance_rescale", 0.0))
