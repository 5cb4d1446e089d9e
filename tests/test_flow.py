"""Flow matching (diffusion/flow.py) and the flow samplers against diffusers.

The samplers: flow-match Euler (FlowMatchEulerDiscreteScheduler) and UniPC with flow
sigmas (UniPCMultistepScheduler, as Wan's scheduler_config.json), built from the same
config dict as diffusers; timesteps and sigmas equal bit for bit, and over whole loops
both sides get the same model outputs (a linear function of the sample plus a fixed
random term per step) and every step's latents agree within 1e-5 relative. The two
sides round differently (XLA's fused multiply-adds, torch's log), ~1e-7 relative per
UniPC step, accumulated over the loop: 50 Wan-720p steps measured at most 4e-6 over 24
seeds with slopes +-0.5 and +-1 (the tested range).
"""
import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from parity import assert_within_rounding, relative_error

from consist_jax.diffusion import flow
from consist_jax.diffusion import samplers as smp
from consist_jax.diffusion.schedule import NoiseSchedule as NoiseScheduleType

diffusers.utils.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOLERANCE = 1e-5
LATENTS = (1, 3, 4, 6, 4)  # (B, F, h, w, C): odd frames, non-square
# Wan2.1's shipped UniPC scheduler_config.json (flow_shift 3.0 for 480p, 5.0 for 720p).
WAN_UNIPC = {
    "_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
    "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
    "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
    "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2, "solver_p": None,
    "solver_type": "bh2", "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace",
    "trained_betas": None, "use_beta_sigmas": False, "use_exponential_sigmas": False,
    "use_flow_sigmas": True, "use_karras_sigmas": False,
}
CASES = {  # id -> (our sampler, diffusers class, config, steps)
    "euler_shift3_30": ("flow_euler", FlowMatchEulerDiscreteScheduler, dict(shift=3.0), 30),
    "euler_shift5_50": ("flow_euler", FlowMatchEulerDiscreteScheduler, dict(shift=5.0), 50),
    "euler_shift1_7": ("flow_euler", FlowMatchEulerDiscreteScheduler, {}, 7),
    "unipc_wan480_30": ("flow_unipc", UniPCMultistepScheduler, WAN_UNIPC, 30),
    "unipc_wan720_50": ("flow_unipc", UniPCMultistepScheduler, dict(WAN_UNIPC, flow_shift=5.0), 50),
    "unipc_order1_7": ("flow_unipc", UniPCMultistepScheduler, dict(WAN_UNIPC, solver_order=1), 7),
    "unipc_bh1_sigma_min_30": ("flow_unipc", UniPCMultistepScheduler,
                               dict(WAN_UNIPC, solver_type="bh1", final_sigmas_type="sigma_min"), 30),
    "unipc_no_lower_final_sigma_min_30": ("flow_unipc", UniPCMultistepScheduler,
                                          dict(WAN_UNIPC, lower_order_final=False,
                                               final_sigmas_type="sigma_min"), 30),
    "unipc_disable_corrector_30": ("flow_unipc", UniPCMultistepScheduler,
                                   dict(WAN_UNIPC, disable_corrector=[0, 4, 5]), 30),
}

_step = jax.jit(lambda sampler, state, i, out, x: sampler.step(state, i, out, x))


def _make_pair(case):
    name, cls, config, steps = CASES[case]
    ref = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    ref.set_timesteps(steps)
    ref.set_begin_index(0)
    options = smp.sampler_options_from_diffusers_config(name, dict(ref.config))
    return smp.make_sampler(name, None, steps, **options), ref


def _model_output(x, bank_i, slope):
    """The 'model': a linear function of the sample plus a fixed random term."""
    return slope * x + bank_i


@pytest.mark.parametrize("case", list(CASES))
def test_tables_equal_diffusers(case):
    ours, ref = _make_pair(case)
    np.testing.assert_array_equal(np.asarray(ours.sigmas), ref.sigmas.numpy())
    # UniPC's timesteps are integers (int64 in diffusers), Euler's float32.
    assert ours.timesteps.dtype == (jnp.int32 if CASES[case][0] == "flow_unipc" else jnp.float32)
    np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())


@pytest.mark.parametrize("case", list(CASES))
def test_every_step_matches_diffusers(rng, case):
    ours, ref = _make_pair(case)
    noise = rng.standard_normal(LATENTS).astype(np.float32)
    slope = float(rng.uniform(-1.0, 1.0))
    x = ours.initial_latents(jnp.asarray(noise))
    x_ref = torch.from_numpy(noise)  # both classes start from the noise itself (sigma_0 ~ 1)
    state = ours.init_state(x)
    worst = relative_error(x, x_ref.numpy())
    for i, t in enumerate(ref.timesteps):
        bank_i = rng.standard_normal(LATENTS).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(ours.scale_model_input(x, i)), np.asarray(x))
        output = _model_output(np.asarray(x_ref.numpy()), bank_i, slope).astype(np.float32)
        # Each side evaluates the model on its own trajectory.
        x, state = _step(ours, state, i, jnp.asarray(_model_output(np.asarray(x), bank_i, slope)), x)
        x_ref = ref.step(torch.from_numpy(output), t, x_ref).prev_sample
        worst = max(worst, relative_error(x, x_ref.numpy()))
    assert int(state.steps_taken) == len(ref.timesteps)
    print(f"{case}: worst relative error {worst:.2e}")
    assert worst < TOLERANCE


