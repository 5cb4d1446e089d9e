"""The SCD training loss and the pure train step.

Loss (docs/method.md, "Training"): noise the target latents only; the reference
latent stays clean and runs at its own timestep; the UNet predicts the noise (or v,
or x0) of the targets, and the mean squared error is taken over target tokens only,
optionally min-SNR weighted. The schedule is either kind (diffusion/kinds.py): DDPM,
or rectified flow (x_t = (1 - sigma) x0 + sigma eps, target eps - x0, the model at
timestep sigma * 1000, as Wan); the loss calls only their shared ``TrainingSchedule``
methods. For classifier-free guidance the reference branch
and the context are dropped per example. Try-on mode noises and scores only the
region mask: ``x_t = M x_t + (1 - M) x_0`` and ``||M (target - pred)||^2``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh

from consist_jax.diffusion.kinds import TrainingSchedule
from consist_jax.diffusion.schedule import sample_training_noise
from consist_jax.models.scd import SCDModel, TextContext
from consist_jax.parallel.gradients import flat_mean_value_and_grad
from consist_jax.training.state import (OptimizerConfig, TrainState, learning_rate_schedule, trainable_labels,
                                        update_ema)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the SCD loss is formed (static; from ``config.train`` and
    ``config.diffusion.prediction_type``; these defaults are every run config's, see
    configs/common.py)."""

    prediction_type: str = "epsilon"
    reference_timestep: int = 0  # the model timestep of the clean reference (flow: sigma 0 is 0 too)
    drop_reference_prob: float = 0.1  # classifier-free guidance: reference branch dropped
    drop_context_prob: float = 0.1  # ... and the image-encoder context (same draw: nested)
    min_snr_gamma: float = 0.0  # 0 = plain MSE
    noise_offset: float = 0.0
    tryon: bool = False  # noise and loss only inside batch["region_mask"]
    # The person's latent cells (batch["target_mask"]) count this many times in the loss: a
    # small model spends its capacity on the figure rather than the easier background.
    figure_loss_weight: float = 1.0

    @classmethod
    def from_config(cls, train) -> "LossConfig":
        return cls(**{f.name: train[f.name] for f in dataclasses.fields(cls) if f.name in train})

    @property
    def reads_figure_mask(self) -> bool:
        """Whether the loss needs the batch's ``target_mask`` (the data pipeline always makes
        it; the trainer ships it to the devices only then)."""
        return self.figure_loss_weight != 1.0


