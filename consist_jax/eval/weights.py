"""Weight files of the metric feature networks: where they come from, what we call them,
and how their keys map onto our modules (through ``consist_jax.convert.loading``).

Every network reads a *safetensors* file converted once by the user from the published
PyTorch file (we never unpickle):

    python -c "import torch, safetensors.torch as st; \\
      sd = torch.load('IN.pth', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); \\
      st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')"

A missing file is not an error but a status: the ``load_*`` functions raise
``WeightsUnavailable`` (its message names the path and the published file to convert),
which the evaluation summary reports per metric instead of a number.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional

import numpy as np

from consist_jax.convert.loading import (
    PICKLE_SUFFIXES,
    apply_rename_rules,
    read_state_dict,
    state_dict_to_params,
    to_jax_params,
)
from consist_jax.eval import i3d, inception, lpips, resnet3d

CONVERT_COMMAND = (
    "python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('IN', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\""
)

Paths = Optional[Mapping[str, str]]  # per-file overrides: {WEIGHT_FILES key: path}

# BatchNorm's step counter is a buffer no inference uses (older files lack it).
BN_COUNTER = r"(^|\.)num_batches_tracked$"


class WeightsUnavailable(FileNotFoundError):
    """A metric's weight file is absent: the metric is reported as unavailable."""


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One published weight file and how it maps onto our module.

    Attributes:
      filename: the converted file's name inside a weights folder.
      published: the PyTorch file to download and convert (and where it is published).
      init_shapes: our module's parameter tree (ShapeDtypeStructs).
      rename_rules: ``(regex, replacement)`` applied to the file's keys first.
      ignore_unexpected: regexes of keys present in the file that the metric never uses.
    """

    filename: str
    published: str
    init_shapes: Callable[[], Any]
    rename_rules: tuple[tuple[str, str], ...] = ()
    ignore_unexpected: tuple[str, ...] = (BN_COUNTER,)


WEIGHT_FILES: dict[str, WeightFile] = {
    "alexnet": WeightFile(
        "alexnet-owt-7be5be79.safetensors",
        "torchvision's ImageNet AlexNet, alexnet-owt-7be5be79.pth "
        "(https://download.pytorch.org/models/alexnet-owt-7be5be79.pth)",
        lambda: lpips.backbone_shapes("alex"),
        ignore_unexpected=(r"^classifier\.",),  # LPIPS taps the conv features only
    ),
    "vgg16": WeightFile(
        "vgg16-397923af.safetensors",
        "torchvision's ImageNet VGG16, vgg16-397923af.pth "
        "(https://download.pytorch.org/models/vgg16-397923af.pth)",
        lambda: lpips.backbone_shapes("vgg"),
        ignore_unexpected=(r"^classifier\.",),
    ),
    "lpips_alex": WeightFile(
        "lpips_alex.safetensors",
        "the lpips package's v0.1 linear heads, lpips/weights/v0.1/alex.pth "
        "(github.com/richzhang/PerceptualSimilarity)",
        lambda: lpips.head_shapes("alex"),
        rename_rules=((r"^lins\.(\d+)\.", r"lin\1."),),  # newer state dicts' ModuleList names
    ),
    "lpips_vgg": WeightFile(
        "lpips_vgg.safetensors",
        "the lpips package's v0.1 linear heads, lpips/weights/v0.1/vgg.pth "
        "(github.com/richzhang/PerceptualSimilarity)",
        lambda: lpips.head_shapes("vgg"),
        rename_rules=((r"^lins\.(\d+)\.", r"lin\1."),),
    ),
    "fid_inception": WeightFile(
        "pt_inception-2015-12-05-6726825d.safetensors",
        "pytorch-fid's FID Inception, pt_inception-2015-12-05-6726825d.pth "
        "(github.com/mseitzer/pytorch-fid/releases/download/fid_weights/)",
        inception.init_shapes,
        ignore_unexpected=(BN_COUNTER, r"^fc\.", r"^AuxLogits\."),  # pool3 features only
    ),
    "i3d": WeightFile(
        "i3d_pretrained_400.safetensors",
        "the Kinetics-400 I3D state dict i3d_pretrained_400.pt (piergiaj/pytorch-i3d layout, "
        "as used by DisCo, MCVD and common_metrics_on_video_quality)",
        i3d.init_shapes,
    ),
    "resnet3d": WeightFile(
        "resnet-50-kinetics.safetensors",
        "Hara et al.'s Kinetics 3D ResNet-50, resnet-50-kinetics.pth "
        "(kenshohara/3D-ResNets-PyTorch; the file DisCo's FID-VID loads)",
        resnet3d.init_shapes,
        rename_rules=((r"^module\.", ""),),  # saved from DataParallel
        ignore_unexpected=(BN_COUNTER, r"^fc\."),  # DisCo builds it with last_fc=False
    ),
}

# The weight files each metric needs.
METRIC_WEIGHTS = {
    "LPIPS-alex": ("alexnet", "lpips_alex"),
    "LPIPS-vgg": ("vgg16", "lpips_vgg"),
    "FID": ("fid_inception",),
    "FVD": ("i3d",),
    "FID-VID": ("resnet3d",),
}


def weight_path(key: str, weights_dir: Optional[str], paths: Paths = None) -> Optional[str]:
    """The path of weight file ``key``: ``paths[key]`` if given, else ``weights_dir/filename``."""
    if paths and key in paths:
        return paths[key]
    if weights_dir is None:
        return None
    return os.path.join(weights_dir, WEIGHT_FILES[key].filename)


def check_available(key: str, path: Optional[str]) -> None:
    """Raises ``WeightsUnavailable`` (naming what to convert) unless ``path`` is a file."""
    spec = WEIGHT_FILES[key]
    if path is None:
        raise WeightsUnavailable(
            f"no weights folder or path given for {spec.filename} ({spec.published})"
        )
    if path.endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"{path!r} is a pickled checkpoint; convert it to safetensors: {CONVERT_COMMAND}"
        )
    if not os.path.isfile(path):
        stem = os.path.splitext(path)[0]
        pickled = [stem + s for s in PICKLE_SUFFIXES if os.path.isfile(stem + s)]
        hint = f" (found {pickled[0]!r}: convert it)" if pickled else ""
        raise WeightsUnavailable(
            f"weight file {path!r} not found{hint}; get {spec.published} and convert it: "
            f"{CONVERT_COMMAND}"
        )


def load_weight_file(key: str, path: Optional[str]) -> dict:
    """Reads one converted file onto our parameter subtree (numpy, float32).

    Raises:
      WeightsUnavailable: the file is absent.
      CheckpointError: the file is present but does not match (every key is accounted for).
    """
    check_available(key, path)
    spec = WEIGHT_FILES[key]
    state = apply_rename_rules(read_state_dict([path]), spec.rename_rules)
    return state_dict_to_params(
        state, spec.init_shapes(), source=path, ignore_unexpected=spec.ignore_unexpected,
        dtype=np.float32,
    )


def _merge(*trees: dict) -> dict:
    merged: dict = {}
    for tree in trees:
        overlap = set(merged) & set(tree)
        if overlap:
            raise ValueError(f"weight files overlap on {sorted(overlap)}")
        merged.update(tree)
    return merged


def load_lpips(net: str, weights_dir: Optional[str] = None, paths: Paths = None):
    """(LPIPS module, params) from the backbone file and the lpips heads file."""
    backbone_key, heads_key = METRIC_WEIGHTS[f"LPIPS-{net}"]
    params = _merge(
        load_weight_file(backbone_key, weight_path(backbone_key, weights_dir, paths)),
        load_weight_file(heads_key, weight_path(heads_key, weights_dir, paths)),
    )
    return lpips.LPIPS(net), to_jax_params(params)


def load_fid_inception(weights_dir: Optional[str] = None, paths: Paths = None):
    """(FIDInceptionV3 module, params)."""
    params = load_weight_file("fid_inception", weight_path("fid_inception", weights_dir, paths))
    return inception.FIDInceptionV3(), to_jax_params(params)


def load_i3d(weights_dir: Optional[str] = None, paths: Paths = None):
    """(InceptionI3D module, params)."""
    params = load_weight_file("i3d", weight_path("i3d", weights_dir, paths))
    return i3d.InceptionI3D(), to_jax_params(params)


def load_resnet3d(weights_dir: Optional[str] = None, paths: Paths = None):
    """(ResNet3D50 module, params)."""
    params = load_weight_file("resnet3d", weight_path("resnet3d", weights_dir, paths))
    return resnet3d.ResNet3D50(), to_jax_params(params)


def availability(weights_dir: Optional[str] = None, paths: Paths = None) -> dict[str, str]:
    """``{metric: "available" | reason}`` for every feature-network metric, without loading."""
    status = {}
    for metric, keys in METRIC_WEIGHTS.items():
        try:
            for key in keys:
                check_available(key, weight_path(key, weights_dir, paths))
            status[metric] = "available"
        except (WeightsUnavailable, ValueError) as e:
            status[metric] = str(e)
    return status
