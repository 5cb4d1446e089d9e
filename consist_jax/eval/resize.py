"""The two image resizes the published metric pipelines use, NHWC.

* ``resize_bilinear``: PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``
  without antialiasing, what pytorch-fid applies before its Inception (to 299x299).
* ``resize_bicubic_antialiased``: PIL's bicubic ``Image.resize`` on float images
  (Keys a = -0.5, kernel widened by the scale factor when shrinking), what DisCo's
  video metrics apply (through clean-fid's ``make_resizer("PIL", False, "bicubic")``)
  before the 3D ResNet (112x112) and the I3D (224x224). PyTorch's
  ``F.interpolate(mode="bicubic", antialias=True)`` implements the same filter.

Both are separable scale-and-translate filters whose weights are normalised over the
pixels inside the image, which is exactly how ``jax.image.resize`` builds its
``linear`` and ``cubic`` kernels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _resize(images: jax.Array, size: tuple[int, int], method: str, antialias: bool) -> jax.Array:
    *lead, _, _, c = images.shape
    shape = (*lead, size[0], size[1], c)
    return jax.image.resize(
        images.astype(jnp.float32), shape, method=method, antialias=antialias,
        precision=jax.lax.Precision.HIGHEST,
    )


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(..., H, W, C) -> (..., size[0], size[1], C), torch bilinear (no antialias)."""
    return _resize(images, size, "linear", antialias=False)


def resize_bicubic_antialiased(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(..., H, W, C) -> (..., size[0], size[1], C), PIL bicubic on floats."""
    return _resize(images, size, "cubic", antialias=True)
