"""Schedules, forward process, targets and SNR weights against diffusers (PyTorch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as torch_rescale_zero_snr
from diffusers.training_utils import compute_snr
from parity import relative_error

from consist_jax.diffusion import schedule as sch

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULE_CONFIGS = {
    "sd15": dict(SD15, rescale_betas_zero_snr=False),
    "sd15_zero_snr": dict(SD15, rescale_betas_zero_snr=True),
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, rescale_betas_zero_snr=False),
    "cosine": dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=False),
    "cosine_zero_snr": dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
}
SHAPES = [(3, 8, 8, 4), (2, 3, 4, 4, 4)]
# Threefry's normal takes ~5 s to compile on these CPUs; rbg keys take < 1 s.
KEY_IMPL = "rbg"  # image (B, h, w, C) and video (B, F, h, w, C)


def _pair(name):
    """(our schedule, diffusers' DDIMScheduler) for a named config."""
    cfg = SCHEDULE_CONFIGS[name]
    return sch.NoiseSchedule.create(**cfg), DDIMScheduler(**cfg, clip_sample=False)


def _float64_reference_alphas_cumprod(cfg):
    """diffusers' own construction, run in float64 (torch) instead of float32."""
    n = 1000
    if cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = torch.from_numpy(sch._cosine_betas(n))
        ref_betas = DDIMScheduler(beta_schedule="squaredcos_cap_v2").betas.double()
        assert relative_error(betas, ref_betas) < 1e-6  # same formula as diffusers' python loop
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)
    if cfg["rescale_betas_zero_snr"]:
        betas = torch_rescale_zero_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0).numpy()


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_tables_match_diffusers(name):
    ours, ref = _pair(name)
    # diffusers accumulates its cumprod in float32; ours is float64 rounded once.
    assert relative_error(ours.alphas_cumprod, ref.alphas_cumprod.numpy()) < 1e-6
    assert relative_error(ours.betas, ref.betas.numpy()) < 1e-5
    exact = _float64_reference_alphas_cumprod(SCHEDULE_CONFIGS[name])
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), exact, rtol=1e-7, atol=1e-30)
    if SCHEDULE_CONFIGS[name]["rescale_betas_zero_snr"]:
        assert float(ours.alphas_cumprod[-1]) == 0.0 and float(ours.betas[-1]) == 1.0


def test_from_diffusers_config():
    cfg = dict(DDIMScheduler(**SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction").config)
    ours = sch.NoiseSchedule.from_diffusers_config(cfg)
    expected = sch.NoiseSchedule.create(**SD15, rescale_betas_zero_snr=True)
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), np.asarray(expected.alphas_cumprod))
    assert ours.beta_schedule == "scaled_linear"
    # A config without beta keys gets diffusers' defaults (linear 1e-4 .. 2e-2).
    default = sch.NoiseSchedule.from_diffusers_config({"_class_name": "DDIMScheduler"})
    assert relative_error(default.alphas_cumprod, DDIMScheduler().alphas_cumprod.numpy()) < 1e-6


def test_schedule_is_a_jittable_pytree(rng):
    ours = sch.NoiseSchedule.create(**SD15)
    t = jnp.asarray(rng.integers(0, 1000, 4), jnp.int32)
    values = jax.jit(sch.snr)(ours, t)
    np.testing.assert_allclose(np.asarray(values), np.asarray(sch.snr(ours, t)), rtol=1e-6)
    assert ours.num_train_timesteps == 1000


def _batch(rng, shape):
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, 1000, shape[0])
    t[0] = 999  # always cover the terminal (zero-SNR) timestep
    return x0, noise, t


