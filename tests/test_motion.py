"""Motion modules: parity with diffusers' UNetMotionModel, checkpoint loading (diffusers and
original AnimateDiff naming), SCD's reference left out of time, frame-parallel sharding."""
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from flax import traverse_util
from parity import relative_error
from safetensors.numpy import load_file, save_file

from consist_jax import UNet, UNetConfig, load_unet
from consist_jax.convert.loading import CheckpointError, params_to_state_dict
from consist_jax.convert.motion import (
    add_motion_params,
    init_motion_params,
    load_motion_adapter,
    load_video_unet,
    motion_param_shapes,
)
from consist_jax.convert.unet import unet_param_shapes
from consist_jax.models.self_attention import ReferenceLayout
from consist_jax.models.motion import MotionConfig

torch.set_num_threads(2)

# Two blocks (one motion module per down block, two per up block), per-block heads and
# depths, a motion mid block: every naming and reversal rule of UNetMotionModel is exercised.
TORCH_UNET = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=8,
    norm_num_groups=4,
)
TORCH_ADAPTER = dict(
    block_out_channels=(16, 32),
    motion_layers_per_block=1,
    motion_transformer_layers_per_block=(1, 2),
    motion_num_attention_heads=(2, 4),
    motion_norm_num_groups=4,  # UNetMotionModel uses the UNet's groups: keep them equal
    motion_max_seq_length=8,
    use_motion_mid_block=True,
)


def _perturb(model, seed):
    """Every parameter moved off its init (the norms' ones, the zero projections)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(torch UNetMotionModel, torch image UNet, image UNet folder, adapter folder)."""
    torch.manual_seed(0)
    unet = _perturb(UNet2DConditionModel(**TORCH_UNET), 1)
    adapter = _perturb(MotionAdapter(**TORCH_ADAPTER), 2)
    unet_folder, adapter_folder = tmp_path_factory.mktemp("unet"), tmp_path_factory.mktemp("adapter")
    unet.save_pretrained(unet_folder, safe_serialization=True)
    adapter.save_pretrained(adapter_folder, safe_serialization=True)
    video = UNetMotionModel.from_unet2d(unet, adapter).eval()
    return video, unet, str(unet_folder), str(adapter_folder)


def _video_inputs(rng, b=2, f=3):
    sample = rng.standard_normal((b, f, 8, 8, 4)).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=(b,))
    context = rng.standard_normal((b, 3, 8)).astype(np.float32)
    return sample, timesteps, context


def _torch_video(model, sample, timesteps, context):
    """diffusers' layouts: sample (B, C, F, H, W), context repeated per frame (B*F, L, D)."""
    f = sample.shape[1]
    with torch.no_grad():
        out = model(
            torch.from_numpy(sample).permute(0, 4, 1, 2, 3),
            torch.from_numpy(timesteps),
            encoder_hidden_states=torch.from_numpy(context).repeat_interleave(f, dim=0),
        ).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


def test_parity_with_unet_motion_model(saved, rng):
    video, image, unet_folder, adapter_folder = saved
    module, params = load_video_unet(unet_folder, adapter_folder, pose_block_out_channels=None)
    assert module.config.motion == MotionConfig(
        num_attention_heads=(2, 4), transformer_layers_per_block=(1, 2), max_seq_length=8, norm_num_groups=4
    )
    sample, timesteps, context = _video_inputs(rng)
    ours = jax.jit(module.apply)({"params": params}, sample, timesteps, context)
    theirs = _torch_video(video, sample, timesteps, context)
    err = relative_error(ours, theirs)
    print(f"UNetMotionModel parity: relative error {err:.2e}")
    assert err <= 1e-4
    # The motion modules matter here (else the test would only check the image UNet).
    f = sample.shape[1]
    with torch.no_grad():
        flat = torch.from_numpy(sample.reshape(-1, 8, 8, 4)).permute(0, 3, 1, 2)
        still = image(flat, torch.from_numpy(np.repeat(timesteps, f)),
                      encoder_hidden_states=torch.from_numpy(np.repeat(context, f, axis=0))).sample
    assert relative_error(still.permute(0, 2, 3, 1).numpy().reshape(theirs.shape), theirs) > 1e-2


