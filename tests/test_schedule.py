"""Schedules, forward process, targets and SNR weights against diffusers (PyTorch)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as torch_rescale_zero_snr
from diffusers.training_utils import compute_snr
from parity import EPS32, assert_within_rounding

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


def _pair(name, precision="float32"):
    """(our schedule, diffusers' DDIMScheduler) for a named config."""
    cfg = SCHEDULE_CONFIGS[name]
    return sch.NoiseSchedule.create(**cfg, precision=precision), DDIMScheduler(**cfg, clip_sample=False)


def _float64_reference_alphas_cumprod(cfg):
    """diffusers' own construction, run in float64 (torch) instead of float32."""
    n = 1000
    if cfg["beta_schedule"] == "squaredcos_cap_v2":
        betas = torch.from_numpy(sch._cosine_betas(n))
        ref_betas = DDIMScheduler(beta_schedule="squaredcos_cap_v2").betas.numpy()
        np.testing.assert_array_equal(betas.numpy().astype(np.float32), ref_betas)  # diffusers' python loop
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], n, dtype=torch.float64)
    if cfg["rescale_betas_zero_snr"]:
        betas = torch_rescale_zero_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0).numpy()


def _torch_sqrt(values):
    return torch.from_numpy(values).sqrt().numpy()


def _assert_sqrt_tables_correctly_rounded(ours):
    """The square-root tables are the correctly rounded float32 sqrt of the float32 table."""
    abar = np.asarray(ours.alphas_cumprod)
    np.testing.assert_array_equal(np.asarray(ours.sqrt_alphas_cumprod), np.sqrt(abar))
    np.testing.assert_array_equal(np.asarray(ours.sqrt_one_minus_alphas_cumprod), np.sqrt(np.float32(1) - abar))


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_tables_equal_diffusers_bit_for_bit(name):
    ours, ref = _pair(name)
    cfg = SCHEDULE_CONFIGS[name]
    _assert_sqrt_tables_correctly_rounded(ours)
    if not cfg["rescale_betas_zero_snr"]:
        np.testing.assert_array_equal(np.asarray(ours.betas), ref.betas.numpy())
        np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
        return
    # Rescaling takes square roots, and torch's float32 CPU sqrt (MKL) is off by up to 0.75
    # ulp: given torch's sqrt, our arithmetic reproduces diffusers bit for bit...
    plain = DDIMScheduler(**{**cfg, "rescale_betas_zero_snr": False}).betas.numpy()
    np.testing.assert_array_equal(sch.rescale_zero_terminal_snr(plain, sqrt=_torch_sqrt),
                                  torch_rescale_zero_snr(torch.from_numpy(plain)).numpy())
    # ...and with the correctly rounded one the tables differ by what those ulps allow:
    # 1.5 + 0.5 rounding on sqrt(abar_t) and on sqrt(abar_T), relative to their difference
    # (which cancels near T), squared, and ~2 roundings per step of the cumprod rebuilt
    # from the rescaled betas.
    sqrt_abar = np.sqrt(np.cumprod(1 - plain.astype(np.float64)))
    t = np.arange(len(plain))
    cancel = (sqrt_abar + sqrt_abar[-1]) / np.maximum(sqrt_abar - sqrt_abar[-1], 1e-30)
    ref_abar = ref.alphas_cumprod.numpy()
    assert_within_rounding(ours.alphas_cumprod, ref_abar, ref_abar * (2 * 2 * cancel + 2 * (t + 1)), 1,
                           "rescaled alphas_cumprod")
    assert float(ours.alphas_cumprod[-1]) == 0.0 and float(ours.betas[-1]) == 1.0


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_float64_precision_is_the_exact_table(name):
    """precision="float64": diffusers' construction in float64, rounded once."""
    ours, _ = _pair(name, precision="float64")
    exact = _float64_reference_alphas_cumprod(SCHEDULE_CONFIGS[name])
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), exact, rtol=EPS32, atol=1e-30)
    if SCHEDULE_CONFIGS[name]["rescale_betas_zero_snr"]:
        assert float(ours.alphas_cumprod[-1]) == 0.0 and float(ours.betas[-1]) == 1.0


