"""The factory's Wan DiT (model.backbone "wan"): a fresh tiny DiT trains through train.py
and SCDPipeline samples from its checkpoint; a pretrained diffusers folder plugs in with a
fresh pose embedding; bad model.wan input is one line naming the key."""
import dataclasses
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from configs.common import base_config
from consist_jax import load_transformer
from consist_jax.factory import build_model, wan_config_from
from consist_jax.models.wan_denoiser import WanDenoiser, WanDenoiserConfig
from consist_jax.sampling.pipeline import SCDPipeline
from tests.runs import REPO, run_env, script_cmd

TINY_DIT = "--config=tests/configs/tiny_dit.py"
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


def test_pose_channels_must_match_the_factor():
    config = wan_config_from(dict(num_layers=1), pose_factor=8)
    assert config.pose_channels == 192 and config.pose_block_out_channels == ()
    assert wan_config_from(dict(pose=False), pose_factor=8).pose_block_out_channels is None
    with pytest.raises(ValueError, match="pose_channels=12: pose images unshuffled by pose_factor=8 have 192"):
        dataclasses.replace(config, pose_channels=12)
