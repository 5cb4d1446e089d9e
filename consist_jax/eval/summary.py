"""All the literature's metrics over a stream of (generated, ground truth[, mask]) batches.

    summary = EvaluationSummary(weights_dir="weights/eval")          # protocol=STANDARD
    for generated, ground_truth, mask in batches:                    # (B, F, H, W, 3) in [0, 1]
        summary.add_videos(generated, ground_truth, mask)            # or add_frames((N, H, W, 3))
    files.write_json("metrics.json", summary.result())               # consist_jax.files: atomic

Nothing is kept per frame: pixel metrics go into ``StreamingMean``s, feature-network
outputs into ``FrechetStats`` (host float64), so a whole test split never sits in memory.

Per-frame metrics (averaged over every frame fed): L1, PSNR, SSIM, LPIPS, and with masks
their region variants ``L1_masked``, ``PSNR_masked``, ``SSIM_masked`` (see ``metrics``).
Set metrics: FID over frames (pytorch-fid's Inception pool3), FID-VID over videos
(DisCo's 3D ResNet-50: each video cut into 16-frame clips, last frame repeated to fill
the last clip, clip features averaged per video) and FVD over videos (DisCo's I3D: each
video fed whole, Kinetics logits averaged over time). DisCo scores 16-frame clips: feed
clips of 16 frames to compare with its numbers.

A metric whose weight file is absent, or that got too little data (a Fréchet distance
needs 2 samples per side; video metrics need ``add_videos``), is listed under
``"unavailable"`` with the reason, never reported as a number.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax.eval import i3d, inception, lpips, metrics, resnet3d, weights
from consist_jax.eval.metrics import FrechetStats, StreamingMean, frechet_distance_from_stats

PIXEL_METRICS = ("L1", "PSNR", "SSIM")
ALL_METRICS = ("L1", "PSNR", "SSIM", "LPIPS", "FID", "FID-VID", "FVD")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How frames are scored. ``STANDARD`` is the textbook definition of each metric;
    ``DISCO`` reproduces DisCo's evaluation code (``tool/metrics`` of its repository, whose
    TikTok numbers the follow-up papers compare against), quirks included.

    Attributes:
      name: recorded in the result.
      quantize: round frames to 8-bit levels first (DisCo scores saved PNGs).
      ssim_gray: SSIM on BT.601 luma (DisCo: cv2 BGR2GRAY) instead of per RGB channel.
      ssim_window / ssim_win_size / ssim_sample_covariance: see ``metrics.ssim``.
      lpips_net: "alex" (lpips' default) or "vgg" (DisCo).
      lpips_normalize: map [0, 1] inputs to [-1, 1] (lpips' ``normalize=True``); DisCo feeds
        [0, 1] images as if they were [-1, 1].
      disco_scores: also report DisCo's L1 and PSNR as its code computes them:
        ``L1-DisCo`` (the mean absolute error in 0..255 units divided by H * W; its tables
        print values around 4e-4) and ``PSNR-DisCo`` (8-bit differences wrapped modulo
        256, see ``metrics.psnr_disco``).
      clip_length: frames per clip for FID-VID (16 in DisCo).
    """

    name: str = "standard"
    quantize: bool = False
    ssim_gray: bool = False
    ssim_window: str = "gaussian"
    ssim_win_size: Optional[int] = None
    ssim_sample_covariance: bool = False
    lpips_net: str = "alex"
    lpips_normalize: bool = True
    disco_scores: bool = False
    clip_length: int = resnet3d.CLIP_LENGTH


STANDARD = Protocol()
DISCO = Protocol(
    name="disco", quantize=True, ssim_gray=True, ssim_window="uniform", ssim_win_size=7,
    ssim_sample_covariance=True, lpips_net="vgg", lpips_normalize=False, disco_scores=True,
)


# --------------------------------------------------------------------------- jitted scorers


@functools.partial(jax.jit, static_argnames=("protocol",))
def _prepare(images: jax.Array, protocol: Protocol) -> jax.Array:
    images = images.astype(jnp.float32)
    return metrics.quantize_uint8(images) if protocol.quantize else images


def _ssim_inputs(x, protocol):
    if not protocol.ssim_gray:
        return x
    gray = metrics.rgb_to_gray(x)
    return metrics.quantize_uint8(gray) if protocol.quantize else gray


def _ssim_kwargs(protocol):
    return dict(window=protocol.ssim_window, win_size=protocol.ssim_win_size,
                use_sample_covariance=protocol.ssim_sample_covariance)


