"""The factory's Wan DiT (model.backbone "wan"): a fresh tiny DiT trains through train.py
and SCDPipeline samples from its checkpoint; a pretrained diffusers folder plugs in with a
fresh pose embedding; bad model.wan input is one line naming the key. Wan's recipe (the
Wan VAE codec, pose frames on its latent time grid, flow matching): a tiny variant trains
through train.py and samples through sample.py; the codec is models/wan_vae's encode
normalised, exactly; clip lengths not 1 + 4k and samplers of the other kind are refused."""
import dataclasses
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from PIL import Image

from configs.common import base_config
from consist_jax import load_transformer
from consist_jax.diffusion.flow import FlowSchedule
from consist_jax.diffusion.kinds import sampler_name
from consist_jax.diffusion.schedule import NoiseSchedule
from consist_jax.factory import build_model, wan_config_from
from consist_jax.models import wan_vae
from consist_jax.models.scd import WanVAECodec, frames_on_latent_time
from consist_jax.models.wan_denoiser import WanDenoiser, WanDenoiserConfig
from consist_jax.sampling.pipeline import SCDPipeline
from tests.configs.tiny_wan import get_config as tiny_wan_config
from tests.runs import REPO, run_env, script_cmd

TINY_DIT = "--config=tests/configs/tiny_dit.py"
TINY_WAN = "--config=tests/configs/tiny_wan.py"
TORCH_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12,
                         out_channels=12, text_dim=8, freq_dim=16, ffn_dim=16, num_layers=1)


