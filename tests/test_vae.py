"""The Flax AutoencoderKL against diffusers' (built from small random configs, saved as
safetensors in tmp dirs), plus the loader's error paths and a full SD-size load."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from consist_jax.convert.loading import CheckpointError
from consist_jax.convert.vae import load_vae
from consist_jax.models import vae as vae_lib
from parity import relative_error

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SMALL = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)


def _module_seed(name):
    seed = int(os.environ.get("CONSIST_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    print(f"[{name}] seed={seed}")
    return seed


def build_torch_vae(seed, **config):
    """A diffusers AutoencoderKL with random weights, norm affines included."""
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # GroupNorm starts at (1, 0): perturb so a mix-up shows.
                p.add_(0.2 * torch.randn_like(p))
    return model


def to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_encode_decode(model, images, latents):
    """diffusers' posterior mean, logvar (NHWC) and the decoding of ``latents`` (unscaled)."""
    with torch.no_grad():
        posterior = model.encode(to_nchw(images)).latent_dist
        decoded = model.decode(to_nchw(latents)).sample
    return to_nhwc(posterior.mean), to_nhwc(posterior.logvar), to_nhwc(decoded)


@pytest.fixture(scope="module")
def small_vae(tmp_path_factory):
    """(folder, torch model, flax module, params) of a small random VAE."""
    folder = str(tmp_path_factory.mktemp("vae"))
    model = build_torch_vae(_module_seed("small_vae"), **SMALL)
    model.save_pretrained(folder)
    module, params = load_vae(folder)
    return folder, model, module, params


def random_images(rng, n, size=32):
    return rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def check_parity(model, module, params, rng):
    images = random_images(rng, 2)
    # The encoder's output size, so the compiled decode is shared with other tests.
    latents = rng.normal(size=(2, 16, 16, module.config.latent_channels)).astype(np.float32)
    mean, logvar, decoded = torch_encode_decode(model, images, latents)
    posterior = vae_lib._encode_posterior(module, params, images)
    ours = vae_lib._decode(module, params, latents)
    errors = {
        "mean": relative_error(posterior.mean, mean),
        "logvar": relative_error(posterior.logvar, logvar),
        "decode": relative_error(ours, decoded),
    }
    print(errors)
    assert max(errors.values()) <= TOL, errors
    return images, posterior


def test_parity_fp32(small_vae, rng):
    _, model, module, params = small_vae
    check_parity(model, module, params, rng)


def test_scaled_latent_helpers(small_vae, rng):
    _, _, module, params = small_vae
    images = random_images(rng, 2)
    posterior = vae_lib._encode_posterior(module, params, images)
    mode = vae_lib.encode_latents(module, params, images)
    np.testing.assert_allclose(mode, posterior.mean * 0.18215, rtol=1e-6)
    key = jax.random.key(int(rng.integers(2**31)))
    sample = vae_lib.encode_latents(module, params, images, rng=key)
    # The implied noise is standard normal (2048 draws); checked without an eager sampler,
    # whose compile is slow on CPU.
    noise = (np.asarray(sample) / 0.18215 - posterior.mean) / posterior.std
    assert abs(float(noise.mean())) < 0.15 and 0.85 < float(noise.std()) < 1.15
    np.testing.assert_array_equal(sample, vae_lib.encode_latents(module, params, images, rng=key))
    other = vae_lib.encode_latents(module, params, images, rng=jax.random.fold_in(key, 1))
    assert not np.allclose(sample, other)
    decoded = vae_lib.decode_latents(module, params, mode)
    raw = vae_lib._decode(module, params, posterior.mean)
    # mode * s / s is not bit-exact, hence a tolerance.
    assert relative_error(decoded, np.clip(raw, -1, 1)) <= 1e-5
    assert decoded.shape == images.shape and float(jnp.abs(decoded).max()) <= 1.0


def test_shift_factor_round_trip(rng):
    config = vae_lib.VAEConfig(scaling_factor=0.3611, shift_factor=0.1159)
    z = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    scaled = vae_lib.scale_latents(config, z)
    np.testing.assert_allclose(scaled, (z - 0.1159) * 0.3611, rtol=1e-6)
    np.testing.assert_allclose(vae_lib.unscale_latents(config, scaled), z, rtol=1e-5, atol=1e-6)


def test_parity_fp16_file(small_vae, tmp_path, rng):
    """A half-precision variant file loads into float32 params that match the fp16 weights."""
    _, model, _, _ = small_vae
    half = build_torch_vae(int(rng.integers(2**31)), **SMALL).half()
    half.save_pretrained(str(tmp_path), variant="fp16")
    weights = tmp_path / "diffusion_pytorch_model.fp16.safetensors"
    assert weights.exists() and not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    assert next(iter(load_file(str(weights)).values())).dtype == np.float16
    module, params = load_vae(str(tmp_path))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    check_parity(half.float(), module, params, rng)


