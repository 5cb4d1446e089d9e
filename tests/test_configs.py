"""Every run config loads, selects an attention backend, and fails early on missing paths."""
import importlib

import pytest

from consist_jax.models.attention import ATTENTION_IMPLS
from consist_jax.training.trainer import preflight

CONFIGS = ["demo", "demo_video", "face_reenact", "sd15_image", "sd15_video", "tryon", "ablations.full_attention", "ablations.no_ref_pose"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.unet.attention_impl in ATTENTION_IMPLS
    assert config.train.global_batch_size > 0


def test_sd15_config_names_missing_pretrained_paths():
    config = importlib.import_module("configs.sd15_image").get_config()
    with pytest.raises(ValueError, match="model.codec.vae_path"):
        preflight(config)
    config.model.codec.vae_path = "/nonexistent/vae"
    config.model.context.image_encoder_path = "/nonexistent/clip"
    with pytest.raises(FileNotFoundError, match="/nonexistent/vae"):
        preflight(config)


def test_video_stage_trains_only_the_motion_module():
    config = importlib.import_module("configs.sd15_video").get_config()
    assert tuple(config.optim.trainable) == ("motion_modules",)
    assert config.data.pipeline.clip_length == 24


def test_video_demo_starts_from_the_image_demo():
    config = importlib.import_module("configs.demo_video").get_config()
    assert config.model.motion.enabled and config.model.init_from == "runs/demo"
    assert tuple(config.optim.trainable) == ("motion_modules",)
    config.model.init_from = "/nonexistent/run"
    with pytest.raises(FileNotFoundError, match="model.init_from='/nonexistent/run'"):
        preflight(config)
