"""Ahead-of-time compiles for Cloud TPU topologies from any host, and what they tell.

    python train.py --config=configs/sd15_image.py --workdir=DIR --compile_topology=v5p-8

builds the exact train step training runs (``trainer.build_train_program``: shardings,
donation, remat, dtype, optimiser, accumulation) for the TPU devices of a topology that
libtpu describes without any TPU present, from abstract shapes only (no weights, no data;
a pretrained folder's config.json is read when it is there, else the built-in SD-1.5
image-variations architecture), compiles it, and writes ``{workdir}/compile_report.json``:

  topology, num_slices, device_kind, num_devices, mesh (axis -> size), global_batch_size,
  per_device_bytes {arguments, outputs, temp, generated_code, peak} (XLA's memory
  analysis of one device's program), device_memory_bytes (the chip's HBM), fits (peak
  within HBM less ``HBM_HEADROOM``), flops_per_step and bytes_accessed_per_step (all
  devices: XLA's cost analysis of one device's program times the devices),
  estimated_step_seconds (roofline: the slower of compute and HBM traffic at the chip's
  peaks, ``TPU_CHIPS``), estimated_mfu, tpu_attention_kernels (compiled Mosaic kernel
  calls in the executable: 0 means the attention fell back to XLA), and what the compile
  cost this host: compile_seconds (tracing, lowering and compiling, wall) and
  host_peak_rss_bytes (the compiling process's peak resident memory, to size the host).

``sample_report`` (``bench/compile_tpu.py --program=sample``) does the same for the
two-stage sampler (reference pass, the whole guided loop over the temporal windows, VAE
decode) on one chip.

Caveats: XLA's cost analysis does not see inside Mosaic kernels (attention FLOPs are not
in flops_per_step) and counts a loop's body once (the sampler's steps, gradient
accumulation); the roofline ignores communication and overlap. So the times are lower
bounds and the MFU an upper bound; the memory figures are XLA's own. A program XLA:TPU
refuses for lack of HBM is reported with ``fits: false`` and the size it asked for.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import resource
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from consist_jax import files
from consist_jax.training.metrics import PEAK_TFLOPS, cost_analysis

REPORT_NAME = "compile_report.json"
# The runtime, fragmentation and the input pipeline's device buffers need room besides
# XLA's peak; MaxText-style planning keeps ~10% of HBM free.
HBM_HEADROOM = 0.10
GIB = 2**30


class Chip(NamedTuple):
    """Per-chip peaks: dense bf16 TFLOP/s, HBM GiB, HBM GB/s. One JAX device per chip
    (v4 and v5p run their two TensorCores as one megacore device)."""

    peak_tflops: float
    hbm_gib: float
    hbm_gbps: float


# Sources: Cloud TPU system architecture pages, cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}
# ("Peak compute per chip (bf16)", "HBM2 capacity / bandwidth"), read 2026-12.
TPU_CHIPS = {
    "TPU v4": Chip(PEAK_TFLOPS["TPU v4"], 32.0, 1228.0),
    "TPU v5 lite": Chip(PEAK_TFLOPS["TPU v5 lite"], 16.0, 819.0),  # v5e
    "TPU v5": Chip(PEAK_TFLOPS["TPU v5"], 95.0, 2765.0),  # v5p
    "TPU v6 lite": Chip(PEAK_TFLOPS["TPU v6 lite"], 32.0, 1640.0),  # v6e (Trillium)
}


class TopologyError(ValueError):
    """A --compile_topology name this tool cannot describe."""


@dataclasses.dataclass(frozen=True)
class Family:
    """How a Cloud TPU accelerator type maps onto libtpu's topology description."""

    libtpu_name: str  # topology_name prefix
    cores_per_chip: int  # the accelerator type counts TensorCores (v4, v5p) or chips
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    chip_config: str
    single_host_chips: int  # chips one host holds when the slice is one host


