"""The Flax Wan2.1 VAE against diffusers' AutoencoderKLWan (a small random model saved with
save_pretrained, read back by load_wan_vae): encode and decode parity, chunked == whole,
the chunked decode's memory bounded by the chunk, and the loader's errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import consist_jax
from consist_jax.convert.loading import CheckpointError
from consist_jax.convert.wan_vae import load_wan_vae
from consist_jax.models import wan_vae
from parity import relative_error

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4  # the network parity bar (fp32)
# Wan2.1's layout (4 levels: 8x spatial, time halved by the last two) at a tiny width.
SMALL = dict(base_dim=8, z_dim=4, num_res_blocks=1)
BATCH, FRAMES, HEIGHT, WIDTH = 2, 9, 16, 24  # 9 = 1 + 4 * 2: the first frame and two chunks
LATENT_SHAPE = (BATCH, 3, HEIGHT // 8, WIDTH // 8, SMALL["z_dim"])


def _module_seed(name):
    seed = int(os.environ.get("CONSIST_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    print(f"[{name}] seed={seed}")
    return seed


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(folder, torch model, flax module, params) of a small random AutoencoderKLWan."""
    seed = _module_seed("wan")
    torch.manual_seed(seed)
    stats = np.random.default_rng(seed)
    model = diffusers.AutoencoderKLWan(
        **SMALL, latents_mean=stats.normal(size=4).tolist(),
        latents_std=stats.uniform(0.5, 3.0, size=4).tolist()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # RMS norms start at 1: perturb so a mix-up shows.
                p.add_(0.2 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("wan_vae"))
    model.save_pretrained(folder)
    module, params = load_wan_vae(folder)
    return folder, model, module, params


def to_torch(x):
    """(B, F, H, W, C) -> torch (B, C, F, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def from_torch(t):
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def random_video(rng):
    return rng.uniform(-1, 1, (BATCH, FRAMES, HEIGHT, WIDTH, 3)).astype(np.float32)


def test_encode_matches_diffusers(wan, rng):
    """The posterior mean, and a sample for one fixed noise (so the log-variance too)."""
    _, model, module, params = wan
    video = random_video(rng)
    generator_seed = int(rng.integers(2**31))
    with torch.no_grad():
        posterior = model.encode(to_torch(video)).latent_dist
        sample = posterior.sample(generator=torch.Generator().manual_seed(generator_seed))
        # diffusers' randn_tensor on the CPU: torch.randn with that generator.
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(generator_seed))
    ours = wan_vae.encode(module, params, jnp.asarray(video))
    assert ours.mean.shape == LATENT_SHAPE
    errors = {"mean": relative_error(ours.mean, from_torch(posterior.mean)),
              "sample": relative_error(ours.mean + ours.std * from_torch(noise), from_torch(sample))}
    print(errors)
    assert max(errors.values()) <= TOL, errors


@pytest.fixture(scope="module")
def decoded(wan):
    """Random latents and their chunked decoding: diffusers' and ours."""
    _, model, module, params = wan
    z = np.random.default_rng(_module_seed("decoded")).normal(size=LATENT_SHAPE).astype(np.float32)
    with torch.no_grad():
        theirs = from_torch(model.decode(to_torch(z)).sample)
    return z, theirs, np.asarray(wan_vae.decode(module, params, jnp.asarray(z)))


def test_decode_matches_diffusers(decoded):
    _, theirs, ours = decoded
    assert ours.shape == (BATCH, FRAMES, HEIGHT, WIDTH, 3)
    # diffusers clamps to [-1, 1]; most values must be inside, or the clamp would hide errors.
    assert np.mean(np.abs(theirs) < 1) > 0.5
    error = relative_error(ours, theirs)
    print({"decode": error})
    assert error <= TOL


def test_chunked_equals_whole_clip(wan, decoded, rng):
    """One pass over the whole clip (zero padding, the first-frame rules) gives what the
    chunks carrying the cache give: the same sums, up to float32 summation order.
    (diffusers has no whole-clip path: its feat_cache=None path skips the temporal
    resampling, so both of ours are compared with its chunked one above.)"""
    _, _, module, params = wan
    z, _, chunked = decoded
    whole = wan_vae.decode(module, params, jnp.asarray(z), chunked=False)
    assert relative_error(whole, chunked) <= TOL
    video = jnp.asarray(random_video(rng))
    encoded = [wan_vae.encode(module, params, video, chunked=c).mean for c in (True, False)]
    assert relative_error(*encoded) <= TOL


def test_chunked_decode_memory_is_bounded_by_the_chunk(wan):
    """Twice the latent frames: the whole-clip decode's scratch memory grows, the chunked
    one's grows by at most the output frames the scan stacks (not with the activations)."""
    _, _, module, params = wan

    def memory(frames, chunked):
        z = jax.ShapeDtypeStruct((BATCH, frames, *LATENT_SHAPE[2:]), jnp.float32)
        analysis = wan_vae._decode.lower(module, params, z, chunked).compile().memory_analysis()
        return analysis.temp_size_in_bytes, analysis.output_size_in_bytes

    (temp, out), (temp2, out2) = memory(LATENT_SHAPE[1], True), memory(2 * LATENT_SHAPE[1], True)
    print({"chunked temp bytes": (temp, temp2), "output bytes": (out, out2)})
    assert temp2 - temp <= 2 * (out2 - out)  # the stacked frames and their concatenation
    assert temp2 < 1.5 * temp


def test_latent_normalisation_is_the_pipelines(wan, rng):
    """diffusers' Wan pipelines: latents = (z - mean) * (1 / std); z = latents / (1 / std) + mean."""
    _, model, module, _ = wan
    z = rng.normal(size=LATENT_SHAPE).astype(np.float32)
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    scaled = wan_vae.scale_latents(module.config, jnp.asarray(z))
    np.testing.assert_allclose(scaled, from_torch((to_torch(z) - mean) * inv_std), rtol=1e-6, atol=1e-6)
    back = wan_vae.unscale_latents(module.config, scaled)
    np.testing.assert_allclose(back, from_torch(to_torch(np.asarray(scaled)) / inv_std + mean),
                               rtol=1e-6, atol=1e-6)


def test_scaled_latent_helpers(wan, decoded, rng):
    """encode_latents = scale_latents(posterior mean); decode_latents undoes the scaling
    (the compiled encode and decode are the tests' above)."""
    _, _, module, params = wan
    video = jnp.asarray(random_video(rng))
    latents = wan_vae.encode_latents(module, params, video)
    mean = wan_vae.encode(module, params, video).mean
    np.testing.assert_array_equal(latents, wan_vae.scale_latents(module.config, mean))
    z, _, ours = decoded
    video = wan_vae.decode_latents(module, params, wan_vae.scale_latents(module.config, jnp.asarray(z)))
    assert relative_error(video, ours) <= TOL  # (z - m) / s * s + m is not bit-exact


def test_lazy_export():
    assert consist_jax.load_wan_vae is load_wan_vae


def _copy_folder(folder, tmp_path, *, config=None, drop=None, extra=None):
    """A copy of ``folder`` with config changes, one tensor removed or one added."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config or {})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    if drop:
        del state[drop]
    state.update(extra or {})
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return str(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(drop="decoder.up_blocks.1.upsamplers.0.time_conv.weight"),
     "1 missing key(s): decoder.up_blocks.1.upsamplers.0.time_conv.weight"),
    (dict(extra={"encoder.extra.weight": np.zeros(2, np.float32)}),
     "1 unexpected key(s): encoder.extra.weight"),
    (dict(config={"is_residual": True}), "is_residual=True is not supported"),
    (dict(config={"attn_scales": [1.0]}), "attn_scales=[1.0] is not supported"),
    (dict(config={"temperal_downsample": [False, True, True, True]}), "must be 3 booleans"),
    (dict(config={"scale_factor_spatial": 16}), "scale_factor_spatial=16 disagrees"),
    (dict(config={"latents_std": [1.0, 1.0, 0.0, 1.0]}), "latents_std[2]=0.0"),
])
def test_loader_errors_name_the_key(wan, tmp_path, change, message):
    folder = _copy_folder(wan[0], tmp_path, **change)
    with pytest.raises((CheckpointError, ValueError)) as info:
        load_wan_vae(folder)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_video_shape_errors(wan):
    _, _, module, params = wan
    with pytest.raises(ValueError, match=r"\(B, 1 \+ 4k frames, H, W, 3\), got \(1, 8, 16, 16, 3\)"):
        wan_vae.encode(module, params, jnp.zeros((1, 8, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"latents: expected shape \(B, F, h, w, 4\)"):
        wan_vae.decode(module, params, jnp.zeros((1, 2, 2, 2, 3)))


def test_export_round_trips_the_file(wan):
    """params_to_state_dict inverts the loader's mapping, Conv3d kernels included."""
    from consist_jax.convert.loading import params_to_state_dict

    folder, _, _, params = wan
    file = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    exported = params_to_state_dict(params)
    assert sorted(exported) == sorted(file)
    for key, value in file.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_bfloat16_traces_chunked(wan):
    """A bf16 model keeps one dtype per cache entry across chunks (the scan's carry),
    checked by tracing only (no compile)."""
    folder = wan[0]
    module, params = load_wan_vae(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    video = jax.ShapeDtypeStruct((1, FRAMES, HEIGHT, WIDTH, 3), jnp.float32)
    moments = jax.eval_shape(lambda p, x: wan_vae._encode_moments(module, p, x, True), params, video)
    assert moments.shape == (1, 3, HEIGHT // 8, WIDTH // 8, 8) and moments.dtype == jnp.bfloat16
    z = jax.ShapeDtypeStruct((1, 3, HEIGHT // 8, WIDTH // 8, 4), jnp.bfloat16)
    out = jax.eval_shape(lambda p, z: wan_vae._decode(module, p, z, True), params, z)
    assert out.shape == (1, FRAMES, HEIGHT, WIDTH, 3) and out.dtype == jnp.bfloat16