def test_bfloat16_load_runs_close(small_vae, rng):
    folder, model, _, _ = small_vae
    module, params = load_vae(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    images = random_images(rng, 1)
    mean, _, _ = torch_encode_decode(model, images, np.full((1, 16, 16, 4), 0.5, np.float32))
    posterior = vae_lib._encode_posterior(module, params, images)
    assert posterior.mean.dtype == jnp.bfloat16
    assert relative_error(posterior.mean, mean) < 0.1


def test_variant_config_parity(tmp_path, rng):
    """Two layers per block, no quant convs, no mid attention."""
    config = dict(
        SMALL,
        block_out_channels=(16, 32),
        layers_per_block=2,
        norm_num_groups=4,
        latent_channels=3,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=0.5,
    )
    model = build_torch_vae(int(rng.integers(2**31)), **config)
    model.save_pretrained(str(tmp_path))
    module, params = load_vae(str(tmp_path))
    assert "quant_conv" not in params and "attentions.0" not in params["encoder"]["mid_block"]
    images = random_images(rng, 2)
    latents = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    mean, logvar, decoded = torch_encode_decode(model, images, latents)
    posterior = vae_lib._encode_posterior(module, params, images)
    assert relative_error(posterior.mean, mean) <= TOL
    assert relative_error(posterior.logvar, logvar) <= TOL
    assert relative_error(vae_lib._decode(module, params, latents), decoded) <= TOL


def test_map_in_chunks_order_and_remainder(rng):
    """Full chunks through lax.map plus a remainder, pytree outputs, order kept."""
    x = rng.normal(size=(7, 3)).astype(np.float32)
    fn = lambda c: {"double": 2 * c, "total": c.sum(axis=1)}  # noqa: E731
    for chunk_size in (1, 3, 7, 10):
        out = jax.jit(vae_lib.map_in_chunks, static_argnums=(0, 2))(fn, x, chunk_size)
        np.testing.assert_allclose(out["double"], 2 * x, rtol=1e-6)
        np.testing.assert_allclose(out["total"], x.sum(axis=1), rtol=1e-6)


SHARDED_CHUNKS_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from consist_jax.models import vae as vae_lib

rng = np.random.default_rng(int(sys.argv[2]))
x = rng.standard_normal((8 * 5, 6)).astype(np.float32)  # 5 items on each of 8 devices
w = rng.standard_normal((6, 6)).astype(np.float32)
fn = lambda c: {"y": jnp.tanh(c @ w), "total": c.sum(axis=1)}  # item by item
mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)  # as the trainer's
with jax.set_mesh(mesh):
    sharded = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    compiled = jax.jit(lambda x: vae_lib.map_in_chunks(fn, x, 2)).lower(sharded).compile()
    out = compiled(sharded)
text = compiled.as_text()
for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in text, collective
np.testing.assert_allclose(out["y"], np.tanh(x @ w), rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(out["total"], x.sum(axis=1), rtol=1e-5, atol=1e-6)
print("OK")
"""


def test_chunks_stay_on_their_devices(rng):
    """Under a mesh splitting the items over 8 devices, each loop step takes chunks from
    every device's own part (2 full chunks and a remainder of 1 here): the compiled loop
    moves nothing between devices (SPMD gathered every item onto every device to slice a
    global chunk: on a v5p-128 the VAE encoded all 1,536 frames of a batch on each chip)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", SHARDED_CHUNKS_SCRIPT, repo, str(int(rng.integers(2**31)))],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_frames_chunked_equal_unchunked(small_vae, rng):
    """Two frames, one per chunk: the shapes of the parity test, so compiles are shared
    (the remainder path is covered by test_map_in_chunks_order_and_remainder)."""
    _, _, module, params = small_vae
    frames = random_images(rng, 2).reshape(1, 2, 32, 32, 3)
    whole = vae_lib.encode_latents(module, params, frames[0])
    chunked = vae_lib.encode_frames(module, params, frames, chunk_size=1)
    assert chunked.shape == (1, 2, 16, 16, 4)
    assert relative_error(chunked[0], whole) <= 1e-5
    key = jax.random.key(int(rng.integers(2**31)))
    sample_whole = vae_lib.encode_latents(module, params, frames[0], rng=key)
    sample_chunked = vae_lib.encode_frames(module, params, frames, chunk_size=1, rng=key)
    assert relative_error(sample_chunked[0], sample_whole) <= 1e-5
    decoded = vae_lib.decode_frames(module, params, chunked, chunk_size=1)
    assert decoded.shape == frames.shape
    assert relative_error(decoded[0], vae_lib.decode_latents(module, params, whole)) <= 1e-5


def test_legacy_attention_names_load(small_vae, tmp_path):
    folder, _, _, params = small_vae
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in state.items():
        for new, legacy in old.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        renamed[key] = value
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    _, legacy_params = load_vae(str(tmp_path))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(legacy_params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"latents_mean": [0.0] * 4}, "latents_mean"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"norm_type": "spatial"}, "norm_type"),
        ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
    ],
)
def test_config_rejects_unsupported(change, message):
    config = {"_class_name": "AutoencoderKL", **SMALL, **change}
    with pytest.raises(ValueError, match=message):
        vae_lib.VAEConfig.from_diffusers(config)


