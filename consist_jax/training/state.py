"""Train state, optimiser (AdamW, warmup, clipping, trainable-parameter selection) and EMA."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util


@struct.dataclass
class TrainState:
    """Everything a training step updates; a pytree (checkpointed as a whole).

    step: () int32, optimiser updates done.
    params: the trainable model's parameters (the UNet with its pose encoder and,
      in the video stage, motion modules); frozen parts get zero updates.
    opt_state: optax state (only trainable leaves carry moments).
    ema_params: exponential moving average of params, or None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """How the trainable parameters are updated (from ``config.optim``; these defaults
    are every run config's, see configs/common.py). Ranges: training/validate.py."""

    lr: float = 1e-5
    warmup_steps: int = 500  # linear warmup from 0
    schedule: str = "constant"  # or "cosine" (to decay_steps)
    decay_steps: int = 30_000
    final_lr_fraction: float = 0.0  # cosine: the last learning rate, as a fraction of lr
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip_norm: float = 1.0  # global-norm clipping; 0: none
    grad_accum_steps: int = 1  # micro-batches whose gradients make one update
    ema_decay: float = 0.0  # > 0 keeps an EMA of the params
    trainable: tuple[str, ...] = (".*",)  # regexes over param paths ("down_blocks.0/resnets.1/conv1/kernel")

    @classmethod
    def from_config(cls, optim) -> "OptimizerConfig":
        """From the run config's ``optim`` section (missing keys: the defaults above)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(optim) - fields)
        if unknown:
            raise ValueError(f"config.optim has unknown key(s) {unknown}; expected some of {sorted(fields)}")
        values = dict(optim)
        if "trainable" in values:
            values["trainable"] = tuple(values["trainable"])
        return cls(**values)


def learning_rate_schedule(optim: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``optim.lr`` over ``warmup_steps``, then constant or cosine decay."""
    warmup = max(int(optim.warmup_steps), 0)
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        decay_steps = max(int(optim.decay_steps) - warmup, 1)
        after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.final_lr_fraction)
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r}: expected 'constant' or 'cosine'")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def param_path(path: Sequence[str]) -> str:
    """A parameter's path as matched by ``optim.trainable`` patterns: 'down_blocks.0/resnets.1/conv1/kernel'."""
    return "/".join(path)


def trainable_labels(params: Any, patterns: Sequence[str]) -> Any:
    """'trainable' / 'frozen' per leaf: a leaf trains when any regex in ``patterns`` matches its path."""
    compiled = [re.compile(p) for p in patterns]
    flat = traverse_util.flatten_dict(params)
    labels = {
        path: "trainable" if any(p.search(param_path(path)) for p in compiled) else "frozen"
        for path in flat
    }
    if "trainable" not in labels.values():
        raise ValueError(f"optim.trainable patterns {list(patterns)} match no parameter")
    return traverse_util.unflatten_dict(labels)


def make_optimizer(optim: OptimizerConfig, params: Any) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW on the trainable leaves; frozen leaves get zero updates."""
    adamw = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm else optax.identity(),
        optax.adamw(
            learning_rate_schedule(optim),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
        ),
    )
    labels = trainable_labels(params, optim.trainable)
    return optax.multi_transform({"trainable": adamw, "frozen": optax.set_to_zero()}, labels)


def create_train_state(params: Any, optimizer: optax.GradientTransformation, ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
    )


def update_ema(ema_params: Optional[Any], params: Any, decay: float) -> Optional[Any]:
    """ema <- decay * ema + (1 - decay) * params (None stays None)."""
    if ema_params is None:
        return None
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