def test_every_motion_weight_is_loaded(saved):
    _, _, _, adapter_folder = saved
    _, params = load_motion_adapter(adapter_folder)
    original = load_file(os.path.join(adapter_folder, "diffusion_pytorch_model.safetensors"))
    exported = params_to_state_dict(params)
    assert set(exported) == {k for k in original if not k.endswith(".pe")}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, original[key], err_msg=key)


def to_original_naming(state):
    """diffusers MotionAdapter keys -> the original AnimateDiff (mm_sd_v15_v2) keys."""
    out = {}
    for key, value in state.items():
        head, sep, tail = key.partition(".motion_modules.")
        index, _, rest = tail.partition(".")
        rest = (rest.replace("norm1.", "norms.0.").replace("norm2.", "norms.1.").replace("norm3.", "ff_norm.")
                .replace("attn1.", "attention_blocks.0.").replace("attn2.", "attention_blocks.1."))
        prefix = f"{head}{sep}{index}.temporal_transformer."
        if rest.endswith("pos_embed.pe"):  # one table per attention block in the original
            block = rest[: -len("pos_embed.pe")]
            for a in (0, 1):
                out[f"{prefix}{block}attention_blocks.{a}.pos_encoder.pe"] = value
        else:
            out[prefix + rest] = value
    return out


def test_original_animatediff_naming(saved, tmp_path):
    _, _, _, adapter_folder = saved
    state = load_file(os.path.join(adapter_folder, "diffusion_pytorch_model.safetensors"))
    original = to_original_naming(state)
    block = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
    assert {block + "attention_blocks.1.to_q.weight", block + "norms.0.bias", block + "ff_norm.weight"} <= set(original)
    path = str(tmp_path / "mm_tiny.safetensors")
    save_file(original, path)
    config, params = load_motion_adapter(path, num_attention_heads=(2, 4), norm_num_groups=4)
    reference_config, reference = load_motion_adapter(adapter_folder)
    assert config == reference_config  # depths, mid block and max_seq_length read from the tensors
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, reference)


def test_motion_checkpoint_errors(saved, tmp_path):
    _, _, unet_folder, adapter_folder = saved
    state = load_file(os.path.join(adapter_folder, "diffusion_pytorch_model.safetensors"))
    (tmp_path / "mm_sd_v15_v2.ckpt").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="Convert it once"):
        load_motion_adapter(str(tmp_path / "mm_sd_v15_v2.ckpt"))
    with pytest.raises(CheckpointError, match="max_seq_length of 16"):
        load_motion_adapter(adapter_folder, max_seq_length=16)
    broken = dict(state)
    key = "up_blocks.0.motion_modules.1.transformer_blocks.1.attn2.to_v.weight"
    broken[key + "_extra"] = broken.pop(key)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): up_blocks.0.motion_modules.1"):
        load_motion_adapter(str(tmp_path / "broken.safetensors"), num_attention_heads=(2, 4), norm_num_groups=4)
    # An adapter for other block widths does not fit the UNet.
    _, motion_params = load_motion_adapter(adapter_folder)
    config = UNetConfig.from_diffusers(
        {**TORCH_UNET, "block_out_channels": (8, 32)},
        motion=MotionConfig(num_attention_heads=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=4),
    )
    message = r"misshapen, e.g. down_blocks.0.motion_modules.0.norm.bias \(16,\) vs \(8,\)"
    with pytest.raises(CheckpointError, match=message):
        add_motion_params({}, config, motion_params)


def test_video_unet_without_motion_checkpoint(saved):
    """No motion checkpoint: the image UNet's weights plus fresh modules whose output
    projections are zero (the forward equality is checked in the SCD tests below)."""
    _, _, unet_folder, _ = saved
    video, video_params = load_video_unet(unet_folder, motion_options=dict(num_attention_heads=2, norm_num_groups=4),
                                          pose_block_out_channels=None)
    _, image_params = load_unet(unet_folder, pose_block_out_channels=None)
    flat = traverse_util.flatten_dict(video_params)
    motion = {p: v for p, v in flat.items() if any(s.startswith("motion_modules.") for s in p)}
    assert {p[0] for p in motion} == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    assert all(not np.any(v) for p, v in motion.items() if "proj_out" in p)
    rest = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in motion})
    jax.tree_util.tree_map(np.testing.assert_array_equal, rest, image_params)
    assert video.config.motion == MotionConfig(num_attention_heads=2, norm_num_groups=4)