def test_config_defaults_for_old_files():
    old = {"_class_name": "AutoencoderKL", **SMALL, "sample_size": 256}
    config = vae_lib.VAEConfig.from_diffusers(old)
    assert config.scaling_factor == 0.18215 and config.shift_factor is None
    assert config.use_quant_conv and config.mid_block_add_attention
    assert config.downsample_factor == 2


def test_folder_without_config(small_vae, tmp_path):
    folder = small_vae[0]
    shutil.copy(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path))


def test_weights_of_another_model(small_vae, tmp_path, rng):
    folder = small_vae[0]
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    clip_like = {
        "vision_model.embeddings.class_embedding": rng.normal(size=(32,)).astype(np.float32),
        "visual_projection.weight": rng.normal(size=(16, 32)).astype(np.float32),
    }
    save_file(clip_like, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key.*unexpected key.*visual_projection"):
        load_vae(str(tmp_path))


def test_misshapen_weights(small_vae, tmp_path):
    folder = small_vae[0]
    shutil.copy(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["latent_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"misshapen.*quant_conv"):
        load_vae(str(tmp_path))


def test_bad_images(small_vae, rng):
    _, _, module, params = small_vae
    pixels = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(TypeError, match=r"floating-point images in \[-1, 1\].*uint8"):
        vae_lib.encode_latents(module, params, pixels)
    with pytest.raises(ValueError, match=r"values in \[-1, 1\]"):
        vae_lib.encode_latents(module, params, pixels.astype(np.float32))
    with pytest.raises(ValueError, match=r"frames: expected values in \[-1, 1\]"):
        vae_lib.encode_frames(module, params, pixels[None].astype(np.float32) * 2, chunk_size=1)


# The full-size check runs in a fresh interpreter so its peak memory is the load's own
# (not torch's, which built the checkpoint).
_FULL_SIZE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time, tracemalloc
    import numpy as np, jax
    from consist_jax.convert.vae import load_vae
    from consist_jax.models import vae as vae_lib

    def memory_mb():
        # VmHWM (peak RSS) is per process image, unlike ru_maxrss, which survives exec.
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}

    before = memory_mb()
    tracemalloc.start()  # numpy reports its buffers: the host arrays' peak.
    start = time.perf_counter()
    module, params = load_vae(sys.argv[1])
    jax.block_until_ready(params)
    load_s = time.perf_counter() - start
    numpy_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    after_load = memory_mb()
    image = np.random.default_rng(int(sys.argv[2])).uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    start = time.perf_counter()
    latents = jax.block_until_ready(vae_lib.encode_latents(module, params, image))
    encode_s = time.perf_counter() - start
    decoded = jax.block_until_ready(vae_lib.decode_latents(module, params, latents))
    print(json.dumps(dict(
        load_s=load_s, encode_s=encode_s, decode_s=time.perf_counter() - start - encode_s,
        rss_before_load_mb=before["VmRSS"], peak_before_load_mb=before["VmHWM"],
        rss_after_load_mb=after_load["VmRSS"], peak_after_load_mb=after_load["VmHWM"],
        peak_end_mb=memory_mb()["VmHWM"], load_numpy_peak_mb=numpy_peak_mb,
        params=sum(p.size for p in jax.tree.leaves(params)),
        latent_shape=list(latents.shape), image_shape=list(decoded.shape),
        finite=bool(np.isfinite(np.asarray(decoded)).all()),
    )))
    """
)


def test_full_size_vae_loads_and_round_trips(tmp_path, rng):
    """An SD-1.5-size VAE (random weights) in diffusers format: load + 256x256 round trip."""
    config = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    torch.manual_seed(int(rng.integers(2**31)))
    diffusers.AutoencoderKL(**config).save_pretrained(str(tmp_path))
    size_mb = os.path.getsize(tmp_path / "diffusion_pytorch_model.safetensors") / 2**20
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", _FULL_SIZE_SCRIPT, str(tmp_path), str(int(rng.integers(2**31)))],
        capture_output=True, text=True, env=env, cwd=repo, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["file_mb"] = round(size_mb, 1)
    report["load_peak_delta_mb"] = round(report["peak_after_load_mb"] - report["rss_before_load_mb"], 1)
    print("full-size VAE:", report)
    assert report["params"] == 83_653_863
    assert report["latent_shape"] == [1, 32, 32, 4] and report["image_shape"] == [1, 256, 256, 3]
    assert report["finite"]