FAMILIES = {
    "v4": Family("v4", 2, 3, "megacore", 4),
    "v5p": Family("v5p", 2, 3, "megacore", 4),
    "v5e": Family("v5e", 1, 2, "default", 8),
    "v5litepod": Family("v5e", 1, 2, "default", 8),
    "v6e": Family("v6e", 1, 2, "default", 8),
}


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Chips -> the slice's shape as Cloud TPU names it: 2x2x1, 2x2x2, 2x2x4, 2x4x4,
    4x4x4, ... (3-D); 2x2, 2x4, 4x4, 4x8, ... (2-D)."""
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        i = max(range(dims), key=lambda d: (-shape[d], d))  # the last of the smallest
        shape[i] *= 2
    return tuple(reversed(shape)) if dims == 3 and chips < 8 else tuple(shape)


def parse_accelerator_type(name: str) -> tuple[Family, tuple[int, ...]]:
    """'v5p-128' -> (family, chip shape (4, 4, 4)). Cloud TPU names: v4/v5p count cores."""
    match = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not match:
        raise TopologyError(
            f"--compile_topology={name!r}: expected a Cloud TPU accelerator type such as "
            f"v4-8, v5e-8, v5e-16, v5p-8, v5p-128, v6e-8 (families {sorted(FAMILIES)})"
        )
    family = FAMILIES[match.group(1)]
    count = int(match.group(2))
    chips = count // family.cores_per_chip
    if count % family.cores_per_chip or chips < 1 or chips & (chips - 1):
        raise TopologyError(
            f"--compile_topology={name!r}: {count} must be a power of two "
            f"(x{family.cores_per_chip} cores per chip)"
        )
    return family, _torus_shape(chips, family.dims)


def tpu_devices(name: str, num_slices: int = 1) -> list:
    """The TPU devices of ``num_slices`` slices of accelerator type ``name`` (no TPU needed)."""
    from jax.experimental import topologies

    if num_slices < 1:
        raise TopologyError(f"--compile_topology_num_slices={num_slices}: must be >= 1")
    family, shape = parse_accelerator_type(name)
    chips = math.prod(shape)
    if chips <= family.single_host_chips:
        host = shape + (1,) * (3 - len(shape))
    else:
        host = (2, 2, 1)
    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{family.libtpu_name}:{'x'.join(map(str, shape))}",
        chip_config_name=family.chip_config,
        chips_per_host_bounds=host,
        num_slices=num_slices,
    )
    return list(topology.devices)


def use_cpu_host() -> None:
    """This process compiles for TPUs it does not have: keep jax's own backend on the CPU
    and let libtpu load although another process may hold it (it only describes devices)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    jax.config.update("jax_platforms", "cpu")


# --------------------------------------------------------------------------- the model

# diffusers' / transformers' config.json of SD image variations (lambdalabs/sd-image-
# variations-diffusers), the image stage's pretrained model: used when a folder is unset.
SD15_IMAGE_ENCODER = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, projection_dim=768,
    num_hidden_layers=24, num_attention_heads=16, image_size=224, patch_size=14, hidden_act="quick_gelu",
)


def _folder_config(folder: str) -> Optional[dict]:
    from consist_jax.convert.loading import read_config

    return read_config(folder) if folder and os.path.isdir(folder) else None