# ----------------------------------------------------------------------------- SCD mode

# One block (motion modules in the down, mid and up blocks): SCD's behaviour at the least compile cost.
SCD_IMAGE = UNetConfig(
    block_out_channels=(16,),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    attention_heads=(2,),
    transformer_layers_per_block=(1,),
    cross_attention_dim=8,
    norm_num_groups=4,
    pose_block_out_channels=(4, 8),
)
SCD_VIDEO = dataclasses.replace(
    SCD_IMAGE, motion=MotionConfig(num_attention_heads=2, norm_num_groups=4, max_seq_length=6)
)


@pytest.fixture(scope="module")
def scd_video():
    """(video module, random video params (motion non-zero), the image params inside them)."""
    draw = np.random.default_rng(3)
    shapes = traverse_util.flatten_dict(unet_param_shapes(SCD_VIDEO))
    flat = {p: jnp.asarray(0.2 * draw.standard_normal(s.shape), jnp.float32) for p, s in shapes.items()}
    image = {p: v for p, v in flat.items() if not any(k.startswith("motion_modules.") for k in p)}
    return UNet(SCD_VIDEO), traverse_util.unflatten_dict(flat), traverse_util.unflatten_dict(image)


@functools.partial(jax.jit, static_argnums=(0, 7))
def joint_all_images(config, params, images, times, context, poses, reference_mask, frames):
    """Every image's output in the joint layout (B*(1+F), h, w, C_out), the reference's included.

    One compiled function per config, shared by the tests below.
    """
    return UNet(config).apply({"params": params}, images, times, context, poses,
                              ReferenceLayout("joint", frames), reference_mask, method=UNet.forward_images)


def _joint_inputs(rng, b=2, f=3):
    """Flat joint-layout inputs: images (B*(1+F), 8, 8, 4), times, context, poses."""
    n = b * (1 + f)
    return (rng.standard_normal((n, 8, 8, 4)).astype(np.float32), rng.integers(0, 1000, (n,)),
            rng.standard_normal((n, 1, 8)).astype(np.float32), rng.uniform(size=(n, 16, 16, 3)).astype(np.float32))


def test_reference_is_untouched_by_motion(scd_video, rng):
    _, params, image_params = scd_video
    b, f = 2, 3
    images, times, context, poses = _joint_inputs(rng, b, f)
    mask = np.ones((b,), bool)
    run = lambda config, p, x: np.asarray(joint_all_images(config, p, x, times, context, poses, mask, f)).reshape(
        b, 1 + f, 8, 8, 4)
    video, image = run(SCD_VIDEO, params, images), run(SCD_IMAGE, image_params, images)
    # The reference is the image model's; the targets move.
    assert relative_error(video[:, 0], image[:, 0]) <= 1e-6
    assert relative_error(video[:, 1:], image[:, 1:]) > 1e-3
    # Fresh motion modules (zero output projections): the video model is the image model.
    fresh = add_motion_params(image_params, SCD_VIDEO, init_motion_params(SCD_VIDEO, jax.random.key(5)))
    assert relative_error(run(SCD_VIDEO, fresh, images), image) <= 1e-6
    # Changing the target frames changes nothing of the reference (same compiled function).
    changed = images.reshape(b, 1 + f, 8, 8, 4).copy()
    changed[:, 1:] = rng.standard_normal(changed[:, 1:].shape)
    np.testing.assert_array_equal(run(SCD_VIDEO, params, changed.reshape(images.shape))[:, 0], video[:, 0])