@functools.partial(jax.jit, static_argnames=("protocol",))
def pixel_scores(generated, ground_truth, protocol: Protocol = STANDARD) -> dict:
    """Per-frame L1 / PSNR / SSIM: (N, H, W, 3) x2 in [0, 1] -> {name: (N,)}."""
    x, y = _prepare(generated, protocol), _prepare(ground_truth, protocol)
    scores = {"L1": metrics.l1(x, y), "PSNR": metrics.psnr(x, y)}
    scores["SSIM"] = metrics.ssim(_ssim_inputs(x, protocol), _ssim_inputs(y, protocol),
                                  **_ssim_kwargs(protocol))
    if protocol.disco_scores:
        scores["L1-DisCo"] = scores["L1"] * 255.0 / (x.shape[-3] * x.shape[-2])
        scores["PSNR-DisCo"] = metrics.psnr_disco(x, y)
    return scores


@functools.partial(jax.jit, static_argnames=("protocol",))
def masked_pixel_scores(generated, ground_truth, mask, protocol: Protocol = STANDARD) -> dict:
    """Per-frame region scores: (N, H, W, 3) x2, mask (N, H, W[, 1]) -> {name_masked: (N,)}."""
    x, y = _prepare(generated, protocol), _prepare(ground_truth, protocol)
    return {
        "L1_masked": metrics.masked_l1(x, y, mask),
        "PSNR_masked": metrics.masked_psnr(x, y, mask),
        "SSIM_masked": metrics.masked_ssim(
            _ssim_inputs(x, protocol), _ssim_inputs(y, protocol), mask, **_ssim_kwargs(protocol)),
    }


# --------------------------------------------------------------------------- summary