@pytest.mark.parametrize("name", ["sd15", "sd15_zero_snr", "cosine"])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_noise_and_velocity_match_diffusers(rng, name, shape):
    ours, ref = _pair(name)
    x0, noise, t = _batch(rng, shape)
    tt = torch.from_numpy(t)
    expected_xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    expected_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    t_jax = jnp.asarray(t, jnp.int32)
    assert relative_error(jax.jit(sch.add_noise)(ours, x0, noise, t_jax), expected_xt) < 1e-6
    assert relative_error(sch.velocity(ours, x0, noise, t_jax), expected_v) < 1e-6
    assert relative_error(sch.training_target(ours, x0, noise, t_jax, "v_prediction"), expected_v) < 1e-6
    np.testing.assert_array_equal(np.asarray(sch.training_target(ours, x0, noise, t_jax, "epsilon")), noise)
    np.testing.assert_array_equal(np.asarray(sch.training_target(ours, x0, noise, t_jax, "sample")), x0)


# (x0 from an epsilon prediction is undefined at zero terminal SNR, so that pair is left out.)
@pytest.mark.parametrize("name,prediction_type", [
    ("sd15", "epsilon"), ("sd15", "v_prediction"), ("sd15", "sample"),
    ("sd15_zero_snr", "v_prediction"), ("sd15_zero_snr", "sample")])
