"""The Flax CLIP vision tower and the CLIP preprocessing against transformers (small
random configs saved as safetensors in tmp dirs), plus the loader's error paths."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from consist_jax.convert.loading import CheckpointError
from consist_jax.convert.clip_vision import load_image_encoder, load_preprocess_config
from consist_jax.models import clip_vision as clip_lib
from consist_jax.models.image_preprocessing import CLIPPreprocessConfig, preprocess_images
from parity import relative_error

transformers = pytest.importorskip("transformers")
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

TOL = 1e-4
SMALL = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


def _module_seed(name):
    seed = int(os.environ.get("CONSIST_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))
    print(f"[{name}] seed={seed}")
    return seed


def build_torch_clip(seed, **config):
    """A CLIPVisionModelWithProjection with random weights, LayerNorm affines included."""
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # LayerNorm starts at (1, 0): perturb so a mix-up shows.
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """(folder, torch model, flax module, params) of a small random CLIP vision tower."""
    folder = str(tmp_path_factory.mktemp("clip"))
    model = build_torch_clip(_module_seed("small_clip"), **SMALL)
    model.save_pretrained(folder)
    module, params = load_image_encoder(folder)
    return folder, model, module, params


def random_pixels(rng, n=2, size=32):
    return rng.normal(size=(n, size, size, 3)).astype(np.float32)


def torch_outputs(vision_model, projection, pixels):
    """transformers' outputs for NHWC ``pixels``, plus the projected (post-normed) tokens."""
    with torch.no_grad():
        out = vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
        embeds = projection(out.pooler_output)
        tokens = projection(vision_model.post_layernorm(out.last_hidden_state))
    return {
        "image_embeds": embeds.numpy(),
        "last_hidden_state": out.last_hidden_state.numpy(),
        "projected_tokens": tokens.numpy(),
        "hidden_states": [h.numpy() for h in out.hidden_states],
    }


def check_parity(module, params, vision_model, projection, rng):
    pixels = random_pixels(rng)
    expected = torch_outputs(vision_model, projection, pixels)
    ours = clip_lib.encode_images(module, params, pixels, True, True)
    errors = {k: relative_error(getattr(ours, k), expected[k]) for k in
              ("image_embeds", "last_hidden_state", "projected_tokens")}
    assert len(ours.hidden_states) == len(expected["hidden_states"])
    errors["hidden_states"] = max(
        relative_error(a, b) for a, b in zip(ours.hidden_states, expected["hidden_states"])
    )
    print(errors)
    assert max(errors.values()) <= TOL, errors


def test_parity_fp32(small_clip, rng):
    _, model, module, params = small_clip
    check_parity(module, params, model.vision_model, model.visual_projection, rng)


def test_outputs_and_shapes(small_clip, rng):
    _, model, module, params = small_clip
    pixels = random_pixels(rng)
    plain = clip_lib.encode_images(module, params, pixels)
    assert plain.image_embeds.shape == (2, 16)
    assert plain.last_hidden_state.shape == (2, 1 + 16, 32)
    assert plain.projected_tokens is None and plain.hidden_states is None
    full = clip_lib.encode_images(module, params, pixels, True, True)
    assert full.projected_tokens.shape == (2, 17, 16)
    # Row 0 of the projected tokens is the image embedding.
    assert relative_error(full.projected_tokens[:, 0], plain.image_embeds) <= 1e-6


def test_parity_fp16_file(small_clip, tmp_path, rng):
    half = build_torch_clip(int(rng.integers(2**31)), **SMALL).half()
    half.save_pretrained(str(tmp_path), variant="fp16")
    assert (tmp_path / "model.fp16.safetensors").exists()
    module, params = load_image_encoder(str(tmp_path))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    reference = half.float()
    check_parity(module, params, reference.vision_model, reference.visual_projection, rng)


def test_full_clip_config_with_gelu(tmp_path, rng):
    """A full CLIPModel folder: the vision tower loads, the text tower is skipped."""
    vision = dict(SMALL, hidden_act="gelu", image_size=16, projection_dim=8)
    text = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(int(rng.integers(2**31)))
    config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=12)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(str(tmp_path))
    module, params = load_image_encoder(str(tmp_path))
    assert module.config.projection_dim == 12 and module.config.hidden_act == "gelu"
    pixels = random_pixels(rng, size=16)
    expected = torch_outputs(model.vision_model, model.visual_projection, pixels)
    ours = clip_lib.encode_images(module, params, pixels)
    assert relative_error(ours.image_embeds, expected["image_embeds"]) <= TOL
    assert relative_error(ours.last_hidden_state, expected["last_hidden_state"]) <= TOL