@jax.jit
def _loop(sampler, noise, bank, slope):
    def model_fn(x, t):
        step = jnp.argmax(sampler.timesteps == t)
        return slope * x + bank[step]
    return smp.sample_loop(sampler, model_fn, noise)


@pytest.mark.parametrize("case", ["euler_shift3_30", "unipc_wan480_30"])
def test_sample_loop_in_one_program_matches_diffusers_loop(rng, case):
    ours, ref = _make_pair(case)
    steps = len(ref.timesteps)
    assert len(set(ref.timesteps.tolist())) == steps  # the toy model finds its step by t
    noise = rng.standard_normal(LATENTS).astype(np.float32)
    bank = rng.standard_normal((steps,) + LATENTS).astype(np.float32)
    slope = np.float32(rng.uniform(-1.0, 1.0))
    result = _loop(ours, jnp.asarray(noise), jnp.asarray(bank), slope)
    x = torch.from_numpy(noise)
    for i, t in enumerate(ref.timesteps):
        x = ref.step(slope * x + torch.from_numpy(bank[i]), t, x).prev_sample
    assert relative_error(result, x.numpy()) < TOLERANCE


def test_config_errors_name_the_setting():
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):  # diffusers' default: DDPM
        smp.make_sampler("flow_unipc", None, 10, **smp.sampler_options_from_diffusers_config(
            "flow_unipc", {"prediction_type": "flow_prediction"}))
    with pytest.raises(ValueError, match="prediction_type must be 'flow_prediction'"):
        smp.make_sampler("flow_unipc", None, 10, **smp.sampler_options_from_diffusers_config(
            "flow_unipc", {"use_flow_sigmas": True}))
    with pytest.raises(NotImplementedError, match="stochastic_sampling"):
        smp.sampler_options_from_diffusers_config("flow_euler", {"stochastic_sampling": True})
    with pytest.raises(NotImplementedError, match="use_dynamic_shifting"):
        smp.sampler_options_from_diffusers_config("flow_unipc", dict(WAN_UNIPC, use_dynamic_shifting=True))
    with pytest.raises(NotImplementedError, match="solver_order=3"):
        smp.make_sampler("flow_unipc", None, 10, solver_order=3)
    with pytest.raises(ValueError, match="flow_euler samples velocity models"):
        smp.make_sampler("flow_euler", None, 10, prediction_type="epsilon")
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        smp.make_sampler("flow_euler", None, 0)
    with pytest.raises(ValueError, match="flow shift must be > 0"):
        smp.make_sampler("flow_euler", None, 10, shift=0.0)
    # Defaults: velocity prediction, no schedule needed.
    assert smp.make_sampler("flow_unipc", None, 10).timesteps.dtype == jnp.int32
    assert smp.sampler_options_from_diffusers_config("flow_euler", {"shift": 5.0}) == {"shift": 5.0}


# ----------------------------------------------------------------------------------
# Training: forward process, target, shifted sigmas
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_training_sigma_table_equals_diffusers(shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    table = flow.training_sigma_table(shift)
    np.testing.assert_array_equal(table, ref.sigmas.numpy())
    np.testing.assert_array_equal(np.asarray(flow.timesteps_from_sigmas(table)), ref.timesteps.numpy())


def test_add_noise_target_and_x0_agree_with_diffusers(rng):
    shift = 3.0
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    table = flow.training_sigma_table(shift)
    batch = 3
    index = rng.integers(0, len(table), batch)
    x0 = rng.standard_normal((batch,) + LATENTS[1:]).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    x_t = np.asarray(flow.add_flow_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(table[index])))
    x_t_ref = ref.scale_noise(torch.from_numpy(x0), ref.timesteps[index], torch.from_numpy(noise)).numpy()
    sigma = table[index].reshape(-1, 1, 1, 1, 1)
    terms = np.abs(sigma * noise) + np.abs((1 - sigma) * x0)
    assert_within_rounding(x_t, x_t_ref, terms, ulps=3, what="x_t")
    target = np.asarray(flow.flow_target(jnp.asarray(x0), jnp.asarray(noise)))
    np.testing.assert_array_equal(target, noise - x0)
    # A perfect velocity prediction takes x_t back to x0 (to the roundings of x_t and v).
    x0_back = np.asarray(flow.flow_predict_x0(jnp.asarray(target), jnp.asarray(x_t), table[index]))
    assert_within_rounding(x0_back, x0, terms + np.abs(sigma * target) + np.abs(x_t), ulps=4, what="x0")


