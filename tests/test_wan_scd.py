"""SCD on the Wan DiT (models/wan_scd.py): the causal rule in every layer, the full-rule
ablation, the reference's timestep and rotary position, the pose embedding, the train
step's loss, and two-stage cached sampling through the one denoiser."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import relative_error

from consist_jax.diffusion.samplers import make_sampler
from consist_jax.diffusion.schedule import NoiseSchedule
from consist_jax.models.scd import PixelCodec, SCDModel
from consist_jax.models.self_attention import CACHE_COLLECTION, AttentionConfig
from consist_jax.models.wan_scd import WanSCD, WanSCDConfig, init_wan_scd_params
from consist_jax.models.wan_transformer import WanAttention, WanTransformer, WanTransformerConfig
from consist_jax.sampling.two_stage import GuidanceConfig, denoise, extract_reference
from consist_jax.training.step import LossConfig, scd_loss

# A tiny T2V DiT: head dim 12 splits unevenly into frame/row/column rotary parts.
TRANSFORMER = WanTransformerConfig(num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3,
                                   text_dim=8, freq_dim=16, ffn_dim=24, num_layers=2)
POSE_CHANNELS = 3
B, F, H, W, TEXT = 2, 3, 4, 6, 5  # latents (B, F, H, W, 3) (PixelCodec(1)'s): 3 frames of 2 x 3 tokens
CAUSAL = WanSCDConfig(TRANSFORMER, pose_channels=POSE_CHANNELS)
FULL = dataclasses.replace(CAUSAL, attention=AttentionConfig(rule="full"))


@pytest.fixture(scope="module")
def params():
    """Random parameters, every one non-zero (the zero-initialised pose output included)."""
    shapes = jax.eval_shape(lambda: init_wan_scd_params(CAUSAL, jax.random.key(0)))
    draw = np.random.default_rng(0)  # numpy: no per-leaf dispatch of a jax draw
    return jax.tree_util.tree_map(lambda s: jnp.asarray(0.2 * draw.standard_normal(s.shape), jnp.float32), shapes)


def _inputs(rng):
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return dict(targets=normal(B, F, H, W, 3), t=jnp.asarray(rng.uniform(1, 999, B), jnp.float32),
                context=normal(B, TEXT, 8), reference=normal(B, H, W, 3),
                reference_pose=normal(B, H, W, POSE_CHANNELS), target_pose=normal(B, F, H, W, POSE_CHANNELS))


def _is_self_attention_projection(module, method_name):
    return isinstance(module, WanAttention) and module.name == "attn1" and method_name == "project"




def _joint_call(config, capture=False):
    """jit(params, inputs, reference_timesteps) -> the joint target prediction, and with
    ``capture`` every layer's reference (key, value) as the self-attention computed them."""
    model = WanSCD(config)

    @jax.jit
    def run(params, inputs, reference_timesteps=None):
        out, state = model.apply(
            {"params": params}, inputs["targets"], inputs["t"], inputs["context"], reference=inputs["reference"],
            reference_timesteps=reference_timesteps, reference_pose=inputs.get("reference_pose"),
            target_pose=inputs.get("target_pose"), mutable=["intermediates"],
            capture_intermediates=_is_self_attention_projection if capture else False)
        if not capture:
            return out
        # attn1.project runs on the reference stream first, then on the targets.
        layers = state["intermediates"]
        return out, {name: layers[name]["attn1"]["project"][0][1:] for name in layers}

    return run


@pytest.fixture(scope="module")
def reference_kv():
    """{rule: jitted joint call returning (prediction, {layer: reference (key, value)})}."""
    return {"causal": _joint_call(CAUSAL, capture=True), "full": _joint_call(FULL, capture=True)}


@pytest.fixture(scope="module")
def extract():
    """jit(params, reference, t_ref, context, reference_pose, config) -> (prediction, cache)."""

    @functools.partial(jax.jit, static_argnames="config")
    def run(params, reference, reference_timesteps, context, reference_pose, config=CAUSAL):
        out, cache = WanSCD(config).apply({"params": params}, reference, reference_timesteps, context,
                                          reference_pose, method="extract_reference", mutable=[CACHE_COLLECTION])
        return out, cache[CACHE_COLLECTION]

    return run


