"""Evaluation: the literature's image and video metrics, computed the standard way.

  metrics.py    L1 / PSNR / SSIM (+ masked), StreamingMean, FrechetStats, frechet_distance
  resize.py     pytorch-fid's bilinear and PIL's bicubic resizes
  lpips.py      LPIPS v0.1 (AlexNet / VGG16 + linear heads)
  inception.py  pytorch-fid's FID Inception-v3 (2048-d pool features)
  i3d.py        Kinetics-400 I3D (FVD: 400 logits)
  resnet3d.py   Kinetics 3D ResNet-50 (DisCo's FID-VID: 2048-d clip features)
  weights.py    published weight files -> our parameter trees (safetensors only)
  summary.py    EvaluationSummary: every metric over a stream of batches -> metrics.json
  figures.py    the grid of held-out people and the metric curve's plot (PIL, matplotlib)

Importing this package never imports torch and never unpickles.
"""
from consist_jax.eval.metrics import (
    FrechetStats,
    StreamingMean,
    frechet_distance,
    frechet_distance_from_stats,
    l1,
    masked_l1,
    masked_psnr,
    masked_ssim,
    psnr,
    ssim,
)
from consist_jax.eval.summary import ALL_METRICS, DISCO, STANDARD, EvaluationSummary, Protocol
from consist_jax.eval.weights import WEIGHT_FILES, WeightsUnavailable, availability

__all__ = [
    "ALL_METRICS", "DISCO", "STANDARD", "EvaluationSummary", "FrechetStats", "Protocol",
    "StreamingMean", "WEIGHT_FILES", "WeightsUnavailable", "availability", "frechet_distance",
    "frechet_distance_from_stats", "l1", "masked_l1", "masked_psnr", "masked_ssim", "psnr", "ssim",
]
