"""DDIM, DPM-Solver++ 2M and Euler against diffusers' schedulers, step by step.

Both sides get the same random model output at every step and each runs its own
trajectory; every step's latents (and Euler's scaled model input) must agree within
1e-5 relative (max abs diff / max abs of the reference) over whole 25- and 50-step loops.
"""
import itertools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from parity import EPS32, relative_error

from consist_jax.diffusion import samplers as smp
from consist_jax.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule

diffusers.utils.logging.set_verbosity_error()  # Euler warns when step precedes scale_model_input
# diffusers itself converts torch tensors with np.array(copy=False) (not our code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOLERANCE = 1e-5
CANCELLATION_ULPS = 4  # ulp-level rounding differences a cancelling step may amplify (_run_both)
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
CONFIGS = {
    # SD-1.5's scheduler config (leading spacing, offset 1, epsilon, final alpha = abar_0).
    "sd15": dict(SD15, timestep_spacing="leading", prediction_type="epsilon", set_alpha_to_one=False),
    # The peers' video setting: zero terminal SNR, v-prediction, trailing spacing.
    "zero_snr_v": dict(SD15, timestep_spacing="trailing", prediction_type="v_prediction",
                       rescale_betas_zero_snr=True),
}
VARIANTS = {  # name -> (our sampler, diffusers class, extra config)
    "ddim": ("ddim", DDIMScheduler, dict(clip_sample=False)),
    "dpmpp_2m": ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": ("dpmpp_2m", DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    "euler": ("euler", EulerDiscreteScheduler, {}),
    "euler_karras": ("euler", EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
}
IMAGE = (2, 8, 8, 4)
# Threefry's normal takes ~5 s to compile on these CPUs; rbg keys take < 1 s. The library
# takes whatever key it is given.
KEY_IMPL = "rbg"

# Shared compiled functions: one compile per (sampler class, static options, T).
_step = jax.jit(lambda sampler, state, i, out, x, key: sampler.step(state, i, out, x, key))
_scale_input = jax.jit(lambda sampler, x, i: sampler.scale_model_input(x, i))


def _make_pair(variant, config_name, steps, sampler_options=None, **overrides):
    """(our sampler, diffusers scheduler after set_timesteps), both from one config dict.

    sampler_options: our keywords that are step arguments in diffusers (DDIM's eta).
    """
    return _make_pair_from_config(variant, {**CONFIGS[config_name], **overrides}, steps, sampler_options)


def _make_pair_from_config(variant, config, steps, sampler_options=None):
    name, cls, extra = VARIANTS[variant]
    config = {**config, **extra}
    if cls is not DDIMScheduler:
        config.pop("set_alpha_to_one", None)
    ref = cls(**config)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(0)
    diffusers_config = dict(ref.config)
    ours = smp.make_sampler(name, NoiseSchedule.from_diffusers_config(diffusers_config), steps,
                            **smp.sampler_options_from_diffusers_config(name, diffusers_config),
                            **(sampler_options or {}))
    return ours, ref


def _assert_same_timesteps(ours, ref):
    if np.issubdtype(np.asarray(ours.timesteps).dtype, np.integer):
        np.testing.assert_array_equal(np.asarray(ours.timesteps), ref.timesteps.numpy())
    else:
        np.testing.assert_array_equal(np.asarray(ours.timesteps, np.float32), ref.timesteps.numpy())


def _cancellation(x_in, x_out):
    """How many times smaller a step's result is than its input (max-abs, torch tensors)."""
    return float(x_in.abs().max()) / max(float(x_out.abs().max()), 1e-30)


def _bound(shrink):
    """The relative-error bound after steps whose largest cancellation is `shrink` (_run_both)."""
    return TOLERANCE + CANCELLATION_ULPS * EPS32 * shrink


def _run_both(ours, ref, rng, shape=IMAGE, eta=0.0):
    """Step both samplers with the same random model outputs.

    Returns the worst per-step error as a fraction of its bound (pass: < 1). The bound is
    TOLERANCE, plus what float32 rounding alone allows where a step cancels: a step whose
    result is R times smaller than its input (Euler's first step from sigma_max, R ~ 870
    for the cosine schedule at 37 steps) amplifies ulp-level differences in how the two
    sides round the input-sized terms by R, and later steps carry that relative error on.
    Those differences are principled, not ours to remove: XLA fuses a * b + c into one
    FMA and turns x / s into x * (1 / s) for a scalar s, and torch's MKL sqrt (in its
    sigma table and v-prediction scale) is off by up to 0.75 ulp.
    """
    noise = rng.standard_normal(shape).astype(np.float32)
    x = ours.initial_latents(jnp.asarray(noise))
    x_ref = torch.from_numpy(noise) * ref.init_noise_sigma
    fractions = [relative_error(x, x_ref.numpy()) / TOLERANCE]
    state = ours.init_state(x)
    base_key = jax.random.key(int(rng.integers(2**31)), impl=KEY_IMPL)
    shrink = 1.0  # the largest cancellation so far
    for i, t in enumerate(ref.timesteps):
        scaled_ref = ref.scale_model_input(x_ref, t).numpy()
        # x carries earlier steps' error
        fractions.append(relative_error(_scale_input(ours, x, i), scaled_ref) / _bound(shrink))
        output = rng.standard_normal(shape).astype(np.float32)
        key = jax.random.fold_in(base_key, i) if eta else None
        x, state = _step(ours, state, i, jnp.asarray(output), x, key)
        extra = {}
        if eta:  # feed diffusers the very noise our step drew
            extra = dict(eta=eta, variance_noise=torch.from_numpy(np.array(jax.random.normal(key, shape))))
        x_in = x_ref
        x_ref = ref.step(torch.from_numpy(output), t, x_ref, **extra).prev_sample
        shrink = max(shrink, _cancellation(x_in, x_ref))
        fractions.append(relative_error(x, x_ref.numpy()) / _bound(shrink))
    assert int(state.steps_taken) == len(ref.timesteps)
    return max(fractions)


@pytest.mark.parametrize("steps", [25, 50])
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_step_matches_diffusers(rng, variant, config_name, steps):
    ours, ref = _make_pair(variant, config_name, steps)
    if variant == "euler_karras":
        _assert_karras_timesteps_close(ours, ref)
    else:
        _assert_same_timesteps(ours, ref)
    worst = _run_both(ours, ref, rng)
    print(f"{variant} {config_name} {steps}: worst error / bound {worst:.2f}")
    assert worst < 1


EXTRA_CASES = {  # id -> (variant, config, steps, config overrides, shape, eta)
    "ddim_eta": ("ddim", "sd15", 25, {}, IMAGE, 0.7),
    "ddim_trailing_30_final_alpha_one": ("ddim", "zero_snr_v", 30, dict(set_alpha_to_one=True), IMAGE, 0.0),
    "ddim_linspace_sample": ("ddim", "sd15", 25, dict(timestep_spacing="linspace", prediction_type="sample"),
                             IMAGE, 0.0),
    "ddim_clip_sample": ("ddim", "sd15", 25, dict(clip_sample=True, clip_sample_range=1.5), IMAGE, 0.0),
    "dpmpp_2m_10_sigma_min": ("dpmpp_2m", "sd15", 10, dict(final_sigmas_type="sigma_min"), IMAGE, 0.0),
    "dpmpp_2m_10_sigma_min_no_lower_final": ("dpmpp_2m", "sd15", 10,
                                             dict(final_sigmas_type="sigma_min", lower_order_final=False),
                                             IMAGE, 0.0),
    "dpmpp_1_trailing": ("dpmpp_2m", "zero_snr_v", 25, dict(solver_order=1), IMAGE, 0.0),
    "dpmpp_2m_linspace_20_video": ("dpmpp_2m", "zero_snr_v", 20, dict(timestep_spacing="linspace"),
                                   (1, 3, 4, 4, 4), 0.0),
    "dpmpp_2m_leading_v": ("dpmpp_2m", "sd15", 25, dict(prediction_type="v_prediction"), IMAGE, 0.0),
    "euler_linspace_30": ("euler", "sd15", 30, dict(timestep_spacing="linspace"), IMAGE, 0.0),
    "euler_trailing_eps": ("euler", "sd15", 25, dict(timestep_spacing="trailing"), IMAGE, 0.0),
}


@pytest.mark.parametrize("case", list(EXTRA_CASES))
def test_options_match_diffusers(rng, case):
    variant, config_name, steps, overrides, shape, eta = EXTRA_CASES[case]
    ours, ref = _make_pair(variant, config_name, steps, dict(eta=eta) if eta else None, **overrides)
    _assert_same_timesteps(ours, ref)
    worst = _run_both(ours, ref, rng, shape=shape, eta=eta)
    print(f"{case}: worst error / bound {worst:.2f}")
    assert worst < 1


# The real-world grid: every beta schedule x spacing x prediction type x sampler, at an
# odd step count, each built from a diffusers config as a user would load it.
GRID_BETAS = {"linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
              "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
              "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2")}