def test_position_ids_buffer_is_ignored(small_clip, tmp_path):
    """Older transformers saved the position_ids buffer; it holds no weights."""
    from safetensors.numpy import load_file, save_file

    folder = small_clip[0]
    state = load_file(os.path.join(folder, "model.safetensors"))
    state["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    load_image_encoder(str(tmp_path))


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("shape", [(50, 37), (37, 61), (32, 32), (20, 45)])
def test_preprocessing_matches_transformers(tmp_path, rng, shape):
    """Portrait, landscape, square and upscaled inputs, with a non-default mean / std."""
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 30},
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
    )
    processor.save_pretrained(str(tmp_path))
    config = load_preprocess_config(str(tmp_path))
    assert config.crop_width == 30 and config.image_mean == (0.5, 0.4, 0.3)
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(2)]
    expected = processor(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    ours = preprocess_images(images, config)
    assert ours.dtype == np.float32 and ours.shape == expected.shape == (2, 32, 30, 3)
    assert np.max(np.abs(ours - expected)) <= 1e-5


def test_preprocessing_defaults_and_padding(tmp_path, rng):
    """No preprocessor_config.json: OpenAI CLIP at 224. A crop larger than the resized
    image pads with zeros, as transformers does."""
    assert load_preprocess_config(str(tmp_path)) == CLIPPreprocessConfig()
    image = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    expected = CLIPImageProcessorPil()(image, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert np.max(np.abs(preprocess_images(image) - expected)) <= 1e-5
    config = CLIPPreprocessConfig(shortest_edge=20, crop_height=24, crop_width=24)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 24})
    small = rng.integers(0, 256, (30, 22, 3), dtype=np.uint8)
    expected = processor(small, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    assert np.max(np.abs(preprocess_images(small[None], config) - expected)) <= 1e-5


def test_preprocessing_rejects_float_images(rng):
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images(rng.uniform(-1, 1, (1, 40, 40, 3)).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        preprocess_images(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8))


# --------------------------------------------------------------------------- bad input


def test_folder_without_config(small_clip, tmp_path):
    shutil.copy(os.path.join(small_clip[0], "model.safetensors"), tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_image_encoder(str(tmp_path))


def test_vae_folder_is_rejected(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"not a CLIP vision config.*AutoencoderKL"):
        load_image_encoder(str(tmp_path))
    # A CLIP config next to the VAE's weights: the file is named and its keys listed.
    (tmp_path / "config.json").write_text(json.dumps(dict(SMALL, model_type="clip_vision_model")))
    os.rename(tmp_path / "diffusion_pytorch_model.safetensors", tmp_path / "model.safetensors")
    expected = r"model.safetensors.*missing key.*unexpected key.*decoder.conv_in"
    with pytest.raises(CheckpointError, match=expected):
        load_image_encoder(str(tmp_path))


def test_bad_pixel_values(small_clip, rng):
    _, _, module, params = small_clip
    with pytest.raises(ValueError, match=r"expected NHWC \(B, 32, 32, 3\)"):
        clip_lib.encode_images(module, params, random_pixels(rng, size=40))
    with pytest.raises(ValueError, match=r"expected NHWC"):
        clip_lib.encode_images(module, params, random_pixels(rng).transpose(0, 3, 1, 2))
    with pytest.raises(TypeError, match="preprocess_images"):
        clip_lib.encode_images(module, params, rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8))


def test_config_rejections():
    with pytest.raises(ValueError, match="hidden_act"):
        clip_lib.CLIPVisionConfig.from_transformers(
            dict(SMALL, model_type="clip_vision_model", hidden_act="swish")
        )
    with pytest.raises(ValueError, match="siglip"):
        clip_lib.CLIPVisionConfig.from_transformers(dict(SMALL, model_type="siglip_vision_model"))
    with pytest.raises(ValueError, match="square"):
        clip_lib.CLIPVisionConfig.from_transformers(
            dict(SMALL, model_type="clip_vision_model", image_size=[32, 48])
        )
