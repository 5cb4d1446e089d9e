"""Dumps every run config (configs/, tests/configs/) to the values a run would use: the
config tree itself and the dataclasses built from it at the edge (UNetConfig for a fresh
UNet, MotionConfig, LossConfig, OptimizerConfig, the noise schedule's tables).

A refactoring of how configs are read should leave this output unchanged:

    python scripts/effective_configs.py > before.json   # on the old commit
    python scripts/effective_configs.py > after.json
    diff before.json after.json
"""
import dataclasses
import glob
import hashlib
import importlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def config_modules() -> list[str]:
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
                   + glob.glob(os.path.join(REPO, "tests", "configs", "*.py")))
    modules = [os.path.relpath(p, REPO)[:-3].replace(os.sep, ".") for p in paths]
    return [m for m in modules if not m.endswith("__init__") and m != "configs.common"]


def plain(value):
    """JSON-comparable: tuples as lists, dtypes and other objects by name."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "name", None) or getattr(value, "__name__", None) or repr(value)


def effective(config) -> dict:
    import numpy as np

    from consist_jax import factory
    from consist_jax.diffusion.schedule import NoiseSchedule
    from consist_jax.models.motion import MotionConfig
    from consist_jax.training.state import OptimizerConfig
    from consist_jax.training.step import LossConfig

    model = config.model
    schedule = NoiseSchedule.from_config(config.diffusion)
    return {
        "tree": plain(config.to_dict()),
        "unet": None if model.pretrained_unet else plain(factory.unet_config_from(model.unet)),
        "motion": plain(MotionConfig(**factory.motion_options(model))) if factory.is_video_model(model) else None,
        "loss": plain(LossConfig.from_config(dict(config.train, prediction_type=config.diffusion.prediction_type))),
        "optim": plain(OptimizerConfig.from_config(config.optim)),
        "schedule": hashlib.sha256(np.asarray(schedule.alphas_cumprod).tobytes()).hexdigest()[:16],
    }


def main():
    dump = {}
    for name in config_modules():
        dump[name] = effective(importlib.import_module(name).get_config())
    json.dump(dump, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