def abstract_model(model_config: Any) -> tuple[Any, Any, dict]:
    """(SCDModel, params, frozen) of a run config's ``model`` section, as ShapeDtypeStructs.

    Architectures come from the pretrained folders' config.json where they exist, else
    from ``model.unet`` (UNetConfig defaults are SD-1.5's) or, for ``model.backbone="wan"``,
    ``model.wan``; SD-1.x's VAE and the CLIP ViT-L/14 image encoder of SD image variations.
    No weights are read.
    """
    from consist_jax import factory

    factory.check_fresh_unet_options(model_config, init_params=True)
    if factory.backbone(model_config) == "wan":
        return _abstract_wan_model(model_config)
    from consist_jax.convert.unet import unet_param_shapes
    from consist_jax.models.motion import MotionConfig
    from consist_jax.models.scd import SCDModel
    from consist_jax.models.unet import UNet, UNetConfig

    unet_cfg = dict(model_config.unet)
    pretrained = _folder_config(model_config.pretrained_unet)
    if pretrained is not None:
        overrides = {k: v for k, v in unet_cfg.items() if k in factory.SCD_OPTIONS}
        checked = factory.unet_config_from(overrides)  # dtype names resolved, options checked
        unet_config = UNetConfig.from_diffusers(pretrained, **{k: getattr(checked, k) for k in overrides})
    else:
        unet_config = factory.unet_config_from(unet_cfg)
    motion = MotionConfig(**factory.motion_options(model_config)) if factory.is_video_model(model_config) else None
    # Shapes without the frames axis (it splits activations over a mesh, not parameters).
    params = unet_param_shapes(dataclasses.replace(
        unet_config, motion=motion and dataclasses.replace(motion, frames_axis=None)))
    unet_config = dataclasses.replace(unet_config, motion=motion)
    codec, frozen = _abstract_codec(model_config.codec)
    context, frozen = _abstract_context(model_config.context, unet_config.cross_attention_dim, frozen)
    return SCDModel(UNet(unet_config), codec, context), params, frozen


def _abstract_wan_model(model_config: Any) -> tuple[Any, Any, dict]:
    """``abstract_model`` of the Wan DiT (``model.backbone="wan"``): the architecture from
    ``model.pretrained_transformer``'s config.json, else ``model.wan``; the parameters'
    shapes from tracing the DiT's init (``jax.eval_shape``: nothing is allocated).

    The codec as ``model.codec`` says (configs/wan_*_scd.py: Wan's VAE, shapes only); a
    "vae" codec without a folder is SD-1.x's per-frame VAE with the DiT's latent channels.
    """
    from consist_jax import factory
    from consist_jax.models.scd import SCDModel
    from consist_jax.models.wan_denoiser import WanDenoiser
    from consist_jax.models.wan_scd import init_wan_scd_params
    from consist_jax.models.wan_transformer import WanTransformerConfig

    pretrained = _folder_config(model_config.get("pretrained_transformer", ""))
    transformer = None if pretrained is None else WanTransformerConfig.from_diffusers(pretrained)
    in_channels = int((pretrained or model_config.wan)["in_channels"])
    codec, frozen = _abstract_codec(model_config.codec, latent_channels=in_channels)
    wan_config = factory.wan_config_from(model_config.wan, codec.factor, transformer, codec.temporal_factor)
    params = jax.eval_shape(lambda: init_wan_scd_params(wan_config, jax.random.key(0)))
    context, frozen = _abstract_context(model_config.context, wan_config.cross_attention_dim, frozen)
    return SCDModel(WanDenoiser(wan_config), codec, context), params, frozen


def _abstract_codec(codec_cfg: Any, latent_channels: Optional[int] = None) -> tuple[Any, dict]:
    """(codec, frozen) of ``model.codec``: a VAE from its folder's config.json, else SD-1.x's
    (with ``latent_channels`` when given); Wan's VAE from its folder's config.json, else
    ``model.codec.wan_vae``'s architecture."""
    from consist_jax import factory
    from consist_jax.convert.wan_vae import wan_vae_param_shapes
    from consist_jax.models.scd import PixelCodec, VAECodec, WanVAECodec
    from consist_jax.models.vae import AutoencoderKL, VAEConfig, vae_param_shapes
    from consist_jax.models.wan_vae import AutoencoderKLWan, WanVAEConfig

    if codec_cfg.kind == "wan_vae":
        vae_json = _folder_config(codec_cfg.get("vae_path", ""))
        wan_vae = WanVAEConfig.from_diffusers(vae_json) if vae_json else factory.wan_vae_config_from(codec_cfg)
        return WanVAECodec(AutoencoderKLWan(wan_vae)), {"vae": wan_vae_param_shapes(wan_vae)}
    if codec_cfg.kind != "vae":
        return PixelCodec(int(codec_cfg.get("factor", 1))), {}
    vae_json = _folder_config(codec_cfg.get("vae_path", ""))
    if vae_json:
        vae_config = VAEConfig.from_diffusers(vae_json)
    else:
        vae_config = VAEConfig(**({} if latent_channels is None else {"latent_channels": latent_channels}))
    codec = VAECodec(AutoencoderKL(vae_config), int(codec_cfg.get("chunk_size", 8)))
    return codec, {"vae": vae_param_shapes(vae_config)}


