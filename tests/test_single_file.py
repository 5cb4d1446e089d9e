"""Single-file SD-1.x checkpoints (LDM / CompVis key layout): diffusers' own single-file
loader reads the file we write, and our loader reads it into the same params as the
diffusers folder of the same weights; forward passes match diffusers'; errors name keys."""
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from parity import relative_error
from safetensors.numpy import load_file, save_file

from consist_jax.convert import single_file as sf
from consist_jax.convert.loading import CheckpointError
from consist_jax.convert.unet import load_unet
from consist_jax.convert.vae import load_vae
from consist_jax.factory import build_model, fresh_unet_option_defaults
from consist_jax.models import vae as vae_lib
from consist_jax.models.unet import UNetConfig
from consist_jax.models.vae import VAEConfig

torch.set_num_threads(2)
TOL = 1e-4

# SD-1.5's block types and depth (four levels, two layers each), few channels.
TINY_UNET = dict(
    block_out_channels=(8, 16, 16, 16), layers_per_block=2, attention_head_dim=2, cross_attention_dim=8,
    norm_num_groups=4, sample_size=16, down_block_types=tuple(sf.SD15_UNET_CONFIG["down_block_types"]),
    up_block_types=tuple(sf.SD15_UNET_CONFIG["up_block_types"]))
TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
    down_block_types=tuple(sf.SD15_VAE_CONFIG["down_block_types"]),
    up_block_types=tuple(sf.SD15_VAE_CONFIG["up_block_types"]))
# What a shared SD-1.5 file holds besides the UNet and the VAE (all ignored).
EXTRA = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float32),
         "model_ema.decay": np.array(0.9999, np.float32), "alphas_cumprod": np.linspace(1, 0, 10, dtype=np.float32)}


def _perturbed(model, seed):
    """Every parameter random (norm affines and zero-initialised outputs included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _state(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(torch UNet, torch VAE, diffusers folder with unet/ and vae/, LDM single file)."""
    seed = int(os.environ.get("CONSIST_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"[checkpoint] seed={seed}")
    unet = _perturbed(UNet2DConditionModel(**TINY_UNET), seed)
    vae = _perturbed(TorchVAE(**TINY_VAE), seed + 1)
    folder = tmp_path_factory.mktemp("pipeline")
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    unet_config = UNetConfig.from_diffusers(json.loads((folder / "unet" / "config.json").read_text()))
    vae_config = VAEConfig.from_diffusers(json.loads((folder / "vae" / "config.json").read_text()))
    path = str(folder / "model.safetensors")
    save_file({**sf.to_ldm_state_dict(_state(unet), unet_config, _state(vae), vae_config), **EXTRA}, path)
    return unet, vae, str(folder), path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """Ours from the single file: ((unet module, params), (vae module, params))."""
    _, _, folder, path = checkpoint
    return (sf.load_unet_single_file(path, folder, rng=jax.random.key(0)),
            sf.load_vae_single_file(path, folder))


def test_diffusers_single_file_loader_reads_the_file(checkpoint):
    """The file is in the layout diffusers' single-file conversion reads: it recovers every
    weight exactly (so the file, and our reading of it, follow diffusers' key mapping)."""
    unet, vae, folder, path = checkpoint
    theirs_unet = UNet2DConditionModel.from_single_file(path, config=folder, subfolder="unet", local_files_only=True)
    theirs_vae = TorchVAE.from_single_file(path, config=folder, subfolder="vae", local_files_only=True)
    for original, read in ((unet, theirs_unet), (vae, theirs_vae)):
        expected, got = original.state_dict(), read.state_dict()
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_same_params_as_the_diffusers_folder(checkpoint, loaded):
    _, _, folder, _ = checkpoint
    (unet, unet_params), (vae, vae_params) = loaded
    folder_unet, folder_unet_params = load_unet(folder + "/unet", rng=jax.random.key(0))
    folder_vae, folder_vae_params = load_vae(folder + "/vae")
    assert unet.config == folder_unet.config and vae.config == folder_vae.config
    for ours, theirs in ((unet_params, folder_unet_params), (vae_params, folder_vae_params)):
        assert jax.tree.structure(ours) == jax.tree.structure(theirs)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))


def test_unet_forward_matches_diffusers(checkpoint, loaded, rng):
    unet, _, _, _ = checkpoint
    module, params = loaded[0]
    sample = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=(2,))
    context = rng.standard_normal((2, 3, TINY_UNET["cross_attention_dim"])).astype(np.float32)
    ours = jax.jit(module.apply)({"params": params}, sample, timesteps, context)
    with torch.no_grad():
        theirs = unet(torch.from_numpy(sample).permute(0, 3, 1, 2), torch.from_numpy(timesteps),
                      encoder_hidden_states=torch.from_numpy(context)).sample.permute(0, 2, 3, 1).numpy()
    assert relative_error(ours, theirs) <= TOL