def test_predict_x0_matches_ddim_step(rng, name, prediction_type):
    """Our x0 conversion against diffusers' DDIM pred_original_sample at one timestep."""
    ours, _ = _pair(name)
    ref = DDIMScheduler(**SCHEDULE_CONFIGS[name], clip_sample=False, prediction_type=prediction_type)
    ref.set_timesteps(50)
    shape = (2, 8, 8, 4)
    x_t = rng.standard_normal(shape).astype(np.float32)
    output = rng.standard_normal(shape).astype(np.float32)
    for t in (int(ref.timesteps[0]), int(ref.timesteps[len(ref.timesteps) // 2]), int(ref.timesteps[-1])):
        expected = ref.step(torch.from_numpy(output), t, torch.from_numpy(x_t)).pred_original_sample.numpy()
        x0 = sch.predict_x0(ours, output, x_t, jnp.full((2,), t), prediction_type)
        assert relative_error(x0, expected) < 1e-6, t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shape", SHAPES)
def test_conversions_invert_training_targets(rng, prediction_type, shape):
    """Model output = the exact target  =>  x0 and eps are recovered (float64 reference)."""
    ours, _ = _pair("sd15")
    x0, noise, t = _batch(rng, shape)
    t = jnp.asarray(t, jnp.int32)
    x_t = sch.add_noise(ours, x0, noise, t)
    target = sch.training_target(ours, x0, noise, t, prediction_type)
    x0_hat, eps_hat = sch.predict_x0_and_epsilon(ours, target, x_t, t, prediction_type)
    # Inverting amplifies rounding by up to sqrt((1 - abar) / abar) at t = 999 (~15).
    assert relative_error(x0_hat, x0) < 2e-5
    assert relative_error(eps_hat, noise) < 2e-5
    # And each formula against its float64 evaluation from the same float32 inputs; the
    # float32 rounding of x_t is amplified by 1 / sqrt(abar) (~15 at t = 999) for epsilon
    # and 1 / sqrt(1 - abar) (~34 at t = 0) for sample prediction, hence 1e-5, not 1e-6.
    abar = np.asarray(ours.alphas_cumprod, np.float64)[np.asarray(t)]
    a = np.sqrt(abar).reshape((-1,) + (1,) * (len(shape) - 1))
    s = np.sqrt(1 - abar).reshape(a.shape)
    out, xt = np.asarray(target, np.float64), np.asarray(x_t, np.float64)
    formulas = {"epsilon": ((xt - s * out) / a, out), "v_prediction": (a * xt - s * out, a * out + s * xt),
                "sample": (out, (xt - a * out) / s)}
    assert relative_error(x0_hat, formulas[prediction_type][0]) < 1e-5
    assert relative_error(eps_hat, formulas[prediction_type][1]) < 1e-5


@pytest.mark.parametrize("name", ["sd15", "sd15_zero_snr", "cosine"])
def test_snr_matches_diffusers(rng, name):
    ours, ref = _pair(name)
    t = np.concatenate([rng.integers(0, 999, 61), [0, 1, 2]])
    ours_snr = np.asarray(sch.snr(ours, jnp.asarray(t)), np.float64)
    # The exact SNR of the float64 construction, to float32 rounding.
    exact_abar = _float64_reference_alphas_cumprod(SCHEDULE_CONFIGS[name])[t]
    np.testing.assert_allclose(ours_snr, exact_abar / (1 - exact_abar), rtol=1e-6)
    # diffusers' SNR carries its float32 abar's error d (cumprod rounding plus the float32
    # ulp), divided by 1 - abar (formed from the float32 abar): large near t = 0.
    expected = compute_snr(ref, torch.from_numpy(t)).numpy().astype(np.float64)
    ref_abar = ref.alphas_cumprod.numpy()[t].astype(np.float64)
    abar_error = np.abs(ref_abar - exact_abar) / exact_abar + 2.0**-23
    assert np.all(np.abs(ours_snr / expected - 1) <= 2 * abar_error / (1 - exact_abar) + 1e-6)
    # Formula identity: diffusers' compute_snr on our table equals ours.
    ref.alphas_cumprod = torch.from_numpy(np.array(ours.alphas_cumprod))
    same_table = compute_snr(ref, torch.from_numpy(t)).numpy()
    mid = (t > 50) & (t < 999)  # where float32 1 - abar is accurate
    np.testing.assert_allclose(ours_snr[mid], same_table[mid], rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", ["sd15", "sd15_zero_snr"])
def test_min_snr_weights_follow_the_formula(rng, name, prediction_type):
    ours, _ = _pair(name)
    gamma = 5.0
    t = np.concatenate([rng.integers(0, 999, 63), [999]])
    abar = np.asarray(ours.alphas_cumprod, np.float64)[t]
    snr = abar / (1 - abar)
    clipped = np.minimum(snr, gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = {"epsilon": np.where(snr > 0, clipped / snr, 1.0), "v_prediction": clipped / (snr + 1),
                    "sample": clipped}[prediction_type]
    weights_fn = jax.jit(sch.min_snr_loss_weights, static_argnums=(2, 3))
    weights = weights_fn(ours, jnp.asarray(t), gamma, prediction_type)
    assert np.all(np.isfinite(np.asarray(weights)))
    np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5, atol=1e-7)


def test_training_noise_offset_is_per_sample_and_channel():
    key = jax.random.key(np.random.SeedSequence().entropy % (2**31), impl=KEY_IMPL)
    shape = (3, 5, 8, 8, 4)  # (B, F, h, w, C)
    plain = sch.sample_training_noise(key, shape)
    offset = sch.sample_training_noise(key, shape, offset=0.05)
    assert plain.shape == shape and plain.dtype == jnp.float32
    delta = np.asarray(offset - plain)
    # Constant over frames and space, different per sample and channel.
    np.testing.assert_allclose(delta, np.broadcast_to(delta[:, :1, :1, :1, :], shape), atol=1e-6)
    per_channel = delta[:, 0, 0, 0, :]
    assert np.unique(np.round(per_channel, 6)).size == per_channel.size
    assert 0.0 < np.abs(per_channel).max() < 0.05 * 6
    assert abs(float(plain.std()) - 1.0) < 0.05


def test_training_timesteps_in_range():
    t = sch.sample_training_timesteps(jax.random.key(0, impl=KEY_IMPL), 4096, 1000)
    assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) <= 999
    assert int(t.max()) > 990 and int(t.min()) < 10


def test_rejects_unknown_names():
    with pytest.raises(ValueError):
        sch.NoiseSchedule.create(beta_schedule="quadratic")
    ours = sch.NoiseSchedule.create()
    with pytest.raises(ValueError):
        sch.training_target(ours, jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.zeros((1,), jnp.int32), "flow")
