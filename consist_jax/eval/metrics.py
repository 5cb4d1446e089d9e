"""Pixel metrics (L1, PSNR, SSIM and their masked variants), streaming means and the
Fréchet distance, computed the way the literature computes them.

Images are NHWC floats in ``[0, data_range]`` (``data_range=1.0`` by default); every
per-image function takes ``(..., H, W, C)`` arrays and returns one value per image,
shape ``(...)``, so one call serves a single image, a batch ``(N, H, W, C)`` or video
frames ``(B, F, H, W, C)``. They are jitted.

Definitions (per image, then averaged over images by ``StreamingMean``, as DisCo and
its followers average per-frame scores):

* ``l1``: mean absolute error over pixels and channels.
* ``psnr``: ``10 log10(data_range^2 / MSE)``, MSE over pixels and channels
  (``skimage.metrics.peak_signal_noise_ratio``); ``inf`` for identical images.
* ``ssim``: Wang et al. (2004) SSIM, computed per channel and averaged over channels,
  with skimage's conventions: an 11x11 Gaussian window of sigma 1.5 (truncated at 3.5
  sigma), population covariance, K1 = 0.01, K2 = 0.03, and the mean taken over the
  positions whose window lies inside the image (skimage crops ``(win - 1) // 2``
  pixels per border, so the padding mode never matters). ``window="uniform"`` with
  ``use_sample_covariance=True`` and ``win_size=7`` is skimage's default SSIM (the one
  DisCo's evaluation calls, on grayscale images: see ``rgb_to_gray``).

Masked (region) variants take a mask ``(..., H, W)`` or ``(..., H, W, 1)`` of weights in
[0, 1] (usually binary) and score only the region:

* ``masked_l1``: ``sum(m |x - y|) / (C sum(m))``;
* ``masked_psnr``: PSNR of the MSE over the masked pixels (all channels);
* ``masked_ssim``: the SSIM map (averaged over channels) averaged over the masked
  positions *inside the valid interior* (the same cropped region as ``ssim``; a window
  centred in the mask still sees pixels just outside it, as the unmasked SSIM does).

An empty mask gives ``nan`` for that image; ``StreamingMean`` skips and counts it.

The Fréchet distance between Gaussians fitted to features (FID, FID-VID, FVD) is
computed on the host in float64 from ``FrechetStats`` accumulators, with the trace of the
matrix square root taken from eigenvalues of a symmetric matrix (no ``sqrtm``
iterations, no complex parts, exact for singular covariances too).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax import files

# Metrics are references: keep full float32 accuracy on accelerators (no TF32 / bf16 passes).
HIGHEST = jax.lax.Precision.HIGHEST

SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # skimage / scipy.ndimage: radius = int(3.5 * sigma + 0.5) = 5

# ITU-R BT.601 luma weights (what OpenCV's COLOR_BGR2GRAY and PIL's "L" use).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------- helpers


def _mask_weights(mask: jax.Array, ndim: int) -> jax.Array:
    """mask (..., H, W) or (..., H, W, 1) -> float32 (..., H, W, 1)."""
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim == ndim - 1:
        mask = mask[..., None]
    if mask.shape[-1] != 1:
        raise ValueError(f"mask must be (..., H, W) or (..., H, W, 1); got {mask.shape}")
    return mask


def _psnr_from_mse(mse: jax.Array, data_range) -> jax.Array:
    return 10.0 * jnp.log10(jnp.square(jnp.float32(data_range)) / mse)


def rgb_to_gray(images: jax.Array) -> jax.Array:
    """BT.601 luma: (..., H, W, 3) -> (..., H, W, 1), same range as the input."""
    weights = jnp.asarray(GRAY_WEIGHTS, jnp.float32)
    return jnp.sum(images.astype(jnp.float32) * weights, axis=-1, keepdims=True)


def quantize_uint8(images: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Rounds [0, data_range] floats to the 256 levels a saved PNG holds (same range)."""
    levels = jnp.round(jnp.clip(images / data_range, 0.0, 1.0) * 255.0)
    return levels * (data_range / 255.0)