def region_mask_at(mask: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """(B, F, H, W, 1) pixel mask -> (B, F, h, w, 1) latent mask: a latent cell is in the
    region when any of its pixels is (so no masked pixel is left un-noised)."""
    b, f, h, w, _ = mask.shape
    lh, lw = latent_hw
    cells = mask.reshape(b, f, lh, h // lh, lw, w // lw, 1)
    return cells.max(axis=(3, 5)).astype(jnp.float32)


def conditioning_masks(u: jax.Array, loss: LossConfig):
    """Per-example CFG drops from one uniform draw u (B,): (keep_reference, keep_context).

    With equal probabilities the two are dropped together, as the peers train; with
    different ones the rarer drop is a subset of the other.
    """
    return u >= loss.drop_reference_prob, u >= loss.drop_context_prob


def per_example_draws(rng: jax.Array, example_ids: jax.Array, example_shape, loss: LossConfig,
                      schedule: TrainingSchedule):
    """Noise (B, *example_shape), training timesteps (B,) (the schedule's units) and a CFG
    uniform (B,), one key per example.

    Each example's draws depend only on (rng, its id), not on where it sits in the
    batch: a batch split over hosts, devices or accumulation micro-batches trains the
    same as the whole batch on one device.
    """

    def draw(example_id):
        key = jax.random.fold_in(rng, example_id)
        noise_key, t_key, u_key = jax.random.split(key, 3)
        noise = sample_training_noise(noise_key, (1, *example_shape), loss.noise_offset)[0]
        t = schedule.sample_training_timesteps(t_key)
        return noise, t, jax.random.uniform(u_key, ())

    return jax.vmap(draw)(example_ids)


def scd_loss(
    params: Any,
    model: SCDModel,
    schedule: TrainingSchedule,
    loss: LossConfig,
    inputs: dict,
    rng: jax.Array,
) -> tuple[jax.Array, dict]:
    """The SCD loss of one batch in latent space.

    inputs: ``reference_latents`` (B, h, w, C), ``target_latents`` (B, F, h, w, C) (F latent
      frames), ``context`` (B, L, D), ``reference_pose`` (B, H, W, 3 t), ``target_pose``
      (B, F, H, W, 3 t) (on the latent time grid, t = 1 but for Wan's VAE), in try-on
      mode ``region_mask`` (B, F, h, w, 1) in latent cells, with ``figure_loss_weight`` != 1
      ``target_mask`` (B, F, h, w, 1) (the person's latent cells), and optionally
      ``example_id`` (B,) int32 keying each example's random draws (default: its row).
    Returns (scalar loss, per-example loss (B,)).
    """
    targets = inputs["target_latents"]
    b = targets.shape[0]
    example_ids = inputs.get("example_id", jnp.arange(b, dtype=jnp.int32))
    noise, t, u = per_example_draws(rng, example_ids, targets.shape[1:], loss, schedule)
    noisy = schedule.add_noise(targets, noise, t)
    region = inputs.get("region_mask") if loss.tryon else None
    if region is not None:
        noisy = region * noisy + (1.0 - region) * targets
    target = schedule.training_target(targets, noise, t, loss.prediction_type)
    keep_reference, keep_context = conditioning_masks(u, loss)
    context = jnp.where(keep_context[:, None, None], inputs["context"], 0.0)
    model_t = schedule.model_timesteps(t)
    prediction = model.unet.apply(
        {"params": params},
        noisy,
        model_t,
        context,
        reference=inputs["reference_latents"],
        reference_timesteps=jnp.full((b,), loss.reference_timestep, model_t.dtype),
        reference_pose=inputs.get("reference_pose"),
        target_pose=inputs.get("target_pose"),
        reference_mask=keep_reference,
    )
    squared = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    axes = tuple(range(1, squared.ndim))
    weight = loss_weights(inputs, region, loss)
    if weight is not None:
        weight = jnp.broadcast_to(weight, squared.shape)
        per_example = (weight * squared).sum(axes) / jnp.maximum(weight.sum(axes), 1.0)
    else:
        per_example = squared.mean(axes)
    if loss.min_snr_gamma:
        per_example = per_example * schedule.min_snr_loss_weights(t, loss.min_snr_gamma, loss.prediction_type)
    return per_example.mean(), per_example


def loss_weights(inputs: dict, region: Optional[jax.Array], loss: LossConfig) -> Optional[jax.Array]:
    """Each latent cell's weight in the loss, (B, F, h, w, 1), or None for a plain mean: the
    try-on region only (``region``), the person's cells ``figure_loss_weight`` times the
    rest's (``inputs["target_mask"]``), or both."""
    weight = region
    if loss.reads_figure_mask:
        if "target_mask" not in inputs:
            raise ValueError(f"train.figure_loss_weight={loss.figure_loss_weight} needs the batch's target_mask "
                             "(the person's mask; a pre-encoded batch must carry it on the latent grid)")
        figure = 1.0 + (loss.figure_loss_weight - 1.0) * inputs["target_mask"]
        weight = figure if weight is None else weight * figure
    return weight


def prepare_inputs(model: SCDModel, frozen: Any, batch: dict, rng: jax.Array) -> dict:
    """Pixel batch -> latent-space loss inputs (no gradients flow into frozen models). Poses
    and the region mask go onto the latents' time grid (``SCDModel.on_latent_time``: a
    codec compressing time stacks each latent frame's pixel frames; else unchanged).

    A batch that already carries ``target_latents`` / ``reference_latents`` / ``context``
    (a cached pre-pass) is used as is (its poses on the latent time grid).
    """
    if "target_latents" in batch:
        return batch
    ref_rng, tgt_rng = jax.random.split(rng)
    text = isinstance(model.context, TextContext)  # a caption embedding the batch carries
    inputs = {
        "reference_latents": model.encode(frozen, batch["reference"], ref_rng),
        "target_latents": model.encode(frozen, batch["target"], tgt_rng),
        "context": model.context.from_batch(batch) if text else model.embed_reference(frozen, batch["reference"]),
        "reference_pose": batch.get("reference_pose"),
        "target_pose": batch.get("target_pose"),
    }
    for name in ("reference_pose", "target_pose"):
        inputs[name] = model.on_latent_time(inputs[name])
    if "example_id" in batch:
        inputs["example_id"] = batch["example_id"]
    for name in ("region_mask", "target_mask"):  # a latent frame is in the region where any of its frames is
        if name in batch:
            mask = model.on_latent_time(batch[name]).max(axis=-1, keepdims=True)
            inputs[name] = region_mask_at(mask, inputs["target_latents"].shape[2:4])
    return inputs


def _microbatches(tree: Any, k: int) -> Any:
    """Splits every (B, ...) leaf into (k, B / k, ...) for gradient accumulation."""
    return jax.tree_util.tree_map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), tree)