class EvaluationSummary:
    """Streams batches of frames or videos into every requested metric.

    Args:
      weights_dir: folder holding the converted feature-network files under their
        default names (``weights.WEIGHT_FILES[...].filename``); ``None``: no networks.
      weight_paths: per-file overrides, ``{"fid_inception": "/x/y.safetensors", ...}``.
      protocol: ``STANDARD`` or ``DISCO`` (or a custom ``Protocol``).
      metrics: the subset of ``ALL_METRICS`` to compute.
    """

    def __init__(
        self,
        weights_dir: Optional[str] = None,
        *,
        weight_paths: Optional[Mapping[str, str]] = None,
        protocol: Protocol = STANDARD,
        metrics: Iterable[str] = ALL_METRICS,
    ):
        self.protocol = protocol
        self.requested = tuple(metrics)
        unknown = set(self.requested) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {ALL_METRICS}")
        self.unavailable: dict[str, str] = {}
        self.means: dict[str, StreamingMean] = {}
        self.stats = {name: (FrechetStats(), FrechetStats())
                      for name in ("FID", "FID-VID", "FVD") if name in self.requested}
        self.frames = self.videos = self.masked_frames = 0
        self._networks = self._load_networks(weights_dir, weight_paths)

    # ----------------------------------------------------------------- loading

    def _load_networks(self, weights_dir, paths) -> dict:
        loaders = {
            "LPIPS": lambda: weights.load_lpips(self.protocol.lpips_net, weights_dir, paths),
            "FID": lambda: weights.load_fid_inception(weights_dir, paths),
            "FID-VID": lambda: weights.load_resnet3d(weights_dir, paths),
            "FVD": lambda: weights.load_i3d(weights_dir, paths),
        }
        networks = {}
        for name, load in loaders.items():
            if name not in self.requested:
                continue
            try:
                networks[name] = _jitted(name, *load(), self.protocol)
            except weights.WeightsUnavailable as e:  # absent: a status, not a crash
                self.unavailable[name] = str(e)
        return networks

    # ----------------------------------------------------------------- feeding

    def add_frames(self, generated, ground_truth, mask=None) -> None:
        """generated, ground_truth (N, H, W, 3) in [0, 1]; mask (N, H, W[, 1]) or None."""
        generated, ground_truth = jnp.asarray(generated), jnp.asarray(ground_truth)
        if generated.shape != ground_truth.shape or generated.ndim != 4:
            raise ValueError(
                f"frames: two (N, H, W, 3) arrays; got {generated.shape}, {ground_truth.shape}"
            )
        if set(PIXEL_METRICS) & set(self.requested):
            scores = pixel_scores(generated, ground_truth, protocol=self.protocol)
            self._accumulate({k: v for k, v in scores.items() if k.split("-")[0] in self.requested})
            if mask is not None:
                masked = masked_pixel_scores(
                    generated, ground_truth, jnp.asarray(mask), protocol=self.protocol
                )
                self._accumulate(
                    {k: v for k, v in masked.items() if k.split("_")[0] in self.requested}
                )
                self.masked_frames += generated.shape[0]
        if "LPIPS" in self._networks:
            self._accumulate({"LPIPS": self._networks["LPIPS"](generated, ground_truth)})
        if "FID" in self._networks:
            self._add_features("FID", generated, ground_truth)
        self.frames += generated.shape[0]

    def add_videos(self, generated, ground_truth, mask=None) -> None:
        """generated, ground_truth (B, F, H, W, 3) in [0, 1]; mask (B, F, H, W[, 1]) or None.

        Every frame also feeds the per-frame metrics and FID.
        """
        generated, ground_truth = jnp.asarray(generated), jnp.asarray(ground_truth)
        if generated.shape != ground_truth.shape or generated.ndim != 5:
            raise ValueError(
                f"videos: two (B, F, H, W, 3) arrays; got {generated.shape}, {ground_truth.shape}"
            )
        flat = lambda v: v.reshape(-1, *v.shape[2:])
        mask = None if mask is None else flat(jnp.asarray(mask))
        self.add_frames(flat(generated), flat(ground_truth), mask)
        for name in ("FID-VID", "FVD"):
            if name in self._networks:
                self._add_features(name, generated, ground_truth)
        self.videos += generated.shape[0]

    def _accumulate(self, scores: Mapping[str, jax.Array]) -> None:
        for name, values in scores.items():
            self.means.setdefault(name, StreamingMean()).update(np.asarray(values))

    def _add_features(self, name, generated, ground_truth) -> None:
        generated_stats, truth_stats = self.stats[name]
        generated_stats.update(np.asarray(self._networks[name](generated)))
        truth_stats.update(np.asarray(self._networks[name](ground_truth)))

    # ----------------------------------------------------------------- result

    def result(self) -> dict:
        """A JSON-ready dict: metrics, unavailable (with reasons), counts, protocol."""
        values = {name: mean.mean for name, mean in self.means.items() if mean.count}
        unavailable = dict(self.unavailable)
        for name, (generated_stats, truth_stats) in self.stats.items():
            if name in unavailable:
                continue
            unit = "frames" if name == "FID" else "videos (add_videos)"
            if min(generated_stats.count, truth_stats.count) < 2:
                count = min(generated_stats.count, truth_stats.count)
                unavailable[name] = f"needs at least 2 {unit} per side; got {count}"
                continue
            values[name] = frechet_distance_from_stats(generated_stats, truth_stats)
        for name in self.requested:
            if name not in values and name not in unavailable:
                unavailable[name] = "no frames were added"
        empty = {n: m.skipped for n, m in self.means.items() if m.skipped}
        return {
            "metrics": {k: float(v) for k, v in sorted(values.items())},
            "unavailable": unavailable,
            "counts": {"frames": self.frames, "videos": self.videos,
                       "masked_frames": self.masked_frames, "empty_masks": empty},
            "protocol": dataclasses.asdict(self.protocol),
        }


def _jitted(name: str, module, params, protocol: Protocol):
    """One jitted (generated or ground-truth batch) -> outputs function per network.

    The parameters are passed as arguments, not closed over: closed-over arrays would be
    baked into the compiled program as constants (hundreds of MB for the 3D ResNet).
    """
    if name == "LPIPS":
        normalize = protocol.lpips_normalize
        fn = jax.jit(lambda p, x, y: lpips.lpips_distance(module, p, x, y, normalize))
        return lambda x, y: fn(params, _prepare(x, protocol), _prepare(y, protocol))
    if name == "FID":
        fn = jax.jit(lambda p, x: inception.fid_features(module, p, x))
    elif name == "FVD":
        fn = jax.jit(lambda p, v: module.apply({"params": p}, i3d.fvd_preprocess(v)))
    else:
        fn = jax.jit(lambda p, v: _fid_vid_features(module, p, v, protocol.clip_length))
    return lambda x: fn(params, _prepare(x, protocol))


def _fid_vid_features(module, params, videos, clip_length):
    """(B, F, H, W, 3) in [0, 1] -> (B, 2048): the mean of each video's clip features."""
    clips = resnet3d.video_clips(resnet3d.fid_vid_preprocess(videos), clip_length)
    b, s = clips.shape[:2]
    feats = module.apply({"params": params}, clips.reshape(b * s, *clips.shape[2:]))
    return feats.reshape(b, s, -1).mean(axis=1)