GRID_SAMPLERS = {  # id -> (variant, config overrides, our step options)
    "ddim_alpha_one": ("ddim", dict(set_alpha_to_one=True), {}),
    "ddim_alpha_abar0": ("ddim", dict(set_alpha_to_one=False), {}),
    "ddim_eta": ("ddim", dict(set_alpha_to_one=False), dict(eta=0.5)),
    "dpmpp_2m": ("dpmpp_2m", {}, {}),
    "dpmpp_2m_karras": ("dpmpp_2m_karras", {}, {}),
    "euler": ("euler", {}, {}),
    "euler_karras": ("euler_karras", {}, {}),
}
GRID_STEPS = 37


def _grid_cases(sampler_id, zero_snr):
    """(case id, config) pairs; zero terminal SNR needs v or x0 prediction (eps gives inf x0)."""
    predictions = ("v_prediction", "sample") if zero_snr else PREDICTION_TYPES
    for betas, spacing, prediction in itertools.product(GRID_BETAS, smp.TIMESTEP_SPACINGS, predictions):
        config = dict(GRID_BETAS[betas], timestep_spacing=spacing, prediction_type=prediction, steps_offset=1,
                      rescale_betas_zero_snr=zero_snr, **GRID_SAMPLERS[sampler_id][1])
        yield f"{sampler_id} {betas} {spacing} {prediction}{' zero_snr' if zero_snr else ''}", config


