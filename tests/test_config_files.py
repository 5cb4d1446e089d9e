"""A config.json of the wrong shape (a list, a negative channel count, a string where a
number goes) is refused with one line naming the file and the key, before any weights load
(the folders hold no weights: a refusal after the config would name the missing file)."""
import json

import pytest

from consist_jax.convert.clip_vision import load_image_encoder, load_preprocess_config
from consist_jax.convert.motion import load_motion_adapter
from consist_jax.convert.unet import load_unet
from consist_jax.convert.vae import load_vae

TINY_UNET = dict(block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=2, norm_num_groups=4,
                 cross_attention_dim=8, layers_per_block=1)
TINY_VAE = dict(block_out_channels=[8, 16], norm_num_groups=4, layers_per_block=1, latent_channels=4)
TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2, image_size=8, patch_size=4, projection_dim=8)
TINY_MOTION = dict(block_out_channels=[8, 16], motion_layers_per_block=1, motion_num_attention_heads=2,
                   motion_norm_num_groups=4)


def _folder(tmp_path, config, name="config.json"):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / name).write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("load, good, bad, message", [
    (load_unet, TINY_UNET, {"block_out_channels": [8, -16]}, "block_out_channels[1]=-16: must be an integer >= 1"),
    (load_unet, TINY_UNET, {"block_out_channels": 8}, "block_out_channels=8: must be a non-empty list"),
    (load_unet, TINY_UNET, {"in_channels": "4"}, "in_channels='4': must be an integer >= 1"),
    (load_unet, TINY_UNET, {"layers_per_block": 0}, "layers_per_block=0"),
    (load_unet, TINY_UNET, {"attention_head_dim": 0}, "attention_heads[0]=0"),
    (load_unet, TINY_UNET, {"norm_eps": -1e-5}, "norm_eps=-1e-05: must be a finite number > 0"),
    (load_vae, TINY_VAE, {"latent_channels": -4}, "latent_channels=-4"),
    (load_vae, TINY_VAE, {"block_out_channels": []}, "block_out_channels=[]"),
    (load_vae, TINY_VAE, {"scaling_factor": None}, "scaling_factor=None: must be a finite number > 0"),
    (load_image_encoder, TINY_CLIP, {"hidden_size": -8}, "hidden_size=-8"),
    (load_image_encoder, TINY_CLIP, {"patch_size": 0}, "patch_size=0"),
    (load_motion_adapter, TINY_MOTION, {"block_out_channels": [8, -16]}, "block_out_channels[1]=-16: must be an"),
    (load_motion_adapter, TINY_MOTION, {"block_out_channels": 8}, "block_out_channels=8: must be a non-empty list"),
    (load_motion_adapter, TINY_MOTION, {"motion_layers_per_block": -1}, "motion_layers_per_block=-1: must be an"),
    (load_motion_adapter, TINY_MOTION, {"motion_layers_per_block": [1, 2]}, "=[1, 2]: differs between blocks"),
    (load_motion_adapter, TINY_MOTION, {"motion_norm_num_groups": 3}, "divisible by its 2 heads and 3 norm groups"),
])
def test_bad_keys_name_the_file_and_key(tmp_path, load, good, bad, message):
    folder = _folder(tmp_path, {**good, **bad})
    with pytest.raises(ValueError) as error:
        load(folder)
    text = str(error.value)
    assert text.startswith(f"'{folder}/config.json': ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("load", [load_unet, load_vae, load_image_encoder, load_motion_adapter])
@pytest.mark.parametrize("content", [[], "text", 3, None])
def test_a_config_that_is_not_an_object(tmp_path, load, content):
    folder = _folder(tmp_path, content)
    with pytest.raises(ValueError, match=f"'{folder}/config.json' holds a JSON .*a config is a JSON object"):
        load(folder)


def test_preprocessor_config(tmp_path):
    folder = _folder(tmp_path, [], "preprocessor_config.json")
    with pytest.raises(ValueError, match="preprocessor_config.json' holds a JSON list"):
        load_preprocess_config(folder)


@pytest.mark.parametrize("section, key, good, bad", [
    ("codec", "vae_path", TINY_VAE, {"latent_channels": -4}),
    ("context", "image_encoder_path", TINY_CLIP, {"hidden_size": -8}),
    ("", "motion_adapter", TINY_MOTION, {"block_out_channels": 8}),
])
def test_the_factory_reads_every_folders_config_before_building(tmp_path, section, key, good, bad):
    """factory.check_paths reads each named folder's config.json before anything is built
    (the UNet's init compiles), with the loader's message."""
    import ml_collections

    from configs.common import base_config
    from consist_jax.factory import check_paths

    model = base_config().model
    model.codec = ml_collections.ConfigDict(dict(kind="vae", vae_path=_folder(tmp_path / "vae", TINY_VAE)))
    model.context = ml_collections.ConfigDict(dict(kind="embedding",
                                                   image_encoder_path=_folder(tmp_path / "clip", TINY_CLIP)))
    check_paths(model)  # good files pass
    folder = _folder(tmp_path / "bad", {**good, **bad})
    (model[section] if section else model)[key] = folder
    with pytest.raises(ValueError, match=f"^'{folder}/config.json': "):
        check_paths(model)