def test_cached_target_pass_equals_joint_with_motion(scd_video, rng):
    """Stage 1 (extract, no motion) + stage 2 (cached targets, with motion) == the joint forward."""
    module, params, _ = scd_video
    b, f = 2, 3
    images, times, context, poses = _joint_inputs(rng, b, f)
    times = times.reshape(b, 1 + f).copy()
    times[:, 1:] = times[:, 1:2]  # one timestep per clip
    times[:, 0] = rng.integers(0, 10, (b,))
    grouped = lambda x: x.reshape(b, 1 + f, *x.shape[1:])
    clip_context = grouped(context)[:, 0]  # one context per clip
    mask = np.array([True, False])
    joint = joint_all_images(SCD_VIDEO, params, images, times.reshape(-1), np.repeat(clip_context, 1 + f, axis=0),
                             poses, mask, f)
    joint = np.asarray(joint).reshape(b, 1 + f, 8, 8, 4)[:, 1:]
    ref, targets = grouped(images)[:, 0], grouped(images)[:, 1:]
    ref_pose, tgt_pose = grouped(poses)[:, 0], grouped(poses)[:, 1:]
    _, cache = jax.jit(lambda p: module.apply(
        {"params": p}, ref, times[:, 0], clip_context, ref_pose, method=UNet.extract_reference,
        mutable=["reference_cache"]))(params)
    cached = jax.jit(lambda v: module.apply(
        v, targets, times[:, 1], clip_context, target_pose=tgt_pose, reference_mask=mask, use_reference_cache=True))(
        {"params": params, **cache})
    assert relative_error(cached, joint) <= 1e-5


def test_fresh_init_and_errors(scd_video, rng):
    """init_motion_params: proj_out zero, tree as the UNet's; too many frames is a clear error."""
    module, params, image_params = scd_video
    fresh = init_motion_params(SCD_VIDEO, jax.random.key(1))
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(motion_param_shapes(SCD_VIDEO))
    assert not np.any(fresh["mid_block"]["motion_modules.0"]["proj_out"]["kernel"])
    combined = add_motion_params(image_params, SCD_VIDEO, fresh)
    assert jax.tree_util.tree_structure(combined) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="already hold motion modules"):
        add_motion_params(params, SCD_VIDEO, fresh)
    context = rng.standard_normal((1, 1, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="knows 6 frame positions, the clip has 7"):
        jax.eval_shape(module.apply, {"params": params}, np.zeros((1, 7, 8, 8, 4), np.float32), 1, context)


# ----------------------------------------------------------------------------- frame parallel

SHARDED_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax, numpy as np
    from consist_jax import UNet, UNetConfig
    from consist_jax.convert.unet import unet_param_shapes
    from consist_jax.models.motion import MotionConfig
    from consist_jax.parallel import FRAMES_AXIS, frames_mesh, shard_frames

    assert jax.device_count() == 8, jax.devices()
    # One block (motion modules in the down, mid and up blocks): the smallest compile.
    base = UNetConfig(block_out_channels=(16,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                      up_block_types=("CrossAttnUpBlock2D",), attention_heads=(2,),
                      transformer_layers_per_block=(1,), cross_attention_dim=8, norm_num_groups=4,
                      pose_block_out_channels=None,
                      motion=MotionConfig(num_attention_heads=2, norm_num_groups=4, max_seq_length=16))
    sharded = dataclasses.replace(base, motion=dataclasses.replace(base.motion, frames_axis=FRAMES_AXIS))
    rng = np.random.default_rng(int(sys.argv[1]))
    params = jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32),
                                    unet_param_shapes(base))
    b, f = 2, 8
    sample = rng.standard_normal((b, f, 8, 8, 4)).astype(np.float32)
    t = rng.integers(0, 1000, (b,))
    context = rng.standard_normal((b, 1, 8)).astype(np.float32)
    forward = lambda config: jax.jit(lambda p, x: UNet(config).apply({"params": p}, x, t, context))

    plain = np.asarray(forward(base)(params, sample), np.float64)
    mesh = frames_mesh()
    with jax.set_mesh(mesh):
        x = shard_frames(sample, mesh)
        compiled = forward(sharded).lower(params, x).compile()
        out = compiled(params, x)
    err = float(np.abs(np.asarray(out, np.float64) - plain).max() / np.abs(plain).max())
    print(json.dumps(dict(err=err, all_gather="all-gather" in compiled.as_text(),
                          devices=len(out.sharding.device_set), spec=str(out.sharding.spec))))
    """
)


def test_frame_parallel_equals_unsharded(rng):
    """F=8 frames over 8 CPU devices: the sharded forward equals the unsharded one."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    seed = int(rng.integers(0, 2**31))
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(seed)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["err"] <= 1e-5, result
    assert result["all_gather"], "the temporal attention should gather frames across devices"
    assert result["devices"] == 8, result