def _rescale_with_correctly_rounded_sqrt(betas):
    """diffusers' rescale_zero_terminal_snr, op for op, with a correctly rounded sqrt.

    torch's float32 CPU sqrt on MKL builds (this one) is off by one ulp for ~1/4 of the
    values (max 0.75 ulp); builds without MKL round correctly, so diffusers' own rescaled
    table is platform dependent by those ulps. Near t = 0, 1 - abar (~4e-5 for cosine)
    turns them into ~1e-4 relative, which sample-prediction DDIM steps pass on: diffusers
    disagrees with itself across platforms there by more than our 1e-5 bar. We compare
    against the correctly rounded platform, which our numpy sqrt reproduces.
    """
    sqrt = lambda a: torch.from_numpy(np.sqrt(a.numpy()))  # noqa: E731
    alphas_bar_sqrt = sqrt(torch.cumprod(1.0 - betas, dim=0))
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    return 1 - torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])


@pytest.fixture
def correctly_rounded_rescale(monkeypatch):
    for module in ("scheduling_ddim", "scheduling_dpmsolver_multistep", "scheduling_euler_discrete"):
        monkeypatch.setattr(getattr(diffusers.schedulers, module), "rescale_zero_terminal_snr",
                            _rescale_with_correctly_rounded_sqrt)


@pytest.mark.parametrize("zero_snr", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("sampler_id", list(GRID_SAMPLERS))
def test_real_world_grid_matches_diffusers(rng, correctly_rounded_rescale, sampler_id, zero_snr):
    """Every combination steps as diffusers does, within 1e-5 relative at every step."""
    variant, _, options = GRID_SAMPLERS[sampler_id]
    failures = []
    for case, config in _grid_cases(sampler_id, zero_snr):
        ours, ref = _make_pair_from_config(variant, config, GRID_STEPS, options)
        if variant != "euler_karras":
            _assert_same_timesteps(ours, ref)
        worst = _run_both(ours, ref, rng, shape=(1, 4, 4, 4), eta=options.get("eta", 0.0))
        if not worst < 1:
            failures.append(f"{case}: error / bound {worst:.2f}")
    assert not failures, "; ".join(failures)


def test_issue_ddim_linspace_sample_37_steps(rng):
    """The case from the issue: float64 tables were 2.5e-5 off here (1 - abar near t = 0)."""
    config = dict(GRID_BETAS["linear"], timestep_spacing="linspace", prediction_type="sample",
                  set_alpha_to_one=True)
    ours, ref = _make_pair_from_config("ddim", config, 37)
    np.testing.assert_array_equal(np.asarray(ours.alpha_bar), ref.alphas_cumprod.numpy()[ref.timesteps.numpy()])
    assert _run_both(ours, ref, rng) < 1


def _assert_karras_timesteps_close(ours, ref):
    """Euler's Karras timesteps are fractional, read off the log-sigma table: the float64
    vs float32-cumprod tables (~3e-7 apart) move them by < 1e-3 of a training step."""
    np.testing.assert_allclose(np.asarray(ours.timesteps), ref.timesteps.numpy(), rtol=0, atol=1e-3)


def test_euler_karras_timesteps_equal_on_diffusers_table():
    """Given diffusers' own alphas_cumprod, the Karras timesteps agree to float32 rounding."""
    config = {k: v for k, v in CONFIGS["sd15"].items() if k != "set_alpha_to_one"}
    ref = EulerDiscreteScheduler(**config, use_karras_sigmas=True)
    ref.set_timesteps(25)
    schedule = NoiseSchedule.from_alphas_cumprod(ref.alphas_cumprod.numpy())
    ours = smp.make_sampler("euler", schedule, 25, timestep_spacing="leading", steps_offset=1,
                            use_karras_sigmas=True)
    np.testing.assert_allclose(np.asarray(ours.timesteps), ref.timesteps.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.sigmas), ref.sigmas.numpy(), rtol=1e-6)