# Real-world linspace ranges: DDPM's linear, SD's linear and sqrt(scaled_linear), odd sizes.
LINSPACE_CASES = [(start, end, n) for start, end in ((1e-4, 2e-2), (0.00085, 0.012), (0.00085**0.5, 0.012**0.5),
                                                      (1e-4, 0.012), (0.0, 1.0))
                  for n in (1, 2, 3, 17, 37, 999, 1000, 1001, 4000)]


@pytest.mark.parametrize("start,end,n", LINSPACE_CASES)
def test_float32_linspace_is_torchs(start, end, n):
    expected = torch.linspace(start, end, n, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(sch._torch_linspace_float32(start, end, n), expected)


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("num_train_timesteps", [37, 999])
def test_odd_train_lengths_and_trained_betas_equal_diffusers(name, num_train_timesteps):
    cfg = {**SCHEDULE_CONFIGS[name], "num_train_timesteps": num_train_timesteps}
    ref = DDIMScheduler(**cfg)
    ours = sch.NoiseSchedule.from_diffusers_config(dict(ref.config))
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    trained = [float(b) for b in ref.betas.numpy().astype(np.float64) * 0.99]  # a JSON list
    ref = DDIMScheduler(trained_betas=trained, num_train_timesteps=num_train_timesteps)
    ours = sch.NoiseSchedule.from_diffusers_config(dict(ref.config))
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert ours.beta_schedule == "trained"


def test_from_diffusers_config():
    cfg = dict(DDIMScheduler(**SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction").config)
    ours = sch.NoiseSchedule.from_diffusers_config(cfg)
    expected = sch.NoiseSchedule.create(**SD15, rescale_betas_zero_snr=True)
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), np.asarray(expected.alphas_cumprod))
    assert ours.beta_schedule == "scaled_linear"
    # A config without beta keys gets diffusers' defaults (linear 1e-4 .. 2e-2).
    default = sch.NoiseSchedule.from_diffusers_config({"_class_name": "DDIMScheduler"})
    np.testing.assert_array_equal(np.asarray(default.alphas_cumprod), DDIMScheduler().alphas_cumprod.numpy())
    with pytest.raises(ValueError, match="precision"):
        sch.NoiseSchedule.from_diffusers_config(cfg, precision="float16")


def test_schedule_is_a_jittable_pytree(rng):
    ours = sch.NoiseSchedule.create(**SD15)
    t = jnp.asarray(rng.integers(0, 1000, 4), jnp.int32)
    values = jax.jit(sch.snr)(ours, t)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(sch.snr(ours, t)))
    assert ours.num_train_timesteps == 1000


def _batch(rng, shape):
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(0, 1000, shape[0])
    t[0] = 999  # always cover the terminal (zero-SNR) timestep
    return x0, noise, t


def _scales(schedule, t, ndim):
    """sqrt(abar_t), sqrt(1 - abar_t) from our float32 tables as float64, (B, 1, ...)."""
    shape = (-1,) + (1,) * (ndim - 1)
    return (np.asarray(schedule.sqrt_alphas_cumprod, np.float64)[t].reshape(shape),
            np.asarray(schedule.sqrt_one_minus_alphas_cumprod, np.float64)[t].reshape(shape))