def _abstract_context(context_cfg: Any, dim: int, frozen: dict) -> tuple[Any, dict]:
    """(context, frozen) of ``model.context``: none, a caption (from the batch), or the CLIP
    image encoder from its folder's config.json, else SD image variations'."""
    from consist_jax.models.clip_vision import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        clip_vision_param_shapes,
    )
    from consist_jax.models.scd import ImageEncoderContext, NullContext, TextContext

    if context_cfg.kind == "none":
        return NullContext(dim), frozen
    if context_cfg.kind == "text":  # the caption embeddings come in the batch
        return TextContext(dim), frozen
    clip_json = _folder_config(context_cfg.get("image_encoder_path", "")) or SD15_IMAGE_ENCODER
    clip_config = CLIPVisionConfig.from_transformers(clip_json)
    context = ImageEncoderContext(CLIPVisionModelWithProjection(clip_config), context_cfg.kind)
    return context, {**frozen, "image_encoder": clip_vision_param_shapes(clip_config)}


def caption_length(pipe: Any) -> int:
    """The caption embeddings' padded length L: the folder's (data.pipeline.text_embeddings_dir),
    else Wan's 512 (an abstract compile needs no folder)."""
    from consist_jax.convert.caption_encoder import WAN_MAX_LENGTH
    from consist_jax.data.text_embeddings import TextEmbeddings

    folder = pipe.get("text_embeddings_dir", "")
    return TextEmbeddings(folder).max_length if folder else WAN_MAX_LENGTH


def abstract_batch(config: Any, batch_size: int, model: Any = None) -> dict:
    """The train batch the step reads (``trainer.train_keys`` + example_id); with ``model`` (an
    SCDModel) whose context is a caption (``TextContext``), its embeddings ``context`` (B, L,
    D) too."""
    from consist_jax.models.scd import TextContext
    from consist_jax.training.step import LossConfig

    pipe = config.data.pipeline
    h, w = pipe.resolution
    f = int(pipe.clip_length)
    image = lambda *lead: jax.ShapeDtypeStruct((*lead, h, w, 3), jnp.float32)  # noqa: E731
    batch = {
        "reference": image(batch_size),
        "reference_pose": image(batch_size),
        "target": image(batch_size, f),
        "target_pose": image(batch_size, f),
        "example_id": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    if pipe.get("with_region_mask", False):
        batch["region_mask"] = jax.ShapeDtypeStruct((batch_size, f, h, w, 1), jnp.float32)
    if LossConfig.from_config(config.train).reads_figure_mask:
        batch["target_mask"] = jax.ShapeDtypeStruct((batch_size, f, h, w, 1), jnp.float32)
    if model is not None and isinstance(model.context, TextContext):
        batch["context"] = jax.ShapeDtypeStruct((batch_size, caption_length(pipe), model.context.dim), jnp.float32)
    return batch


# --------------------------------------------------------------------------- compiling


def count_tpu_kernels(compiled: Any) -> int:
    """Compiled Mosaic (Pallas TPU) kernel calls in an executable's HLO."""
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def compile_train_step(config: Any, devices: list, global_batch_size: Optional[int] = None):
    """Compiles ``config``'s train step for ``devices`` -> (compiled, mesh)."""
    from consist_jax.training import sharding
    from consist_jax.training.trainer import build_train_program

    batch_size = int(global_batch_size or config.train.global_batch_size)
    mesh = sharding.mesh_from_config(config.mesh, devices)
    sharding.check_batch_divides(batch_size, mesh, len({d.process_index for d in devices}))
    accum = int(config.optim.grad_accum_steps)
    if accum < 1 or batch_size % accum:
        raise ValueError(f"optim.grad_accum_steps={accum} must divide the global batch size {batch_size}")
    # Shapes and constants (the noise schedule) are made on this host: eager ops cannot
    # run on a described topology. Only the step is traced for its devices.
    model, params, frozen = abstract_model(config.model)
    program = build_train_program(config, model, params, frozen, mesh)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh):  # the attention kernels read the targeted devices from it
        lowered = program.step.lower(program.abstract_state, abstract_batch(config, batch_size, model), rng,
                                     frozen)
        return lowered.compile(), mesh