def test_vae_forward_matches_diffusers(checkpoint, loaded, rng):
    _, vae, _, _ = checkpoint
    module, params = loaded[1]
    images = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    latents = rng.standard_normal((1, 2, 2, 4)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean.permute(0, 2, 3, 1)
        decoded = vae.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1)
    assert relative_error(vae_lib._encode_posterior(module, params, images).mean, mean.numpy()) <= TOL
    assert relative_error(vae_lib._decode(module, params, latents), decoded.numpy()) <= TOL


def test_built_in_config_is_sd15():
    """The built-in configs are SD-1.5's, and the key mapping numbers its full-size UNet as
    diffusers' conversion does (a meta-device model: shapes only)."""
    assert UNetConfig.from_diffusers(sf.SD15_UNET_CONFIG) == UNetConfig()
    assert VAEConfig.from_diffusers(sf.SD15_VAE_CONFIG) == VAEConfig()
    with torch.device("meta"):
        keys = UNet2DConditionModel(**sf.SD15_UNET_CONFIG).state_dict().keys()
    ldm = sf.to_ldm_state_dict(dict.fromkeys(keys), UNetConfig())
    assert len(ldm) == 686  # SD-1.5 files hold 686 model.diffusion_model.* tensors
    assert set(convert_ldm_unet_checkpoint(ldm, sf.SD15_UNET_CONFIG)) == set(keys)


def test_model_factory_reads_the_file(checkpoint, loaded):
    """model.pretrained_single_file selects the file: its UNet, and its VAE when
    model.codec.vae_path is empty."""
    from tests.configs.tiny import get_config

    _, _, folder, path = checkpoint
    config = get_config().model
    config.update(pretrained_single_file=path, pretrained_single_file_config=folder)
    config.codec.update(kind="vae", vae_path="")
    config.context.update(kind="none")
    config.unet.update(pose_block_out_channels=None, **fresh_unet_option_defaults())  # the demo's start fresh
    model, params, frozen = build_model(config, jax.random.key(0))
    expected_unet, expected_vae = loaded[0][1], loaded[1][1]
    assert jax.tree.structure(params) == jax.tree.structure({k: v for k, v in expected_unet.items()
                                                             if k != "pose_encoder"})
    assert all(np.array_equal(params[k]["kernel"], expected_unet[k]["kernel"]) for k in ("conv_in", "conv_out"))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen["vae"]), jax.tree.leaves(expected_vae)))


def test_fp16_file(checkpoint, loaded, tmp_path):
    """Shared SD files are mostly fp16: read as the float32 of the fp16 values."""
    _, _, folder, path = checkpoint
    half = _edited(path, tmp_path, lambda s: s.update({k: v.astype(np.float16) for k, v in s.items()}))
    _, params = sf.load_vae_single_file(half, folder)
    expected = loaded[1][1]
    for ours, full in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, np.asarray(full).astype(np.float16).astype(np.float32))


def _edited(path, tmp_path, edit):
    state = load_file(path)
    edit(state)
    out = str(tmp_path / "edited.safetensors")
    save_file(state, out)
    return out


def test_errors_name_the_files_keys(checkpoint, tmp_path):
    """Missing, misshapen and unexpected keys are named as the file names them."""
    _, _, folder, path = checkpoint

    def edit(state):
        state.pop("model.diffusion_model.input_blocks.4.1.proj_in.weight")
        state["model.diffusion_model.out.2.bias"] = np.zeros(5, np.float32)
        state["first_stage_model.loss.logvar"] = np.zeros(1, np.float32)

    broken = _edited(path, tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): model.diffusion_model.input_blocks.4.1.proj_in."
                                              r"weight; .*misshapen key\(s\): model.diffusion_model.out.2.bias: "
                                              r"file has \(5,\), model expects \(4,\)"):
        sf.load_unet_single_file(broken, folder)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): first_stage_model.loss.logvar"):
        sf.load_vae_single_file(broken, folder)


def test_not_a_single_file(checkpoint, tmp_path):
    """Refused from the header, before any work: unknown keys, a diffusers file, no VAE."""
    _, _, folder, path = checkpoint
    unknown = _edited(path, tmp_path, lambda s: s.update({"embedding_manager.x": np.zeros(1, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unknown key 'embedding_manager.x'"):
        sf.load_vae_single_file(unknown, folder)
    diffusers_file = folder + "/unet/diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match="holds no model.diffusion_model.. keys: not an SD-1.x single-file"):
        sf.load_unet_single_file(diffusers_file, folder)
    no_vae = _edited(path, tmp_path, lambda s: [s.pop(k) for k in list(s) if k.startswith("first_stage_model.")])
    with pytest.raises(CheckpointError, match="holds no first_stage_model.. keys"):
        sf.load_vae_single_file(no_vae, folder)
    with pytest.raises(FileNotFoundError, match="single-file checkpoint '/nonexistent.safetensors' does not exist"):
        sf.load_unet_single_file("/nonexistent.safetensors")