def _perturb_targets(rng, inputs):
    """The same reference, other targets: latents, timesteps and target poses."""
    other = _inputs(rng)
    return dict(inputs, targets=other["targets"], t=other["t"], target_pose=other["target_pose"])


def test_causal_reference_keys_values_ignore_the_targets(params, reference_kv, extract, rng):
    """Causal rule: perturbing the targets leaves every layer's reference key/value bit-identical,
    and they are the cache that stage 1 computes from the reference alone."""
    inputs = _inputs(rng)
    _, kv = reference_kv["causal"](params, inputs)
    _, kv_other = reference_kv["causal"](params, _perturb_targets(rng, inputs))
    assert sorted(kv) == [f"blocks.{i}" for i in range(TRANSFORMER.num_layers)]
    for layer in kv:
        for name, a, b in zip(("key", "value"), kv[layer], kv_other[layer]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{layer} {name}")
    _, cache = extract(params, inputs["reference"], None, inputs["context"], inputs["reference_pose"])
    for layer in kv:
        for name, joint in zip(("key", "value"), kv[layer]):
            # The same float32 operations on the same tokens in two programs: only XLA's
            # fusion choices may differ, a few roundings of O(1) values per layer (measured
            # ~2e-7); letting the targets in moves them ~5e-2.
            assert relative_error(cache[layer][name], joint) <= 1e-5, (layer, name)


def test_full_rule_reference_reads_the_targets(params, reference_kv, rng):
    """Full rule (ablation): from the second layer on, the reference's keys/values change with
    the targets (the first layer's are computed before any attention)."""
    inputs = _inputs(rng)
    _, kv = reference_kv["full"](params, inputs)
    _, kv_other = reference_kv["full"](params, _perturb_targets(rng, inputs))
    np.testing.assert_array_equal(np.asarray(kv["blocks.0"][0]), np.asarray(kv_other["blocks.0"][0]))
    for i in range(1, TRANSFORMER.num_layers):
        for a, b in zip(kv[f"blocks.{i}"], kv_other[f"blocks.{i}"]):
            assert relative_error(a, b) > 1e-3


def _wan_params(params):
    return {k: v for k, v in params.items() if k != "pose_patch_embedding"}


@pytest.fixture(scope="module")
def wan():
    return jax.jit(WanTransformer(TRANSFORMER).apply)


def test_full_rule_at_one_timestep_is_wan_on_the_clip_led_by_the_reference(params, reference_kv, wan, rng):
    """The reference's rotary frame position is 0 and the targets' 1 .. F: under the full rule,
    with the reference at the targets' timestep and no pose, the DiT is Wan over the clip
    [reference ; targets] (frames 0 .. F), prediction for frames 1 .. F."""
    inputs = {k: v for k, v in _inputs(rng).items() if "pose" not in k}
    ours, _ = reference_kv["full"](params, inputs, inputs["t"])
    clip = jnp.concatenate([inputs["reference"][:, None], inputs["targets"]], axis=1)
    theirs = wan({"params": _wan_params(params)}, clip, inputs["t"], inputs["context"])[:, 1:]
    # The same float32 operations, batched differently (the reference as its own stream):
    # reassociation of a few sums of O(1) terms (measured ~1.5e-7); a wrong position or
    # timestep moves it O(1).
    assert relative_error(ours, theirs) <= 1e-5


def test_reference_runs_at_its_own_timestep_and_frame_zero(params, extract, wan, rng):
    """Stage 1's reference prediction is Wan's on the one-frame clip at the reference's
    timestep (default 0; rotary frame 0), whatever the targets' timestep will be."""
    inputs = _inputs(rng)
    clip = inputs["reference"][:, None]
    for t_ref in (None, inputs["t"]):
        ours, _ = extract(params, inputs["reference"], t_ref, inputs["context"], None)
        t = jnp.zeros((B,)) if t_ref is None else t_ref
        theirs = wan({"params": _wan_params(params)}, clip, t, inputs["context"])[:, 0]
        assert relative_error(ours, theirs) <= 1e-5


def test_pose_embedding_starts_at_zero_and_reference_pose_ablation(params, extract, rng):
    """A fresh pose embedding adds nothing (a pretrained Wan starts unchanged); the reference
    pose reaches the reference's keys unless reference_pose_injection is off."""
    fresh = jax.jit(lambda: init_wan_scd_params(CAUSAL, jax.random.key(1))["pose_patch_embedding"])()
    assert not np.any(np.asarray(fresh["conv_out"]["kernel"])) and not np.any(np.asarray(fresh["conv_out"]["bias"]))
    inputs = _inputs(rng)
    off = dataclasses.replace(CAUSAL, reference_pose_injection=False)
    args = (params, inputs["reference"], None, inputs["context"])
    _, with_pose = extract(*args, inputs["reference_pose"])
    _, without_pose = extract(*args, None)
    assert relative_error(with_pose["blocks.0"]["key"], without_pose["blocks.0"]["key"]) > 1e-3
    _, ablated = extract(*args, inputs["reference_pose"], config=off)
    np.testing.assert_array_equal(np.asarray(ablated["blocks.0"]["key"]), np.asarray(without_pose["blocks.0"]["key"]))


@dataclasses.dataclass(frozen=True)
class TextContext:
    """Precomputed text embeddings (B, L, text_dim) carried in the frozen tree."""

    def embed(self, frozen, images):
        return frozen["text"]


MODEL = SCDModel(WanSCD(CAUSAL), PixelCodec(1), TextContext())


def test_train_step_loss_takes_the_dit(params, rng):
    """The pure train step's loss drives the DiT through the UNet's call: per-example losses
    over the target tokens, and the reference dropped for classifier-free guidance (a forward
    only: the gradient is jax's; compiling the backward would double this test)."""
    inputs = _inputs(rng)
    batch = {"reference_latents": inputs["reference"], "target_latents": inputs["targets"],
             "context": inputs["context"], "reference_pose": inputs["reference_pose"],
             "target_pose": inputs["target_pose"]}
    schedule = NoiseSchedule.create("linear", 1e-4, 2e-2)

    @jax.jit
    def per_example(params, batch, drop):
        return scd_loss(params, MODEL, schedule, LossConfig(drop_reference_prob=drop, drop_context_prob=drop),
                        batch, jax.random.key(0))[1]

    kept, dropped = per_example(params, batch, 0.0), per_example(params, batch, 1.0)
    assert kept.shape == (B,) and np.all(np.isfinite(np.asarray(kept)))
    assert np.all(np.abs(np.asarray(kept) - np.asarray(dropped)) > 0)


SAMPLER = make_sampler("ddim", NoiseSchedule.create("linear", 1e-4, 2e-2), 3, prediction_type="sample")
GUIDANCE = GuidanceConfig(scale=2.5)


def test_cached_sampling_equals_joint(params, rng):
    """A whole guided clip sampled through the one denoiser is the same with the reference's
    keys/values cached once or recomputed in every call; the clip runs in two overlapping
    windows (window-local rotary positions, one cache for both: the long-video path; the
    whole-clip path is the same model call without the windows' scan)."""
    window = 2
    inputs = _inputs(rng)
    image = jnp.tanh(inputs["reference"])  # PixelCodec(1): the latent is the image
    frozen = {"text": inputs["context"]}

    @jax.jit
    def both(params, frozen, image, reference_pose, target_pose, noise):
        ref = extract_reference(MODEL, params, frozen, image, reference_pose)
        kwargs = dict(window=window, overlap=1)
        cached = denoise(MODEL, params, ref, SAMPLER, noise, target_pose, GUIDANCE, **kwargs)
        joint = denoise(MODEL, params, ref, SAMPLER, noise, target_pose, GUIDANCE, joint=True,
                        reference_pose=reference_pose, **kwargs)
        return cached, joint

    cached, joint = both(params, frozen, image, inputs["reference_pose"], inputs["target_pose"], inputs["targets"])
    assert relative_error(cached, joint) <= 1e-5


def test_cached_mode_is_refused_under_the_full_rule(params, rng):
    """The full rule has no reference cache: asking for it is a one-line error (traced only)."""
    inputs = _inputs(rng)
    cache = {CACHE_COLLECTION: {}}
    with pytest.raises(ValueError, match="reference cache needs the causal rule: under attention_rule='full'"):
        jax.eval_shape(lambda p: WanSCD(FULL).apply({"params": p, **cache}, inputs["targets"], inputs["t"],
                                                      inputs["context"], target_pose=inputs["target_pose"],
                                                      use_reference_cache=True), params)
