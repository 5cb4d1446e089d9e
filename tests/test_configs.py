"""Every run config loads, selects an attention backend, and fails early on missing paths;
every option of the dataclasses read from a config can be set from the command line."""
import dataclasses
import importlib
import os

import pytest
from absl import flags
from ml_collections import config_flags

from configs.common import base_config, parse_flags
from consist_jax import factory
from consist_jax.models.self_attention import ATTENTION_IMPLS
from consist_jax.models.motion import MotionConfig
from consist_jax.training.state import OptimizerConfig
from consist_jax.training.step import LossConfig
from consist_jax.training.trainer import preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = ["demo", "demo_dit", "demo_video", "face_reenact", "sd15_image", "sd15_video", "tryon",
           "ablations.full_attention", "ablations.no_ref_pose"]


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


def _field_names(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_option_has_a_settable_key():
    """Each option is a key of base_config (a None default would be a NoneType field,
    which ml_collections cannot override from the command line)."""
    config = base_config()
    sections = {
        "model.unet": (config.model.unet, set(factory.SCD_OPTIONS)),
        "model.wan": (config.model.wan, _field_names(factory.WanTransformerConfig) - set(factory.WAN_I2V_FIELDS)
                      | set(factory.WAN_SCD_OPTIONS)),
        "model.motion": (config.model.motion, _field_names(MotionConfig) | {"enabled"}),
        "train": (config.train, _field_names(LossConfig) - {"prediction_type"}),
        "optim": (config.optim, _field_names(OptimizerConfig)),
    }
    for name, (section, options) in sections.items():
        assert options <= set(section), f"config.{name} lacks {sorted(options - set(section))}"
        untyped = [key for key in options if section.get_type(key) is type(None)]
        assert not untyped, f"config.{name}.{untyped} cannot be set from the command line"
    assert "prediction_type" in config.diffusion


def test_section_defaults_are_the_dataclass_defaults():
    config = base_config()
    assert OptimizerConfig.from_config(config.optim) == OptimizerConfig()
    assert LossConfig.from_config(dict(config.train, prediction_type="epsilon")) == LossConfig()
    assert MotionConfig(**factory.motion_options(config.model)) == MotionConfig()
    assert factory.unet_config_from(config.model.unet) == factory.UNetConfig()
    assert factory.wan_config_from(config.model.wan, pose_factor=1) == factory.WanDenoiserConfig(
        factory.WanTransformerConfig(), pose_channels=3)


@pytest.mark.parametrize("value, expected", [("frames", "frames"), ("clips,frames", ("clips", "frames"))])
def test_frames_axis_from_the_command_line(value, expected):
    argv = ["train.py", f"--config={os.path.join(REPO, 'configs', 'sd15_video.py')}",
            f"--config.model.motion.frames_axis={value}"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    parse_flags(argv, flag_values)
    model = flag_values.config.model
    assert MotionConfig(**factory.motion_options(model)).frames_axis == expected


def test_unknown_optimizer_key_is_named():
    with pytest.raises(ValueError, match=r"^config\.optim has unknown key\(s\) \['lrr'\]"):
        OptimizerConfig.from_config(dict(base_config().optim, lrr=1.0))
