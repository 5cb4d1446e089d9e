"""Two-stage sampling: the cached loop equals the joint loop; temporal windows, with and
without motion modules; the progress hook."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import random_params, relative_error

from consist_jax.convert.build import unet_config_from
from consist_jax.convert.motion import add_motion_params, motion_param_shapes
from consist_jax.convert.unet import unet_param_shapes
from consist_jax.diffusion.samplers import make_sampler
from consist_jax.diffusion.schedule import NoiseSchedule
from consist_jax.models.motion import MotionConfig
from consist_jax.models.scd import NullContext, PixelCodec, SCDModel
from consist_jax.models.unet import UNet
from consist_jax.sampling.two_stage import GuidanceConfig, denoise, extract_reference, window_starts

from tests.configs.tiny import get_config as tiny_config

# The tiny test run's UNet (pixel-unshuffled 16x16 frames -> 8x8x12 latents).
CONFIG = unet_config_from(tiny_config().model.unet)


@pytest.fixture(scope="module")
def model_and_params():
    params = random_params(unet_param_shapes(CONFIG), seed=0)
    model = SCDModel(UNet(CONFIG), PixelCodec(2), NullContext(CONFIG.cross_attention_dim))
    return model, params


def _inputs(rng, b, f):
    reference = jnp.asarray(rng.uniform(-1, 1, (b, 16, 16, 3)), jnp.float32)
    reference_pose = jnp.asarray(rng.uniform(0, 1, (b, 16, 16, 3)), jnp.float32)
    target_pose = jnp.asarray(rng.uniform(0, 1, (b, f, 16, 16, 3)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((b, f, 8, 8, 12)), jnp.float32)
    return reference, reference_pose, target_pose, noise


SAMPLER = make_sampler("ddim", NoiseSchedule.create("linear", 1e-4, 2e-2), 3, prediction_type="sample")
GUIDANCE = GuidanceConfig(scale=2.5)


@pytest.mark.parametrize("frames", [1, 3])
def test_cached_sampling_equals_joint(model_and_params, rng, frames):
    """A whole sampled clip is the same with the reference cached once or recomputed per step."""
    model, params = model_and_params
    reference, reference_pose, target_pose, noise = _inputs(rng, 2, frames)

    @jax.jit
    def both(reference, reference_pose, target_pose, noise):
        ref = extract_reference(model, params, {}, reference, reference_pose)
        cached = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE)
        joint = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE, joint=True,
                        reference_pose=reference_pose)
        return cached, joint

    cached, joint = both(reference, reference_pose, target_pose, noise)
    assert relative_error(cached, joint) <= 1e-5


def test_window_starts_cover_the_video():
    np.testing.assert_array_equal(window_starts(10, 4, 1), [0, 3, 6])
    np.testing.assert_array_equal(window_starts(11, 4, 1), [0, 3, 6, 7])
    np.testing.assert_array_equal(window_starts(3, 4, 1), [0])
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 4)


def test_windows_as_long_as_the_video_equal_the_plain_loop(model_and_params, rng):
    model, params = model_and_params
    reference, reference_pose, target_pose, noise = _inputs(rng, 1, 4)

    ticks = []

    @jax.jit
    def run(reference, reference_pose, target_pose, noise):
        ref = extract_reference(model, params, {}, reference, reference_pose)
        plain = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE)
        one_window = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE, window=4, overlap=1)
        windowed = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE, window=2, overlap=1,
                           progress=lambda: ticks.append(1))
        joint = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE, window=2, overlap=1,
                        joint=True, reference_pose=reference_pose)
        return plain, one_window, windowed, joint

    plain, one_window, windowed, joint = jax.block_until_ready(run(reference, reference_pose, target_pose, noise))
    assert relative_error(joint, windowed) <= 1e-5  # the joint windows (full-rule models' path) agree
    assert relative_error(one_window, plain) <= 1e-6
    assert np.all(np.isfinite(windowed)) and windowed.shape == plain.shape
    # Without a motion module frames are independent, so any windowing gives the same frames.
    assert relative_error(windowed, plain) <= 1e-5
    # The progress hook saw every window of every step: 3 steps x windows at frames 0, 1, 2.
    assert len(ticks) == 3 * len(window_starts(4, 2, 1)) == 9


# The same UNet with AnimateDiff motion modules (random, so they act from the start).
VIDEO_CONFIG = dataclasses.replace(CONFIG, motion=MotionConfig(num_attention_heads=2, norm_num_groups=4,
                                                               max_seq_length=8))


def test_motion_module_runs_in_the_temporal_windows(model_and_params, rng):
    """A video with motion modules differs from the image model's frame-by-frame frames;
    one window as long as the video equals the unwindowed loop."""
    image_model, image_params = model_and_params
    params = add_motion_params(image_params, VIDEO_CONFIG, random_params(motion_param_shapes(VIDEO_CONFIG), seed=1))
    model = SCDModel(UNet(VIDEO_CONFIG), PixelCodec(2), NullContext(CONFIG.cross_attention_dim))
    reference, reference_pose, target_pose, noise = _inputs(rng, 1, 4)

    @jax.jit
    def run(reference, reference_pose, target_pose, noise):
        ref = extract_reference(model, params, {}, reference, reference_pose)
        plain = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE)
        one_window = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE, window=4, overlap=0)
        windowed = denoise(model, params, ref, SAMPLER, noise, target_pose, GUIDANCE, window=2, overlap=1)
        image_ref = extract_reference(image_model, image_params, {}, reference, reference_pose)
        per_frame = denoise(image_model, image_params, image_ref, SAMPLER, noise, target_pose, GUIDANCE)
        return plain, one_window, windowed, per_frame

    plain, one_window, windowed, per_frame = run(reference, reference_pose, target_pose, noise)
    assert relative_error(one_window, plain) <= 1e-6
    assert relative_error(plain, per_frame) > 1e-2  # the frames met in the motion modules
    assert np.all(np.isfinite(windowed)) and relative_error(windowed, plain) > 1e-4  # windows change what frames see


def test_pipeline_samples_a_full_rule_model_jointly(rng):
    """The full-rule ablation has no reference cache; the pipeline samples it jointly."""
    from consist_jax.sampling.pipeline import SCDPipeline

    config = dataclasses.replace(CONFIG, attention_rule="full")
    model = SCDModel(UNet(config), PixelCodec(2), NullContext(CONFIG.cross_attention_dim))
    pipe = SCDPipeline(model, random_params(unet_param_shapes(config), seed=2), {},
                       NoiseSchedule.create("linear", 1e-4, 2e-2), "sample", (16, 16))
    reference = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    poses = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    frames = pipe(reference, poses, reference_pose=reference, steps=2, guidance=3.0, window=2, overlap=1)
    assert frames.shape == (3, 16, 16, 3) and frames.dtype == np.uint8 and frames.std() > 0
    # Settings that make no sense are refused before anything compiles, naming the argument.
    for bad, message in [(dict(steps=0), "steps=0"), (dict(guidance=float("nan")), "guidance=nan"),
                         (dict(window=2, overlap=2), "overlap=2")]:
        kwargs = dict(reference_pose=reference, steps=2, guidance=3.0, window=2, overlap=1) | bad
        with pytest.raises(ValueError, match=message):
            pipe(reference, poses, **kwargs)
