"""Defaults shared by every run config; each config file overrides what differs.

The defaults of the sections read into dataclasses (model.unet's SCD options,
model.motion, train, optim) are those dataclasses' own, written once there.

Also the command-line side of configs: `parse_flags_with_usage` is what the CLIs hand
to `app.run`, so a mistyped `--config.a.b=...` override is one line naming the key and
its nearest valid siblings (ml_collections raises a bare AttributeError from deep inside
absl's flag parsing), before anything is built or compiled.
"""
import dataclasses
import difflib
import re
import sys
from typing import Mapping, Sequence

import ml_collections
from absl import flags

from consist_jax.data.pipeline import default_config as pipeline_defaults
from consist_jax.factory import scd_option_defaults, wan_option_defaults
from consist_jax.models.motion import MotionConfig
from consist_jax.training.state import OptimizerConfig
from consist_jax.training.step import LossConfig


def _defaults(cls, **changes) -> dict:
    """A dataclass's default field values as a config section (``changes`` replace some)."""
    return {**{f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}, **changes}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.resume = True  # continue from the workdir's latest checkpoint when there is one

    c.data = ml_collections.ConfigDict()
    c.data.synthetic = None  # a dict of SyntheticConfig fields + generate=True to build on first use
    # Every key of the grain pipeline (so each can be overridden from the command line),
    # the captions of a text-conditioned model (model.context.kind "text") included:
    # text_embeddings_dir, captions, default_caption (data/pipeline.py, docs/wan.md).
    c.data.pipeline = pipeline_defaults()
    c.data.pipeline.update(
        dict(
            data_dir="",
            clip_length=1,  # F target frames; 1 for the image stage
            frame_stride=1,
            reference_policy="any",
            resolution=(512, 512),
            crop_scale=(0.8, 1.0),
            center_crop=False,
            flip_probability=0.5,
            with_region_mask=False,
            worker_count=0,
            on_bad_example="error",
        )
    )

    c.model = ml_collections.ConfigDict()
    # "unet" (SD-1.x UNet, model.unet) or "wan" (the Wan DiT, model.wan: WanTransformerConfig
    # fields plus SCD's options, consist_jax/factory.py; pretrained_transformer: a diffusers
    # WanTransformer3DModel folder, "" for a fresh DiT).
    c.model.backbone = "unet"
    c.model.wan = ml_collections.ConfigDict(wan_option_defaults())
    # The DiT's sequence axis (docs/wan.md, "Scale"): a mesh axis each clip's tokens are split
    # over, e.g. --config.mesh.axes='("data","fsdp","sequence")' --config.mesh.shape='(1,-1,2)'
    # --config.model.wan.sequence_axis=sequence. None: a clip's tokens stay on one device. A
    # typed placeholder, so the command line can set it.
    c.model.wan.sequence_axis = ml_collections.config_dict.placeholder(str)
    c.model.pretrained_transformer = ""
    c.model.pretrained_unet = ""
    # One SD-1.x .safetensors file in the original LDM layout (instead of pretrained_unet): its
    # UNet, and its VAE when codec.kind="vae" has no vae_path. pretrained_single_file_config: a
    # diffusers folder whose unet/ and vae/ config.json give the architecture ("": SD-1.5's).
    c.model.pretrained_single_file = ""
    c.model.pretrained_single_file_config = ""
    # SCD's UNet options (UNetConfig's defaults); a fresh UNet takes its architecture here too.
    c.model.unet = ml_collections.ConfigDict(scd_option_defaults())
    # The video model (configs/sd15_video.py): AnimateDiff motion modules on the target frames.
    # frames_axis: a mesh axis the frames are split over, e.g. "frames" with mesh axes
    # ("data", "fsdp", "frames"), or several joined by commas ("clips,frames"); None keeps
    # each clip's frames on one device. A typed placeholder, so the command line can set it.
    c.model.motion = ml_collections.ConfigDict(
        _defaults(MotionConfig, enabled=False, frames_axis=ml_collections.config_dict.placeholder(str))
    )
    c.model.motion_adapter = ""  # AnimateDiff motion modules to start from (folder or .safetensors)
    c.model.init_from = ""  # a train.py workdir whose params start this run (image stage -> video stage)
    c.model.codec = ml_collections.ConfigDict(dict(kind="vae", vae_path="", factor=8, chunk_size=8))
    # kind: "embedding" | "hidden_states" (a CLIP image encoder at image_encoder_path), "none",
    # or "text" (precomputed caption embeddings in the batch: data.pipeline.text_embeddings_dir).
    c.model.context = ml_collections.ConfigDict(dict(kind="embedding", image_encoder_path=""))

    # kind "ddpm" (the beta_* keys) or "flow" (rectified flow as Wan: flow_shift, and the
    # training timestep density flow_density "uniform" | "logit_normal" with flow_logit_mean /
    # _std; prediction_type "flow_prediction"), consist_jax/diffusion/kinds.py.
    c.diffusion = ml_collections.ConfigDict(
        dict(
            kind="ddpm",
            flow_shift=3.0,
            flow_density="uniform",
            flow_logit_mean=0.0,
            flow_logit_std=1.0,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            num_train_timesteps=1000,
            rescale_zero_terminal_snr=False,
            prediction_type="epsilon",
        )
    )

    # The loss's options (LossConfig; its prediction_type is diffusion.prediction_type).
    loss = _defaults(LossConfig)
    del loss["prediction_type"]
    c.train = ml_collections.ConfigDict(dict(global_batch_size=64, num_steps=30_000, **loss))

    c.optim = ml_collections.ConfigDict(_defaults(OptimizerConfig))  # fields: training/state.py

    # shape: within a slice (ICI); dcn_shape: slices per axis (DCN), e.g. (2, 1) for data
    # parallelism over 2 slices; param_rules: ordered (path regex, spec) pairs, e.g.
    # ((r"motion_modules", "fsdp"), (r".*", "replicated")); empty: param_sharding for all.
    # cpu_devices: on a CPU-only host, train.py splits it into this many XLA devices, so
    # the batch is split over the cores (data parallel); 0 keeps one device (training/sharding.py).
    # flat_gradients: each data shard's gradients averaged as one flat vector, one all-reduce
    # a step instead of one per parameter (parallel/gradients.py; replicated parameters only).
    c.mesh = ml_collections.ConfigDict(
        dict(axes=("data", "fsdp"), shape=(-1, 1), dcn_shape=(1, 1), param_sharding="fsdp",
             fsdp_min_size=2**14, param_rules=(), cpu_devices=0, flat_gradients=False)
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, async_save=True))
    # profile_steps: 0-based steps traced with jax.profiler into {workdir}/tensorboard, e.g. (10, 12)
    c.log = ml_collections.ConfigDict(dict(every_steps=50, peak_tflops_per_device=0.0, profile_steps=()))

    c.sample = ml_collections.ConfigDict(
        dict(sampler="", steps=25, guidance=3.5, guidance_rescale=0.0, timestep_spacing="",
             window=24, overlap=4, use_ema=True)
    )
    return c


