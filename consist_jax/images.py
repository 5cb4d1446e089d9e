"""Decoding image files to 8-bit arrays whatever their bit depth: the one place where a
16-bit sample becomes an 8-bit one (scaled, never clipped or cut to its low byte)."""
from __future__ import annotations

import numpy as np


def to_uint8(image, path: str, mode: str = "RGB") -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3) for ``mode="RGB"`` or (H, W) for ``mode="L"``.

    PIL reads 16-bit colour PNGs as 8-bit already; 16-bit grayscale stays 16-bit (modes
    "I;16*", or "I", which PNG only uses for 16-bit), so it is scaled here (65535 -> 255).
    32-bit integer and floating-point samples are refused naming ``path``.
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