@pytest.fixture(scope="module")
def dit_run(data_dir, tmp_path_factory):
    """A 4-step train.py run of the tiny DiT config (its workdir and stdout)."""
    workdir = str(tmp_path_factory.mktemp("dit_run"))
    result = subprocess.run(script_cmd("train.py", TINY_DIT, f"--workdir={workdir}", "--config.train.num_steps=4"),
                            cwd=REPO, env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def test_tiny_dit_trains_and_samples(dit_run, rng):
    workdir, stdout = dit_run
    losses = [float(line.split("loss ")[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]
    assert len(losses) == 4 and np.all(np.isfinite(losses)), stdout[-2000:]
    pipe = SCDPipeline.from_checkpoint(workdir)
    assert isinstance(pipe.model.unet, WanDenoiser) and pipe.model.unet.config.pose_channels == 12
    reference = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    frames = pipe(reference, poses, reference_pose=poses[0], steps=2, window=2, overlap=1, seed=1)
    assert frames.shape == (3, 16, 16, 3) and frames.dtype == np.uint8
    with pytest.raises(ValueError, match="pass reference_pose"):  # the DiT injects the reference pose too
        pipe(reference, poses, steps=2, window=2, overlap=1)


def _wan_model_config(**changes) -> ml_collections.ConfigDict:
    c = base_config().model
    c.backbone = "wan"
    c.codec = dict(kind="pixel", factor=2)
    c.context = dict(kind="none")
    c.update(changes)
    return c


def test_pretrained_transformer_plugs_in_with_a_fresh_pose_embedding(tmp_path):
    torch.manual_seed(0)
    WanTransformer3DModel(**TORCH_TRANSFORMER).save_pretrained(tmp_path, safe_serialization=True)
    config = _wan_model_config(pretrained_transformer=str(tmp_path))
    config.wan.update(dtype="bfloat16", num_layers=7)  # architecture keys: the folder's win
    model, params, frozen = build_model(config, jax.random.key(0))
    _, expected = load_transformer(str(tmp_path))
    pose = params.pop("pose_patch_embedding")
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
    assert not np.any(np.asarray(pose["conv_out"]["kernel"]))  # adds nothing until trained
    assert pose["conv_in"]["kernel"].shape[-2] == 12  # RGB pose unshuffled by the codec's 2
    dit = model.unet.config
    assert dit.transformer.num_layers == 1 and dit.transformer.dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))  # the master copy
    assert frozen == {} and model.context.dim == TORCH_TRANSFORMER["text_dim"]


@pytest.mark.parametrize("changes, message", [
    (dict(backbone="dit"), r"model.backbone='dit': expected one of \('unet', 'wan'\)"),
    (dict(wan=dict(num_layer=2)), r"unknown model.wan key\(s\) \['num_layer'\]"),
    (dict(motion=dict(enabled=True)), r"model.backbone='wan' takes no UNet weights or motion modules"),
    (dict(), r"model.codec \(pixel\) gives 12 latent channels; the DiT reads model.wan.in_channels=16"),
    (dict(pretrained_transformer="/nonexistent/wan"), r"model.pretrained_transformer='/nonexistent/wan' does not"),
])
def test_bad_wan_config_is_one_line(changes, message):
    config = _wan_model_config()
    for key, value in changes.items():
        if isinstance(value, dict):
            config[key].update(value) if key in config and key != "wan" else config.wan.update(value)
        else:
            config[key] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        build_model(config, jax.random.key(0), init_params=False)
    assert "\n" not in str(error.value)


def test_the_dit_refuses_the_unets_options():
    """model.unet.self_attention_key_init and cross_attention are UNet options: a fresh DiT
    refuses them in one line; restoring a checkpoint whose saved config carries the demo's key
    init "query" still builds."""
    config = _wan_model_config()
    config.wan.update(TORCH_TRANSFORMER)
    config.unet.self_attention_key_init = "query"
    with pytest.raises(ValueError, match="model.unet.self_attention_key_init='query' initialises the UNet's "
                                         "self-attention; model.backbone='wan'") as error:
        build_model(config, jax.random.key(0))
    assert "\n" not in str(error.value)
    model, params, _ = build_model(config, jax.random.key(0), init_params=False)
    assert isinstance(model.unet, WanDenoiser) and params is None
    config.unet.update(self_attention_key_init="random", cross_attention=False)
    with pytest.raises(ValueError, match="model.unet.cross_attention=False leaves out the UNet's cross-attention; "
                                         "model.backbone='wan'"):
        build_model(config, jax.random.key(0))


def test_pose_channels_must_match_the_factor():
    config = wan_config_from(dict(num_layers=1), pose_factor=8)
    assert config.pose_channels == 192 and config.pose_block_out_channels == ()
    assert wan_config_from(dict(pose=False), pose_factor=8).pose_block_out_channels is None
    with pytest.raises(ValueError, match="pose_channels=12: pose images of 3 channels unshuffled by pose_factor=8 "
                                         "have 192"):
        dataclasses.replace(config, pose_channels=12)
    wan_vae = wan_config_from(dict(num_layers=1), pose_factor=8, pose_temporal_factor=4)  # Wan's VAE: 4 frames
    assert wan_vae.pose_image_channels == 12 and wan_vae.pose_channels == 768


# ------------------------------------------------------------------ Wan's recipe: Wan VAE + flow


@pytest.fixture(scope="module")
def wan_vae_model():
    """The tiny Wan-recipe model's codec side (no DiT parameters): (SCDModel, frozen)."""
    model, _, frozen = build_model(tiny_wan_config().model, jax.random.key(0), init_params=False)
    return model, frozen


def test_wan_vae_codec_is_the_vae_encode_normalised(wan_vae_model, rng):
    model, frozen = wan_vae_model
    codec = model.codec
    assert isinstance(codec, WanVAECodec) and (codec.factor, codec.temporal_factor, codec.latent_channels) == (4, 4, 4)
    video = jnp.asarray(rng.uniform(-1, 1, (2, 9, 16, 16, 3)), jnp.float32)
    latents = model.encode(frozen, video)
    mean = wan_vae.encode(codec.module, frozen["vae"], video).mode()
    np.testing.assert_array_equal(latents, wan_vae.scale_latents(codec.module.config, mean))
    assert latents.shape == (2, 3, 4, 4, 4) and model.latent_frames(9) == 3
    image = model.encode(frozen, video[:, 0])  # the reference: a one-frame clip
    np.testing.assert_array_equal(image, model.encode(frozen, video[:, :1])[:, 0])
    assert model.decode(frozen, latents).shape == (2, 9, 16, 16, 3)
    assert model.decode(frozen, image).shape == (2, 16, 16, 3)


@pytest.mark.parametrize("frames", [2, 4, 8])
def test_clip_lengths_not_one_plus_4k_are_refused(wan_vae_model, frames):
    model, frozen = wan_vae_model
    with pytest.raises(ValueError, match=rf"a clip of {frames} frames: .* 1 \+ 4k frames \(set "
                                         r"data.pipeline.clip_length") as error:
        model.encode(frozen, jnp.zeros((1, frames, 16, 16, 3)))
    assert "\n" not in str(error.value)


def test_pose_frames_on_the_latent_time_grid(rng):
    """Latent frame 0 <- pixel frame 0 (repeated), latent frame j <- pixel frames 4j-3 .. 4j:
    a change in pixel frame 4j moves latent frame j's pose channels only."""
    poses = jnp.asarray(rng.uniform(size=(2, 9, 4, 6, 3)), jnp.float32)
    grid = frames_on_latent_time(poses, 4)
    assert grid.shape == (2, 3, 4, 6, 12)
    np.testing.assert_array_equal(grid[:, 0], jnp.concatenate([poses[:, 0]] * 4, axis=-1))
    np.testing.assert_array_equal(grid[:, 2, ..., 9:], poses[:, 8])  # frame-major: frame 4j last in group j
    np.testing.assert_array_equal(frames_on_latent_time(poses[:, 0], 4), grid[:, 0])  # the reference pose
    for pixel_frame, latent_frame in ((0, 0), (1, 1), (4, 1), (5, 2), (8, 2)):
        moved = frames_on_latent_time(poses.at[:, pixel_frame].add(1.0), 4)
        changed = np.any(np.asarray(moved != grid), axis=(0, 2, 3, 4))
        assert changed.tolist() == [j == latent_frame for j in range(3)], (pixel_frame, changed)
    assert frames_on_latent_time(poses, 1) is poses  # per-frame codecs: unchanged


def test_samplers_follow_the_diffusion_kind():
    flow, ddpm = FlowSchedule.create(shift=3.0), NoiseSchedule.create()
    assert sampler_name(flow, None) == "flow_unipc" and sampler_name(ddpm, "") == "ddim"
    assert sampler_name(flow, "flow_euler") == "flow_euler"
    with pytest.raises(ValueError, match=r"sampler 'ddim' does not sample this model \(diffusion.kind='flow'\)"):
        sampler_name(flow, "ddim")
    with pytest.raises(ValueError, match=r"sampler 'flow_unipc' does not sample this model \(diffusion.kind='ddpm'"):
        sampler_name(ddpm, "flow_unipc")


def _save_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def wan_recipe_run(data_dir, tmp_path_factory):
    """A 2-step train.py run of tests/configs/tiny_wan.py (its workdir and stdout)."""
    workdir = str(tmp_path_factory.mktemp("wan_recipe_run"))
    result = subprocess.run(script_cmd("train.py", TINY_WAN, f"--workdir={workdir}"), cwd=REPO,
                            env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def test_wan_recipe_trains_and_samples_through_the_clis(wan_recipe_run, data_dir, rng, tmp_path):
    workdir, stdout = wan_recipe_run
    losses = [float(line.split("loss ")[1].split()[0]) for line in stdout.splitlines() if "| loss " in line]
    assert len(losses) == 2 and np.all(np.isfinite(losses)), stdout[-2000:]
    folder = tmp_path / "poses"
    folder.mkdir()
    for i in range(5):
        _save_png(folder / f"{i:03d}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    reference = _save_png(tmp_path / "reference.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    common = [f"--checkpoint={workdir}", f"--reference={reference}", f"--reference_pose={reference}",
              f"--poses={folder}", "--steps=2", "--window=2", "--overlap=0"]
    result = subprocess.run(script_cmd("sample.py", *common, f"--out={tmp_path / 'out'}"), cwd=REPO,
                            env=run_env(data_dir), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(tmp_path / "out")) == 5  # 2 latent frames decode to 5 frames


def test_wan_recipe_pipeline_refuses_before_compiling(wan_recipe_run, rng, monkeypatch):
    pipe = SCDPipeline.from_checkpoint(wan_recipe_run[0])
    assert isinstance(pipe.schedule, FlowSchedule) and pipe.schedule.shift == 3.0
    assert pipe.model.unet.config.pose_channels == 3 * 4 * 4 ** 2  # 4 frames stacked, unshuffled by 4

    def no_compile(*args, **kwargs):
        raise AssertionError("the input check came after a compile")

    monkeypatch.setattr(pipe, "_compiled", no_compile)
    reference = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    for ddpm_sampler in ("ddim", "euler"):  # sample.py checks --sampler with the same sampler_name
        with pytest.raises(ValueError, match=f"sampler '{ddpm_sampler}' does not sample this model"):
            pipe(reference, poses, reference_pose=reference, sampler=ddpm_sampler)
    with pytest.raises(ValueError, match="a clip of 4 frames"):
        pipe(reference, poses[:4], reference_pose=reference)