@pytest.mark.regression_seeds
@pytest.mark.parametrize("name", ["sd15", "sd15_zero_snr", "cosine"])
@pytest.mark.parametrize("shape", SHAPES)
def test_add_noise_and_velocity_match_diffusers(rng, name, shape):
    ours, ref = _pair(name)
    ref.alphas_cumprod = torch.from_numpy(np.array(ours.alphas_cumprod))  # same table (zero SNR: ulps apart)
    x0, noise, t = _batch(rng, shape)
    tt = torch.from_numpy(t)
    expected_xt = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    expected_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    t_jax = jnp.asarray(t, jnp.int32)
    # a x + s y on each side: our sqrt 0.5 ulp (1 rounding), torch's up to 0.75 ulp (1.5),
    # two products and a sum: 3 + 3.5 roundings of the terms' magnitudes; 8 allowed.
    a, s = _scales(ours, t, len(shape))
    assert_within_rounding(jax.jit(sch.add_noise)(ours, x0, noise, t_jax), expected_xt,
                           np.abs(a * x0) + np.abs(s * noise), 8, "add_noise")
    v_scale = np.abs(a * noise) + np.abs(s * x0)
    assert_within_rounding(sch.velocity(ours, x0, noise, t_jax), expected_v, v_scale, 8, "velocity")
    assert_within_rounding(sch.training_target(ours, x0, noise, t_jax, "v_prediction"), expected_v, v_scale, 8,
                           "v target")
    np.testing.assert_array_equal(np.asarray(sch.training_target(ours, x0, noise, t_jax, "epsilon")), noise)
    np.testing.assert_array_equal(np.asarray(sch.training_target(ours, x0, noise, t_jax, "sample")), x0)


# (x0 from an epsilon prediction is undefined at zero terminal SNR, so that pair is left out.)
@pytest.mark.regression_seeds
@pytest.mark.parametrize("name,prediction_type", [
    ("sd15", "epsilon"), ("sd15", "v_prediction"), ("sd15", "sample"),
    ("sd15_zero_snr", "v_prediction"), ("sd15_zero_snr", "sample")])