# --------------------------------------------------------------------------- L1 / PSNR


@jax.jit
def l1(x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean absolute error per image: (..., H, W, C) x2 -> (...)."""
    diff = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
    return diff.mean(axis=(-3, -2, -1))


@jax.jit
def psnr(x: jax.Array, y: jax.Array, data_range: float = 1.0) -> jax.Array:
    """PSNR in dB per image: (..., H, W, C) x2 -> (...)."""
    mse = jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)).mean(axis=(-3, -2, -1))
    return _psnr_from_mse(mse, data_range)


@jax.jit
def masked_l1(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean absolute error inside the mask: (..., H, W, C) x2, mask (..., H, W[, 1]) -> (...)."""
    m = _mask_weights(mask, x.ndim)
    diff = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
    total = jnp.sum(diff * m, axis=(-3, -2, -1))
    return total / (jnp.sum(m, axis=(-3, -2, -1)) * x.shape[-1])


@jax.jit
def masked_psnr(x: jax.Array, y: jax.Array, mask: jax.Array, data_range: float = 1.0) -> jax.Array:
    """PSNR of the MSE over masked pixels: (..., H, W, C) x2, mask (..., H, W[, 1]) -> (...)."""
    m = _mask_weights(mask, x.ndim)
    sq = jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32))
    mse = jnp.sum(sq * m, axis=(-3, -2, -1)) / (jnp.sum(m, axis=(-3, -2, -1)) * x.shape[-1])
    return _psnr_from_mse(mse, data_range)


@jax.jit
def psnr_disco(x: jax.Array, y: jax.Array) -> jax.Array:
    """DisCo's PSNR, bug for bug: (..., H, W, C) x2 in [0, 1] -> (...).

    DisCo's ``psnr_eval`` subtracts and squares the 8-bit images as ``uint8`` arrays, so
    both steps wrap modulo 256: each "squared error" is ``((a - b) mod 256)^2 mod 256``,
    never above 255. That caps its MSE and inflates its PSNR well above the true one.
    Reproduced here only so numbers can be compared with tables computed by DisCo's code;
    100 for identical images, as DisCo returns.
    """
    a = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.int32)
    b = jnp.round(jnp.clip(y, 0.0, 1.0) * 255.0).astype(jnp.int32)
    wrapped = jnp.mod(a - b, 256)
    mse = jnp.mod(wrapped * wrapped, 256).astype(jnp.float32).mean(axis=(-3, -2, -1))
    return jnp.where(mse == 0, 100.0, 20.0 * jnp.log10(255.0 / jnp.sqrt(mse)))


# --------------------------------------------------------------------------- SSIM


def _ssim_window(window: str, win_size: Optional[int]) -> np.ndarray:
    """The 1-D (separable) SSIM window, normalised to sum 1, as skimage builds it."""
    if window == "gaussian":
        radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
        if win_size not in (None, 2 * radius + 1):
            raise ValueError(f"the Gaussian SSIM window is {2 * radius + 1} wide (sigma 1.5)")
        taps = np.arange(-radius, radius + 1, dtype=np.float64)
        w = np.exp(-0.5 * np.square(taps / SSIM_SIGMA))
    elif window == "uniform":
        win_size = 7 if win_size is None else win_size
        if win_size % 2 != 1:
            raise ValueError(f"win_size must be odd; got {win_size}")
        w = np.ones(win_size, np.float64)
    else:
        raise ValueError(f"window must be 'gaussian' or 'uniform'; got {window!r}")
    return (w / w.sum()).astype(np.float32)


