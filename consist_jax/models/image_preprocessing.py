"""CLIP image preprocessing on the host (numpy + PIL), as transformers' PIL-backed
``CLIPImageProcessor`` (``CLIPImageProcessorPil`` in transformers 5) does it:

  1. convert to RGB;
  2. resize so the shortest side is ``size["shortest_edge"]`` (the long side becomes
     ``int(edge * long / short)``), with PIL's resampling filter (bicubic for CLIP);
  3. center crop ``crop_size`` (top/left offsets ``(in - out) // 2``; zero-padded when
     the image is smaller);
  4. rescale (uint8 -> float64 * 1/255 -> float32);
  5. normalise with the config's mean / std in float32.

The output matches transformers' PIL path bit for bit (tested). transformers 5 picks a
torchvision backend for ``CLIPImageProcessor`` when torchvision is installed (and falls
back to the PIL one otherwise, as in our test environment); torchvision's bicubic
resize is not PIL's, so that backend differs from this one by resampling error only
(not measured here), the other steps being the same.

Inputs are uint8 RGB: an (H, W, 3) array, a PIL image, a list of those, or an
(B, H, W, 3) array. Output: float32 NHWC (B, crop_h, crop_w, 3) for
``CLIPVisionModelWithProjection``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

# OpenAI CLIP's statistics (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


@dataclasses.dataclass(frozen=True)
class CLIPPreprocessConfig:
    """transformers' image processor settings (defaults: OpenAI CLIP at 224)."""

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = PIL_BICUBIC  # a PIL.Image.Resampling value
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_transformers(cls, config: dict) -> "CLIPPreprocessConfig":
        """From a ``preprocessor_config.json`` dict; missing keys take CLIP's defaults."""
        kwargs: dict[str, Any] = {}
        size = config.get("size")
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(
                    f"image processor size={size} not supported: expected {{'shortest_edge': N}}"
                )
            kwargs["shortest_edge"] = int(size["shortest_edge"])
        elif size is not None:  # older configs: a bare int is the shortest edge.
            kwargs["shortest_edge"] = int(size)
        crop = config.get("crop_size")
        if isinstance(crop, dict):
            kwargs["crop_height"], kwargs["crop_width"] = int(crop["height"]), int(crop["width"])
        elif crop is not None:
            kwargs["crop_height"] = kwargs["crop_width"] = int(crop)
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                kwargs[key] = tuple(float(v) for v in config[key])
        for key in ("resample", "rescale_factor", "do_resize", "do_center_crop", "do_rescale",
                    "do_normalize", "do_convert_rgb"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        return cls(**kwargs)


def resize_shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """Output (height, width) with the short side ``edge``, the long side truncated."""
    if width <= height:
        return int(edge * height / width), edge
    return edge, int(edge * width / height)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C), centred; zero-pads where the image is smaller."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top : top + height, left : left + width]
    # Pad to at least the crop (padding split with the extra pixel first), then crop.
    new_h, new_w = max(h, height), max(w, width)
    pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    padded = np.zeros((new_h, new_w, image.shape[2]), image.dtype)
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = image
    return center_crop(padded, height, width)


def _to_pil(image: Any, convert_rgb: bool):
    from PIL import Image  # pillow is a dependency; imported here to keep import time low.

    if isinstance(image, Image.Image):
        return image.convert("RGB") if convert_rgb and image.mode != "RGB" else image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(
            f"CLIP preprocessing expects uint8 RGB pixels (0..255), got dtype {array.dtype}; "
            "convert [-1, 1] floats with np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)"
        )
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"CLIP preprocessing expects (H, W, 3) images, got shape {array.shape}")
    return Image.fromarray(array)


def preprocess_image(image: Any, config: CLIPPreprocessConfig) -> np.ndarray:
    """One uint8 RGB image (H, W, 3) or PIL image -> float32 (crop_h, crop_w, 3)."""
    pil = _to_pil(image, config.do_convert_rgb)
    if config.do_resize:
        height, width = resize_shortest_edge_size(pil.height, pil.width, config.shortest_edge)
        pil = pil.resize((width, height), resample=config.resample)
    pixels = np.asarray(pil)
    if config.do_center_crop:
        pixels = center_crop(pixels, config.crop_height, config.crop_width)
    pixels = pixels.astype(np.float32)
    if config.do_rescale:
        # float64 product then float32, the order transformers uses.
        pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, np.float32)
        std = np.asarray(config.image_std, np.float32)
        pixels = (pixels - mean) / std
    return pixels


def preprocess_images(images: Any, config: CLIPPreprocessConfig = CLIPPreprocessConfig()) -> np.ndarray:
    """uint8 images ((B, H, W, 3) array, or a list of (H, W, 3) arrays / PIL images, or one
    image) -> CLIP pixel_values float32 (B, crop_h, crop_w, 3)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        images = [images]
    return np.stack([preprocess_image(image, config) for image in images])