def test_predict_x0_matches_ddim_step(rng, name, prediction_type):
    """Our x0 conversion against diffusers' DDIM pred_original_sample at one timestep."""
    ours, _ = _pair(name)
    ref = DDIMScheduler(**SCHEDULE_CONFIGS[name], clip_sample=False, prediction_type=prediction_type)
    ref.alphas_cumprod = torch.from_numpy(np.array(ours.alphas_cumprod))
    ref.set_timesteps(50)
    shape = (2, 8, 8, 4)
    x_t = rng.standard_normal(shape).astype(np.float32)
    output = rng.standard_normal(shape).astype(np.float32)
    for t in (int(ref.timesteps[0]), int(ref.timesteps[len(ref.timesteps) // 2]), int(ref.timesteps[-1])):
        expected = ref.step(torch.from_numpy(output), t, torch.from_numpy(x_t)).pred_original_sample.numpy()
        x0 = sch.predict_x0(ours, output, x_t, jnp.full((2,), t), prediction_type)
        a, s = _scales(ours, np.full(2, t), len(shape))
        # Both sides: two sqrt (ours 0.5 ulp, torch's 0.75), a product, a difference and for
        # epsilon a division by sqrt(abar): <= 6 + 5 roundings of the terms over the divisor.
        scale = {"epsilon": (np.abs(x_t) + np.abs(s * output)) / a,
                 "v_prediction": np.abs(a * x_t) + np.abs(s * output), "sample": 0.0}[prediction_type]
        assert_within_rounding(x0, expected, scale, 12, f"x0 at t={t}")


@pytest.mark.regression_seeds
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shape", SHAPES)
def test_conversions_invert_training_targets(rng, prediction_type, shape):
    """Model output = the exact target  =>  x0 and eps are recovered."""
    ours, _ = _pair("sd15")
    x0, noise, t = _batch(rng, shape)
    t = jnp.asarray(t, jnp.int32)
    x_t = sch.add_noise(ours, x0, noise, t)
    target = sch.training_target(ours, x0, noise, t, prediction_type)
    x0_hat, eps_hat = sch.predict_x0_and_epsilon(ours, target, x_t, t, prediction_type)
    # x_t and v carry 3 roundings of their terms (first-order); inverting adds ~5 and
    # divides by sqrt(abar) (x0 from eps) or sqrt(1 - abar) (eps from x0): up to 8 roundings
    # of |a x0| + |s eps| (+ |a eps| + |s x0| for v), over that divisor.
    a, s = _scales(ours, np.asarray(t), len(shape))
    terms = np.abs(a * x0) + np.abs(s * noise)
    v_terms = terms + np.abs(a * noise) + np.abs(s * x0)
    x0_scale = {"epsilon": terms / a, "v_prediction": v_terms, "sample": 0.0}[prediction_type]
    eps_scale = {"epsilon": 0.0, "v_prediction": v_terms, "sample": terms / s}[prediction_type]
    assert_within_rounding(x0_hat, x0, x0_scale, 8, "x0")
    assert_within_rounding(eps_hat, noise, eps_scale, 8, "eps")
    # And each formula against its float64 evaluation from the same float32 inputs: the
    # two float32 scales (1 rounding each), a product, a sum, a division: 5 roundings.
    out, xt = np.asarray(target, np.float64), np.asarray(x_t, np.float64)
    abar = np.asarray(ours.alphas_cumprod, np.float64)[np.asarray(t)].reshape(a.shape)
    a, s = np.sqrt(abar), np.sqrt(1 - abar)
    formulas = {"epsilon": (((xt - s * out) / a, (np.abs(xt) + np.abs(s * out)) / a), (out, 0.0)),
                "v_prediction": ((a * xt - s * out, np.abs(a * xt) + np.abs(s * out)),
                                 (a * out + s * xt, np.abs(a * out) + np.abs(s * xt))),
                "sample": ((out, 0.0), ((xt - a * out) / s, (np.abs(xt) + np.abs(a * out)) / s))}
    (x0_ref, x0_scale), (eps_ref, eps_scale) = formulas[prediction_type]
    assert_within_rounding(x0_hat, x0_ref, x0_scale, 6, "x0 formula")
    assert_within_rounding(eps_hat, eps_ref, eps_scale, 6, "eps formula")


ALL_T = np.arange(1000)


@pytest.mark.parametrize("name", list(SCHEDULE_CONFIGS))
def test_snr_matches_diffusers(name):
    """Every timestep (no random draw): the formula on the same table, and float64 precision."""
    ours, ref = _pair(name)
    ref.alphas_cumprod = torch.from_numpy(np.array(ours.alphas_cumprod))
    expected = compute_snr(ref, torch.from_numpy(ALL_T)).numpy()
    # (a / s)^2: ours 2 sqrt + division (3 roundings, doubled by the square) + the square: 7;
    # diffusers' MKL sqrt 1.5 each: 9. 16 roundings of the SNR itself.
    ours_snr = np.asarray(sch.snr(ours, jnp.asarray(ALL_T)))
    assert_within_rounding(ours_snr, expected, np.abs(expected), 16, "snr")
    # float64 precision against the exact SNR of diffusers' construction in float64.
    exact = _float64_reference_alphas_cumprod(SCHEDULE_CONFIGS[name])
    exact_snr = exact / (1 - exact)
    precise = np.asarray(sch.snr(_pair(name, "float64")[0], jnp.asarray(ALL_T)))
    assert_within_rounding(precise, exact_snr, exact_snr, 8, "float64-precision snr")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", ["sd15", "sd15_zero_snr"])
def test_min_snr_weights_follow_the_formula(name, prediction_type):
    """Every timestep (no random draw), against float64 on the same float32 table."""
    ours, _ = _pair(name)
    gamma = 5.0
    abar = np.asarray(ours.alphas_cumprod, np.float64)
    snr = abar / (1 - abar)
    clipped = np.minimum(snr, gamma)
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = {"epsilon": np.where(snr > 0, clipped / snr, 1.0), "v_prediction": clipped / (snr + 1),
                    "sample": clipped}[prediction_type]
    weights_fn = jax.jit(sch.min_snr_loss_weights, static_argnums=(2, 3))
    weights = np.asarray(weights_fn(ours, jnp.asarray(ALL_T), gamma, prediction_type))
    assert np.all(np.isfinite(weights))
    # The SNR's 8 roundings (1 - abar, 2 sqrt, a division, doubled by the square) and the
    # weight's own 1 or 2: 16 roundings of the weight.
    assert_within_rounding(weights, expected, expected, 16, "min-SNR weights")


def test_training_noise_offset_is_per_sample_and_channel(rng):
    key = jax.random.key(int(rng.integers(2**31)), impl=KEY_IMPL)
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
    # The std of 3840 unit normals is within 0.06 of 1 but for p ~ 1e-7 (5.3 standard errors).
    assert abs(float(plain.std()) - 1.0) < 0.06


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