@pytest.mark.parametrize("density", flow.TIMESTEP_DENSITIES)
def test_training_sigmas_come_from_the_shifted_table(rng, density):
    table = flow.training_sigma_table(5.0)
    key = jax.random.key(int(rng.integers(2**31)), impl="rbg")
    sigmas = np.asarray(flow.sample_training_sigmas(key, 4096, jnp.asarray(table), density))
    assert sigmas.shape == (4096,) and np.isin(sigmas, table).all()
    if density == "uniform":
        # Uniform over the table's 1000 entries: shift 5 puts ~5/6 of them above sigma 0.5.
        share = np.mean(np.isin(sigmas, table[table > 0.5]))
        expected = np.mean(table > 0.5)
        assert abs(share - expected) < 5 * np.sqrt(expected * (1 - expected) / 4096)  # 5 sigma
    with pytest.raises(ValueError, match="unknown flow timestep density 'beta'"):
        flow.sample_training_sigmas(key, 2, jnp.asarray(table), "beta")


# ----------------------------------------------------------------------------------
# The train step's flow schedule (FlowSchedule through training/step.py: scd_loss)
# ----------------------------------------------------------------------------------


class _LinearDenoiser:
    """A stand-in denoiser, w x_t + v t: its loss shows what scd_loss fed it. Records the
    timesteps it was called with (eager calls only)."""

    def __init__(self):
        self.calls = []

    def apply(self, variables, x, t, context, *, reference, reference_timesteps, reference_mask, **poses):
        self.calls.append((np.asarray(t), np.asarray(reference_timesteps)))
        p = variables["params"]
        return p["w"] * x + p["v"] * t.reshape(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("density", flow.TIMESTEP_DENSITIES)
def test_scd_loss_trains_the_velocity_at_sigma_times_1000(rng, density):
    """x_t = (1 - sigma) x0 + sigma eps, target eps - x0, model timestep sigma * 1000, the
    reference at timestep 0, each example's draws keyed by its id."""
    from consist_jax.models.scd import NullContext, PixelCodec, SCDModel
    from consist_jax.training.step import LossConfig, per_example_draws, scd_loss

    schedule = flow.FlowSchedule.create(shift=3.0, density=density)
    denoiser = _LinearDenoiser()
    model = SCDModel(denoiser, PixelCodec(), NullContext(2))
    loss = LossConfig(prediction_type=flow.FLOW_PREDICTION)
    x0 = rng.standard_normal((3, 2, 4, 4, 3)).astype(np.float32)
    inputs = {"reference_latents": jnp.zeros((3, 4, 4, 3)), "target_latents": jnp.asarray(x0),
              "context": jnp.zeros((3, 1, 2)), "example_id": jnp.asarray([7, 2, 9], jnp.int32)}
    params = {"w": jnp.float32(0.5), "v": jnp.float32(1e-3)}
    key = jax.random.key(int(rng.integers(2**31)))
    value, per_example = scd_loss(params, model, schedule, loss, inputs, key)
    noise, sigma, _ = (np.asarray(a, np.float64) for a in per_example_draws(
        key, inputs["example_id"], x0.shape[1:], loss, schedule))
    assert np.isin(sigma, np.asarray(schedule.sigmas)).all()
    (t, reference_t), = denoiser.calls
    np.testing.assert_allclose(t, sigma * 1000, rtol=1e-6)
    assert reference_t.dtype == np.float32 and not reference_t.any()
    s = sigma.reshape(-1, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    expected = np.square(0.5 * x_t + 1e-3 * sigma.reshape(s.shape) * 1000 - (noise - x0)).mean(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)
    np.testing.assert_allclose(value, expected.mean(), rtol=1e-5)


def test_diffusion_kind_errors_are_one_line():
    from configs.common import base_config
    from consist_jax.diffusion import kinds

    config = base_config()
    assert isinstance(kinds.schedule_from_config(config.diffusion), NoiseScheduleType)
    cases = [
        (dict(kind="rectified"), r"diffusion.kind='rectified': expected one of \('ddpm', 'flow'\)"),
        (dict(kind="flow"), r"diffusion.prediction_type='epsilon' with diffusion.kind='flow'"),
        (dict(prediction_type="flow_prediction"), r"'flow_prediction' goes with \(and only with\) kind 'flow'"),
        (dict(kind="flow", prediction_type="flow_prediction", flow_density="beta"), "unknown flow timestep density"),
        (dict(kind="flow", prediction_type="flow_prediction", flow_shift=0.0), "flow shift must be > 0"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            kinds.schedule_from_config(dict(config.diffusion, **changes))
        assert "\n" not in str(error.value)
    config.diffusion.update(kind="flow", prediction_type="flow_prediction")
    assert kinds.training_schedule(config).shift == 3.0
    config.train.min_snr_gamma = 5.0
    with pytest.raises(ValueError, match=r"min_snr_gamma=5.0: min-SNR weighting .* \(set train.min_snr_gamma=0\)"):
        kinds.training_schedule(config)