def make_train_step(
    model: SCDModel,
    schedule: TrainingSchedule,
    loss: LossConfig,
    optimizer: optax.GradientTransformation,
    optim: OptimizerConfig,
    flat_gradients_over: Optional[tuple[Mesh, Sequence[str]]] = None,
) -> Callable:
    """Returns ``train_step(state, batch, rng, frozen) -> (state, metrics)``; pure, jittable.

    ``optim.grad_accum_steps`` = k splits the batch into k micro-batches whose
    gradients are averaged before one optimiser update. ``optim.ema_decay`` updates
    the EMA params when the state has them. ``flat_gradients_over`` = (mesh, data axes):
    each data shard computes its own examples' gradients, averaged over the shards as one
    flat vector (parallel/gradients.py; the params must be replicated; one all-reduce a
    micro-batch); None leaves the reduction to XLA's partitioner (one per parameter).
    """
    k = int(optim.grad_accum_steps)
    lr_at = learning_rate_schedule(optim)

    def split_trainable(params) -> tuple[dict, dict]:
        """({path: leaf} trained, {path: leaf} frozen), by ``optim.trainable``."""
        flat = traverse_util.flatten_dict(params)
        labels = traverse_util.flatten_dict(trainable_labels(params, optim.trainable))
        return ({p: v for p, v in flat.items() if labels[p] == "trainable"},
                {p: v for p, v in flat.items() if labels[p] == "frozen"})

    def grads_of(params, inputs, rng):
        """Loss and the trained leaves' gradients ({path: gradient}); frozen leaves are not differentiated."""
        trainable, frozen_leaves = split_trainable(params)

        def loss_of(trainable):
            merged = traverse_util.unflatten_dict({**frozen_leaves, **trainable})
            return scd_loss(merged, model, schedule, loss, inputs, rng)

        (value, _), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        return value, grads

    if flat_gradients_over is not None:  # the same, each data shard on its own examples
        grads_of = flat_mean_value_and_grad(grads_of, *flat_gradients_over)

    def mean_grads(params, inputs, rng):
        """Loss and gradients averaged over the k micro-batches of ``inputs``."""
        if k == 1:
            return grads_of(params, inputs, rng)

        def accumulate(carry, xs):
            micro, micro_rng = xs
            return jax.tree_util.tree_map(jnp.add, carry, grads_of(params, micro, micro_rng)), None

        zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, split_trainable(params)[0]))
        total, _ = jax.lax.scan(accumulate, zeros, (_microbatches(inputs, k), jnp.broadcast_to(rng, (k,))))
        return jax.tree_util.tree_map(lambda a: a / k, total)

    def train_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any):
        prep_rng, loss_rng = jax.random.split(rng)
        inputs = {k_: v for k_, v in prepare_inputs(model, frozen, batch, prep_rng).items() if v is not None}
        if "example_id" not in inputs:  # each example's draws as in the whole batch, however it is split
            inputs = dict(inputs, example_id=jnp.arange(inputs["target_latents"].shape[0], dtype=jnp.int32))
        value, trained = mean_grads(state.params, inputs, loss_rng)
        zeros = {p: jnp.zeros_like(v) for p, v in split_trainable(state.params)[1].items()}
        grads = traverse_util.unflatten_dict({**zeros, **trained})
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=update_ema(state.ema_params, params, optim.ema_decay),
        )
        metrics = {"loss": value, "grad_norm": optax.global_norm(grads), "lr": lr_at(state.step)}
        return new_state, metrics

    return train_step