SPACING_CASES = [(spacing, steps) for spacing in smp.TIMESTEP_SPACINGS for steps in (1, 7, 20, 25, 30, 50)]


@pytest.mark.parametrize("spacing,steps", SPACING_CASES)
def test_set_timesteps_matches_diffusers(spacing, steps):
    for name, cls in (("ddim", DDIMScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler),
                      ("euler", EulerDiscreteScheduler)):
        ref = cls(timestep_spacing=spacing, steps_offset=1)
        ref.set_timesteps(steps)
        ours = smp.set_timesteps(name, 1000, steps, spacing, steps_offset=1)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{name} {spacing} {steps}")


def _toy_model(bank, timesteps):
    """A model_fn whose output depends on its input and on fresh random values per step."""
    def model_fn(model_input, t):
        step = jnp.argmax(timesteps == t)
        return 0.5 * jnp.tanh(model_input) + bank[step]
    return model_fn


@jax.jit
def _loop(sampler, noise, bank):
    return smp.sample_loop(sampler, _toy_model(bank, sampler.timesteps), noise)


@pytest.mark.regression_seeds(162784449)  # Euler's first step from sigma_max: 1.34e-5 vs 1e-5 once
@pytest.mark.parametrize("variant", ["ddim", "dpmpp_2m", "euler"])
def test_sample_loop_in_one_program_matches_diffusers_loop(rng, variant):
    """The bound is _run_both's: Euler's first step from zero-SNR sigma_max shrinks x ~80x."""
    ours, ref = _make_pair(variant, "zero_snr_v", 25)
    noise = rng.standard_normal(IMAGE).astype(np.float32)
    bank = rng.standard_normal((25,) + IMAGE).astype(np.float32)
    result = _loop(ours, jnp.asarray(noise), jnp.asarray(bank))
    x = torch.from_numpy(noise) * ref.init_noise_sigma
    shrink = 1.0
    for i, t in enumerate(ref.timesteps):
        output = 0.5 * torch.tanh(ref.scale_model_input(x, t)) + torch.from_numpy(bank[i])
        x_in = x
        x = ref.step(output, t, x).prev_sample
        shrink = max(shrink, _cancellation(x_in, x))
    assert relative_error(result, x.numpy()) < _bound(shrink)


def test_stochastic_ddim_loop_uses_the_key():
    schedule = NoiseSchedule.create()
    sampler = smp.make_sampler("ddim", schedule, 5, eta=1.0)
    model_fn = lambda x, t: 0.1 * x  # noqa: E731
    noise = jnp.ones((1, 4, 4, 4))
    loop = jax.jit(lambda key: smp.sample_loop(sampler, model_fn, noise, key))
    first = loop(jax.random.key(0, impl=KEY_IMPL))
    again = loop(jax.random.key(0, impl=KEY_IMPL))
    other = loop(jax.random.key(1, impl=KEY_IMPL))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.allclose(np.asarray(first), np.asarray(other))
    with pytest.raises(ValueError, match="rng"):
        sampler.step(sampler.init_state(noise), 0, noise, noise)


def test_default_spacing_and_errors():
    schedule = NoiseSchedule.create()
    assert int(smp.make_sampler("ddim", schedule, 10).timesteps[0]) == 900  # leading
    assert int(smp.make_sampler("dpmpp_2m", schedule, 10).timesteps[0]) == 999  # linspace
    assert smp.make_sampler("euler", schedule, 10).timesteps.dtype == jnp.float32
    with pytest.raises(ValueError):
        smp.make_sampler("heun", schedule, 10)
    with pytest.raises(NotImplementedError):
        smp.make_sampler("dpmpp_2m", schedule, 10, solver_order=3)
    with pytest.raises(ValueError):
        smp.make_sampler("ddim", schedule, 10, timestep_spacing="uniform")
    with pytest.raises(NotImplementedError):
        smp.sampler_options_from_diffusers_config("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(NotImplementedError):
        smp.sampler_options_from_diffusers_config("ddim", {"thresholding": True})
    assert smp.sampler_options_from_diffusers_config("ddim", {}) == {"clip_sample": True}