# ----------------------------------------------------------------------------- command-line overrides


class ConfigOverrideError(flags.Error):
    """A ``--config.a.b=value`` override that names no field of the config (or no config file)."""


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS,
                name: str = "config") -> list[str]:
    """``flag_values(argv)``, after checking every ``--{name}.path`` override against the
    config file: an unknown key, a path through a value, or an unreadable file raises
    ConfigOverrideError (one line). Values that do not parse as their field's type are left
    to ml_collections, which already reports them as one-line flag errors.

    Override paths are dotted keys (``optim.lr``); ml_collections would also walk Python
    attributes (``optim.lr.real``) and so misreport them, hence the check comes first.
    """
    expanded = flag_values.read_flags_from_files(list(argv), force_gnu=False)  # --flagfile
    config_file = _config_file_argument(expanded, name)
    paths = _override_paths(expanded, name)
    if config_file is not None and paths:
        try:
            config = flag_values[name].parser.parse(config_file)
        except (TypeError, ValueError):  # a broken config file: the parse below reports it
            config = None
        if config is not None:
            _check_override_paths(_check_loaded(config, config_file, name), paths, name)
    args = flag_values(argv)
    flag = flag_values[name]
    if flag.value is not None:
        _check_loaded(flag.value, flag.config_filename, name)
    return args


def parse_flags_with_usage(argv: Sequence[str]) -> list[str]:
    """``app.run(main, flags_parser=parse_flags_with_usage)``: absl's own report and exit
    status for any flag error, config overrides included."""
    try:
        return parse_flags(argv)
    except flags.Error as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\n"
                         "Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def check_override_path(config, path: str, name: str = "config") -> None:
    """Raises ConfigOverrideError unless ``path`` ("optim.lr") names a field of ``config``.

    Walks mappings only (attributes such as ``keys`` or ``real`` are not fields); the
    message names the first unknown key and its closest siblings.
    """
    node, walked = config, name
    for key in path.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)):
            value = repr(node) if len(repr(node)) <= 40 else repr(node)[:37] + "..."
            raise ConfigOverrideError(
                f"--{name}.{path}: {walked} = {value} ({type(node).__name__}) is not "
                f"a group of keys, so it has no key {key!r}")
        if key not in node:
            keys = sorted(str(k) for k in node.keys())
            nearest = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            listed = (f"nearest valid keys: {', '.join(nearest)}" if nearest else
                      f"valid keys: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
            raise ConfigOverrideError(f"--{name}.{path}: {walked} has no key {key!r}; {listed}")
        node, walked = node[key], f"{walked}.{key}"


def _check_override_paths(config, paths: Sequence[str], name: str) -> None:
    for path in paths:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", path):
            raise ConfigOverrideError(f"--{name}.{path}: not a dotted path of config keys "
                                      f"(like --{name}.optim.lr=1e-4)")
        check_override_path(config, path, name)


def _check_loaded(config, config_file: str, name: str):
    """``config``, or ConfigOverrideError if ``config_file`` could not be read (ml_collections
    defers that OSError, with a multi-line message, to the first access of the config)."""
    try:
        config.keys()
    except OSError as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise ConfigOverrideError(f"--{name}={config_file}: cannot read the config file "
                                  f"({reason})") from None
    return config


def _config_file_argument(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--{name}=FILE`` or ``--{name} FILE`` in argv (the last one given)."""
    found = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
        if match:
            found = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _override_paths(argv: Sequence[str], name: str) -> list[str]:
    """``--{name}.a.b=1`` / ``--no{name}.a.b`` / ``-{name}.a.b 1`` -> ["a.b", ...], in order."""
    prefix = re.compile(rf"--?(no)?{re.escape(name)}\.")
    return [prefix.sub("", arg, count=1).split("=", 1)[0] for arg in argv if prefix.match(arg)]