def _filter_valid(images: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable depthwise filtering without padding: (N, H, W, K) -> (N, H-w+1, W-w+1, K)."""
    k = images.shape[-1]
    size = taps.shape[0]
    dims = ("NHWC", "HWIO", "NHWC")
    along_h = jnp.broadcast_to(jnp.asarray(taps).reshape(size, 1, 1, 1), (size, 1, 1, k))
    along_w = along_h.reshape(1, size, 1, k)
    out = jax.lax.conv_general_dilated(
        images, along_h, (1, 1), "VALID", dimension_numbers=dims, feature_group_count=k,
        precision=HIGHEST,
    )
    return jax.lax.conv_general_dilated(
        out, along_w, (1, 1), "VALID", dimension_numbers=dims, feature_group_count=k,
        precision=HIGHEST,
    )


def _ssim_map(x, y, data_range, window, win_size, use_sample_covariance):
    """Per-channel SSIM over the valid interior: (..., H, W, C) -> (..., H-w+1, W-w+1, C)."""
    taps = _ssim_window(window, win_size)
    size = taps.shape[0]
    if x.shape[-3] < size or x.shape[-2] < size:
        raise ValueError(f"SSIM needs images of at least {size}x{size}; got {x.shape[-3:-1]}")
    lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
    x = x.astype(jnp.float32).reshape(-1, h, w, c)
    y = y.astype(jnp.float32).reshape(-1, h, w, c)
    # One depthwise pass over the five moments: [x, y, xx, yy, xy] stacked on channels.
    moments = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), taps)
    ux, uy, uxx, uyy, uxy = jnp.split(moments, 5, axis=-1)
    n = size * size
    cov_norm = n / (n - 1) if use_sample_covariance else 1.0
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(*lead, *s.shape[1:])


_SSIM_STATIC = ("window", "win_size", "use_sample_covariance")


@functools.partial(jax.jit, static_argnames=_SSIM_STATIC)
def ssim(
    x: jax.Array,
    y: jax.Array,
    data_range: float = 1.0,
    window: str = "gaussian",
    win_size: Optional[int] = None,
    use_sample_covariance: bool = False,
) -> jax.Array:
    """SSIM per image: (..., H, W, C) x2 -> (...). Defaults: Wang et al. (Gaussian, sigma 1.5).

    Equals ``skimage.metrics.structural_similarity(x, y, data_range=data_range,
    channel_axis=-1, gaussian_weights=(window == "gaussian"), sigma=1.5,
    win_size=win_size, use_sample_covariance=use_sample_covariance)`` per image.
    """
    s = _ssim_map(x, y, data_range, window, win_size, use_sample_covariance)
    return s.mean(axis=(-3, -2, -1))


@functools.partial(jax.jit, static_argnames=_SSIM_STATIC)
def masked_ssim(
    x: jax.Array,
    y: jax.Array,
    mask: jax.Array,
    data_range: float = 1.0,
    window: str = "gaussian",
    win_size: Optional[int] = None,
    use_sample_covariance: bool = False,
) -> jax.Array:
    """The SSIM map averaged inside the mask: (..., H, W, C) x2, mask (..., H, W[, 1]) -> (...).

    The map exists on the valid interior only (``pad = (win - 1) // 2`` pixels in from
    each border, as ``ssim``), so the mask is cropped the same way before weighting.
    """
    s = _ssim_map(x, y, data_range, window, win_size, use_sample_covariance).mean(axis=-1)
    m = _mask_weights(mask, x.ndim)[..., 0]
    pad_h = (x.shape[-3] - s.shape[-2]) // 2
    pad_w = (x.shape[-2] - s.shape[-1]) // 2
    m = m[..., pad_h : pad_h + s.shape[-2], pad_w : pad_w + s.shape[-1]]
    return jnp.sum(s * m, axis=(-2, -1)) / jnp.sum(m, axis=(-2, -1))


# --------------------------------------------------------------------------- streaming means


@dataclasses.dataclass
class StreamingMean:
    """The mean of per-item values fed batch by batch, in float64 on the host.

    ``nan`` values (an empty mask) are skipped and counted in ``skipped``; ``inf``
    (the PSNR of identical images) is kept, so it shows in the mean rather than hiding.
    """

    total: float = 0.0
    count: int = 0
    skipped: int = 0

    def update(self, values) -> "StreamingMean":
        """values: any shape; each element is one item."""
        values = np.asarray(values, np.float64).ravel()
        nan = np.isnan(values)
        self.skipped += int(nan.sum())
        kept = values[~nan]
        self.total += float(kept.sum())
        self.count += int(kept.size)
        return self

    def merge(self, other: "StreamingMean") -> "StreamingMean":
        self.total += other.total
        self.count += other.count
        self.skipped += other.skipped
        return self

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


# --------------------------------------------------------------------------- Fréchet


@dataclasses.dataclass
class FrechetStats:
    """Mean and covariance of features fed batch by batch (host, float64).

    Keeps a running sum and a running sum of outer products of ``features - shift``,
    where ``shift`` is the first batch's mean: the covariance is then taken from
    centred-ish data, so the ``E[xx^T] - mu mu^T`` cancellation stays small.
    The covariance is the unbiased one (``np.cov``, as pytorch-fid and DisCo use).
    """

    dim: Optional[int] = None
    count: int = 0
    shift: Optional[np.ndarray] = None
    sum: Optional[np.ndarray] = None
    sum_outer: Optional[np.ndarray] = None

    def update(self, features) -> "FrechetStats":
        """features: (n, d), one row per sample."""
        feats = np.asarray(features, np.float64)
        if feats.ndim != 2:
            raise ValueError(f"features must be (n, d); got {feats.shape}")
        if feats.shape[0] == 0:
            return self
        if self.dim is None:
            self.dim = feats.shape[1]
            self.shift = feats.mean(axis=0)
            self.sum = np.zeros(self.dim)
            self.sum_outer = np.zeros((self.dim, self.dim))
        if feats.shape[1] != self.dim:
            raise ValueError(f"feature size {feats.shape[1]} != {self.dim} seen before")
        centred = feats - self.shift
        self.sum += centred.sum(axis=0)
        self.sum_outer += centred.T @ centred
        self.count += feats.shape[0]
        return self

    def merge(self, other: "FrechetStats") -> "FrechetStats":
        """Adds another accumulator's samples (e.g. from another host)."""
        if other.count == 0:
            return self
        if self.count == 0:
            self.dim, self.count, self.shift = other.dim, other.count, other.shift.copy()
            self.sum, self.sum_outer = other.sum.copy(), other.sum_outer.copy()
            return self
        delta = other.shift - self.shift  # re-express other's sums around our shift
        s = other.sum + other.count * delta
        self.sum_outer += other.sum_outer + np.outer(other.sum, delta) + np.outer(delta, other.sum)
        self.sum_outer += other.count * np.outer(delta, delta)
        self.sum += s
        self.count += other.count
        return self

    @property
    def mean(self) -> np.ndarray:
        """(d,)"""
        self._require(1)
        return self.shift + self.sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        """(d, d), unbiased (divides by n - 1)."""
        self._require(2)
        centred_mean = self.sum / self.count
        scatter = self.sum_outer - self.count * np.outer(centred_mean, centred_mean)
        return scatter / (self.count - 1)

    def _require(self, n: int):
        if self.count < n:
            raise ValueError(f"needs at least {n} sample(s); got {self.count}")

    def save(self, path: str) -> None:
        """Writes mu, sigma and n to an ``.npz`` (no pickles), e.g. ground-truth statistics."""
        files.write_npz(path, mu=self.mean, sigma=self.covariance, n=np.int64(self.count))


def load_frechet_reference(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu (d,), sigma (d, d)) from an ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's format)."""
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (float64)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) equals the sum of square roots of the eigenvalues of
    S1^(1/2) S2 S1^(1/2) (similar to S1 S2, but symmetric PSD), so it needs two
    symmetric eigen-decompositions and never an iterative complex ``sqrtm``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"shape mismatch: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}"
        )
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_stats(a: FrechetStats, b: FrechetStats) -> float:
    """The Fréchet distance between two accumulators' Gaussians."""
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