def make_report(compiled: Any, mesh: Any, topology: str, num_slices: int, global_batch_size: int,
                **extra) -> dict:
    """The report of one compiled program (keys in the module doc)."""
    devices = mesh.devices.flat
    kind = next(iter(devices)).device_kind
    chip = TPU_CHIPS.get(kind)
    if chip is None:
        raise TopologyError(f"no chip figures for device kind {kind!r}; TPU_CHIPS has {sorted(TPU_CHIPS)}")
    memory = compiled.memory_analysis()
    per_device = {
        "arguments": int(memory.argument_size_in_bytes),
        "outputs": int(memory.output_size_in_bytes),
        "temp": int(memory.temp_size_in_bytes),
        "generated_code": int(memory.generated_code_size_in_bytes),
    }
    # Everything live at once, the donated state counted once. XLA:TPU's own
    # peak_memory_in_bytes can be below the temporaries alone, so it is only a floor.
    summed = sum(per_device.values()) - int(memory.alias_size_in_bytes)
    per_device["peak"] = max(int(getattr(memory, "peak_memory_in_bytes", 0)), summed)
    hbm = int(chip.hbm_gib * GIB)
    cost = cost_analysis(compiled)
    flops, traffic = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    seconds = max(flops / (chip.peak_tflops * 1e12), traffic / (chip.hbm_gbps * 1e9))
    n = mesh.devices.size
    return {
        "topology": topology,
        "num_slices": num_slices,
        "device_kind": kind,
        "num_devices": int(n),
        "mesh": {str(a): int(s) for a, s in mesh.shape.items()},
        "global_batch_size": int(global_batch_size),
        "per_device_bytes": per_device,
        "device_memory_bytes": hbm,
        "hbm_headroom": HBM_HEADROOM,
        "fits": within_budget(per_device["peak"], hbm),
        "flops_per_step": flops * n,
        "bytes_accessed_per_step": traffic * n,
        "estimated_step_seconds": seconds,
        "estimated_mfu": flops / (seconds * chip.peak_tflops * 1e12) if seconds else 0.0,
        "tpu_attention_kernels": count_tpu_kernels(compiled),
        "chip": chip._asdict(),
        **extra,
    }


