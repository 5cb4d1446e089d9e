"""Decoding image files to 8-bit arrays whatever their bit depth, orientation and alpha:
the one place where a 16-bit sample becomes an 8-bit one (scaled, never clipped or cut to
its low byte), where a phone photo's EXIF orientation is applied, and where transparency
is flattened onto a background."""
from __future__ import annotations

import numpy as np

# The file kinds the readers recognise by suffix (lower case), in one place.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")


def to_uint8(image, path: str, mode: str = "RGB") -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3) for ``mode="RGB"`` or (H, W) for ``mode="L"``.

    PIL reads 16-bit colour PNGs as 8-bit already; 16-bit grayscale stays 16-bit (modes
    "I;16*", or "I", which PNG only uses for 16-bit), so it is scaled here (65535 -> 255).
    32-bit integer and floating-point samples are refused naming ``path``. Alpha is dropped
    (``flatten_alpha`` first to composite it).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        gray = np.asarray(image).astype(np.int64)
        if gray.min() < 0 or gray.max() > 65535:
            raise ValueError(f"cannot read {path!r}: 32-bit integer samples (expected 8 or 16 bits)")
        gray = np.round(gray / 257.0).astype(np.uint8)
        return gray if mode == "L" else np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError(f"cannot read {path!r}: floating-point samples (expected 8 or 16 bits)")
    return np.asarray(image.convert(mode))


def has_alpha(image) -> bool:
    """Whether a PIL image has transparency (an alpha channel or a transparent palette entry)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def flatten_alpha(image, background: int):
    """A PIL image with transparency -> RGB composited onto the grey level ``background``
    (0..255); an image without transparency is returned as it is."""
    from PIL import Image

    if not has_alpha(image):
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (background,) * 3 + (255,)), rgba).convert("RGB")


def upright(image):
    """The image as it is meant to be seen: its EXIF orientation applied (phones store
    portraits as rotated landscapes with an orientation tag)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(image)