def format_table(report: dict) -> str:
    """A short human-readable summary of a report."""
    b = {k: v or 0 for k, v in report["per_device_bytes"].items()}
    if report["estimated_step_seconds"] is None:  # refused for memory: nothing else is known
        report = dict(report, estimated_step_seconds=0.0, estimated_mfu=0.0, flops_per_step=0.0)
    rows = [
        ("topology", f"{report['topology']} x{report['num_slices']} slice(s): {report['num_devices']} x "
                     f"{report['device_kind']}, mesh {report['mesh']}"),
        ("global batch", report["global_batch_size"]),
        ("per-device peak", f"{b['peak'] / GIB:.2f} GiB of {report['device_memory_bytes'] / GIB:.0f} GiB HBM "
                            + (f"(args {b['arguments'] / GIB:.2f}, out {b['outputs'] / GIB:.2f}, "
                               f"temp {b['temp'] / GIB:.2f})" if b["temp"] else f"({report.get('note', '')})")),
        ("fits", f"{report['fits']} ({100 * report['hbm_headroom']:.0f}% headroom)"),
        ("time (roofline)", f"{report['estimated_step_seconds'] * 1e3:.1f} ms, "
                            f"MFU <= {100 * report['estimated_mfu']:.0f}%"),
        ("TFLOP / step", f"{report['flops_per_step'] / 1e12:.1f}"),
        ("TPU attention kernels", report["tpu_attention_kernels"]),
    ]
    if "cost_counts" in report:
        rows.append(("counted", report["cost_counts"]))
    if "compile_seconds" in report:
        rows.append(("compile (this host)", f"{report['compile_seconds'] / 60:.1f} min, peak RSS "
                                            f"{report['host_peak_rss_bytes'] / GIB:.1f} GiB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def write_report(workdir: str, report: dict) -> str:
    path = os.path.join(workdir, REPORT_NAME)
    files.write_json(path, report)
    return path


# XLA:TPU's two ways of saying a program does not fit (libtpu 0.0.42).
_HBM_EXCEEDED = (
    re.compile(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm"),
    re.compile(r"required for [\w ]+\(([\d.]+)([KMGT]?)\) exceeds available HBM"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
REFUSAL_MESSAGE_CHARS = 6000  # of XLA's message kept in a refused program's report


def hbm_exceeded(error: Exception) -> Optional[int]:
    """Bytes XLA:TPU says a program needs when its compile ran out of HBM, else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    for pattern in _HBM_EXCEEDED:
        match = pattern.search(text)
        if match:
            return int(float(match.group(1)) * _UNITS[match.group(2)])
    return None


def refusal_message(error: Exception) -> str:
    """XLA:TPU's out-of-HBM message, cut to its head: it names the largest buffers (shape,
    the op that made it, its share of HBM), which is where to look for a wrong sharding."""
    text = str(error)
    return text[:REFUSAL_MESSAGE_CHARS] + (" [...]" if len(text) > REFUSAL_MESSAGE_CHARS else "")


# The keys that name a report's program and target, the same at every batch.
TARGET_KEYS = ("topology", "num_slices", "device_kind", "num_devices", "mesh", "device_memory_bytes",
               "hbm_headroom", "chip")


def within_budget(peak: int, hbm: int) -> bool:
    """Whether a per-chip peak fits a chip of ``hbm`` bytes, ``HBM_HEADROOM`` kept free."""
    return peak <= (1 - HBM_HEADROOM) * hbm


def memory_only_report(target: dict, batch: int, peak: int, refused: bool, note: str, **extra) -> dict:
    """The report of a program whose per-chip peak alone is known (XLA:TPU refused it, or
    a memory probe): ``target`` holds ``TARGET_KEYS``; the cost figures are None."""
    per_device = dict.fromkeys(("arguments", "outputs", "temp", "generated_code"))
    return {
        **target, "global_batch_size": int(batch), "per_device_bytes": dict(per_device, peak=int(peak)),
        "fits": not refused and within_budget(peak, target["device_memory_bytes"]),
        "flops_per_step": None, "bytes_accessed_per_step": None, "estimated_step_seconds": None,
        "estimated_mfu": None, "tpu_attention_kernels": None, "note": note, **extra,
    }


def _does_not_fit_report(needed: int, devices: list, config: Any, topology: str, num_slices: int,
                         batch: int, **extra) -> dict:
    """The report of a program XLA:TPU refused for memory: only the peak is known."""
    from consist_jax.training import sharding

    mesh = sharding.mesh_from_config(config.mesh, devices)
    kind = devices[0].device_kind
    target = {
        "topology": topology, "num_slices": num_slices, "device_kind": kind, "num_devices": len(devices),
        "mesh": {str(a): int(s) for a, s in mesh.shape.items()},
        "device_memory_bytes": int(TPU_CHIPS[kind].hbm_gib * GIB), "hbm_headroom": HBM_HEADROOM,
        "chip": TPU_CHIPS[kind]._asdict(),
    }
    return memory_only_report(target, batch, needed, True, "XLA:TPU refused the program: out of HBM", **extra)


def host_cost(started: float) -> dict:
    """What a compile begun at ``started`` (``time.perf_counter()``) cost this host so far."""
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"compile_seconds": round(time.perf_counter() - started, 1), "host_peak_rss_bytes": int(rss)}


def train_report(config: Any, topology: str, num_slices: int = 1,
                 global_batch_size: Optional[int] = None) -> dict:
    """Compiles ``config``'s train step for a topology and reports on it. A step XLA:TPU
    refuses for lack of HBM is reported (``fits: false``), any other failure raised."""
    devices = tpu_devices(topology, num_slices)
    batch = int(global_batch_size or config.train.global_batch_size)
    started = time.perf_counter()
    try:
        compiled, mesh = compile_train_step(config, devices, batch)
    except Exception as error:  # XlaRuntimeError; its type moves between jax versions
        needed = hbm_exceeded(error)
        if needed is None:
            raise
        return _does_not_fit_report(needed, devices, config, topology, num_slices, batch, program="train_step",
                                    xla_message=refusal_message(error), **host_cost(started))
    return make_report(compiled, mesh, topology, num_slices, batch, program="train_step", **host_cost(started))


def batch_unit(config: Any, topology: str, num_slices: int = 1) -> int:
    """The step of global batch sizes the trainer accepts on this topology: one example per
    data-parallel device per accumulation step."""
    from consist_jax.training import sharding

    mesh = sharding.mesh_from_config(config.mesh, tpu_devices(topology, num_slices))
    return sharding.data_parallel_size(mesh) * int(config.optim.grad_accum_steps)


def largest_fitting_batch(config: Any, topology: str, num_slices: int = 1, limit: int = 2**16,
                          known: Sequence[dict] = (), on_probe: Optional[Callable[[dict], None]] = None,
                          report_for: Optional[Callable[[int], dict]] = None,
                          start: Optional[int] = None) -> int:
    """The largest global batch (a multiple of the data-parallel devices) whose train step
    fits; 0 when none does. Each probe is one compile (``search_largest``: 3-5 of them
    where memory grows about linearly with the batch). known: reports already made
    (``train_report``) of this config and topology, reused where the search probes their
    batch; on_probe(report) sees each new probe's report (to keep them); report_for(batch):
    how a probe is made (default: ``train_report``, a full compile; ``memory_probe``'s
    ``calibrated_reports`` stops after XLA's buffer assignment); start: the first batch
    probed (default: the config's)."""
    unit = batch_unit(config, topology, num_slices)
    made = {int(r["global_batch_size"]): r for r in known}
    if report_for is None:
        def report_for(batch: int) -> dict:
            return train_report(config, topology, num_slices, batch)

    def probe(multiple: int) -> tuple[bool, int, float]:
        report = made.get(multiple * unit)
        if report is None:
            report = made[multiple * unit] = report_for(multiple * unit)
            if on_probe is not None:
                on_probe(report)
        budget = report["device_memory_bytes"] * (1 - report["hbm_headroom"])
        return report["fits"], report["per_device_bytes"]["peak"], budget

    first = int(config.train.global_batch_size) if start is None else start
    return search_largest(probe, max(1, first // unit), limit // unit) * unit


def search_largest(probe: Callable[[int], tuple[bool, int, float]], start: int, most: int) -> int:
    """The largest m in [0, most] for which ``probe(m)`` fits (0 if none), for a fit that
    holds below some m and fails above it.

    probe(m) -> (fits, peak_bytes, budget_bytes); the peak of a probe that does not fit
    may be a lower bound only (what XLA:TPU said when it refused). Keeps the bracket
    [largest m that fits, smallest that does not]: doubling (halving) from the start, then
    probing where the line through the last two fitting probes meets the budget (memory is
    close to linear in the batch, so that is the answer, and its successor confirms it),
    bisecting while fewer than two probes fit or when the line stops halving the bracket.
    """
    low, high = 0, most + 1  # fits(0) trivially; most + 1 is taken not to fit
    fitting: list[tuple[int, int]] = []  # (m, exact peak)
    widths: list[int] = []  # the bracket after each probe that found an upper bound
    guess = min(max(1, start), most)
    while True:
        fits, peak, budget = probe(guess)
        if fits:
            low = guess
            fitting.append((guess, peak))
        else:
            high = guess
        if high - low <= 1:
            return low
        if high <= most:
            widths.append(high - low)
        guess = min(max(_next_guess(fitting, budget, low, high, widths), low + 1), high - 1)


def _next_guess(fitting, budget, low, high, widths) -> int:
    """Doubling until a probe fails, bisecting while fewer than two probes fit or when the
    bracket has not halved over the last two probes, else the secant on the fitting peaks:
    through the last and the nearest earlier one below it (near the chip's limit XLA
    rematerialises to fit, so a larger batch can need less; v4-8's SD-1.5 step: 28.71 GiB
    at 160 images, 28.42 at 164)."""
    stalled = len(widths) >= 3 and 2 * widths[-1] > widths[-3]
    if len(fitting) >= 2 and not stalled:
        m2, p2 = fitting[-1]
        for m1, p1 in reversed(fitting[:-1]):
            if p1 < p2:
                return m2 + math.floor((budget - p2) / ((p2 - p1) / (m2 - m1)) + 1e-9)
    return (low + high) // 2 if widths else 2 * low


def run(config: Any, workdir: str, topology: str, num_slices: int = 1) -> dict:
    """train.py --compile_topology: compile, write and print the report."""
    report = train_report(config, topology, num_slices)
    path = write_report(workdir, report)
    print(format_table(report))
    print(f"wrote {path}")
    return report


def compile_sampler(config: Any, device: Any, num_frames: int, steps: Optional[int] = None):
    """Compiles the two-stage sampler (reference pass + the whole guided loop over the
    temporal windows + VAE decode) of ``config`` for one ``device`` -> (compiled, mesh)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from consist_jax.diffusion.kinds import sampler_name, schedule_from_config
    from consist_jax.models.scd import TextContext
    from consist_jax.sampling.pipeline import SCDPipeline

    model, params, frozen = abstract_model(config.model)
    resolution = tuple(config.data.pipeline.resolution)
    sample = config.sample
    schedule = schedule_from_config(config.diffusion)
    pipe = SCDPipeline(model, params, frozen, schedule, config.diffusion.prediction_type, resolution,
                       config.train.reference_timestep)
    generate = pipe._compiled(num_frames, int(steps or sample.steps), sampler_name(schedule, sample.sampler),
                              sample.get("timestep_spacing") or None, float(sample.guidance_rescale),
                              int(sample.window), int(sample.overlap), False)
    h, w = resolution
    unet = model.unet.config
    with_pose = unet.pose_block_out_channels is not None and unet.reference_pose_injection
    image = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    caption = None  # a caption-conditioned model samples with its caption and zeros as the negative
    if isinstance(model.context, TextContext):
        caption = jax.ShapeDtypeStruct((1, caption_length(config.data.pipeline), model.context.dim), jnp.float32)
    args = (params, frozen, jax.ShapeDtypeStruct((), jnp.float32), image, image if with_pose else None,
            jax.ShapeDtypeStruct((1, num_frames, h, w, 3), jnp.float32),
            jax.eval_shape(lambda: jax.random.key(0)), caption, None)
    mesh = Mesh(np.asarray([device]), ("data",))
    on_device = NamedSharding(mesh, PartitionSpec())
    args = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device), args)
    with jax.set_mesh(mesh):
        return generate.lower(*args).compile(), mesh


# XLA's cost analysis counts a while loop's body once, whatever its trip count.
SAMPLER_COST_COUNTS = ("flops, bytes and the roofline count the denoising loop's body once: the reference "
                       "pass, one guided step of one window and the decode, not every step")


def sample_report(config: Any, topology: str, num_frames: int, steps: Optional[int] = None) -> dict:
    """The sampler of ``config`` for ``num_frames`` frames on one chip of ``topology``."""
    device = tpu_devices(topology)[0]
    started = time.perf_counter()
    compiled, mesh = compile_sampler(config, device, num_frames, steps)
    return make_report(compiled, mesh, topology, 1, 1, program="sampler", frames=num_frames,
                       steps=int(steps or config.sample.steps), window=int(config.sample.window),
                       cost_counts=SAMPLER_COST_COUNTS, **host_cost(started))
