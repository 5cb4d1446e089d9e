"""UNet: parity with diffusers' UNet2DConditionModel, checkpoint loading, SCD behaviour."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from parity import random_params, relative_error
from safetensors.numpy import load_file, save_file

from consist_jax import UNet, UNetConfig, load_unet
from consist_jax.convert.loading import CheckpointError
from consist_jax.models.self_attention import ReferenceLayout

torch.set_num_threads(2)

# Two small SD-1.x-shaped configs differing in widths, heads, depth, context and projection.
TORCH_CONFIGS = {
    "sd_like": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=24,
        norm_num_groups=8,
    ),
    "deeper_linear": dict(
        block_out_channels=(16, 32, 48),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=40,
        norm_num_groups=4,
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 1),
    ),
}


def make_torch_unet(name, seed):
    """A random diffusers UNet whose every parameter is perturbed (no all-ones norms)."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **TORCH_CONFIGS[name])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def saved_unets(tmp_path_factory):
    """{config name: (torch model, folder with its diffusers checkpoint)}."""
    saved = {}
    for name in TORCH_CONFIGS:
        model = make_torch_unet(name, seed=len(name))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        saved[name] = (model, str(folder))
    return saved


@pytest.fixture(scope="module", params=sorted(TORCH_CONFIGS))
def saved_unet(request, saved_unets):
    """(config name, torch model, folder), for each config."""
    return (request.param, *saved_unets[request.param])


@pytest.fixture(scope="module")
def loaded_unet(saved_unet):
    name, model, folder = saved_unet
    module, params = load_unet(folder)
    return name, model, folder, module, params


def test_parity_with_diffusers(loaded_unet, rng):
    name, model, _, module, params = loaded_unet
    cfg = TORCH_CONFIGS[name]
    sample = rng.standard_normal((2, 8, 16, 4)).astype(np.float32)
    timesteps = rng.integers(0, 1000, size=(2,))
    context = rng.standard_normal((2, 3, cfg["cross_attention_dim"])).astype(np.float32)
    ours = jax.jit(module.apply)({"params": params}, sample, timesteps, context)
    with torch.no_grad():
        theirs = model(
            torch.from_numpy(sample).permute(0, 3, 1, 2),
            torch.from_numpy(timesteps),
            encoder_hidden_states=torch.from_numpy(context),
        ).sample.permute(0, 2, 3, 1).numpy()
    err = relative_error(ours, theirs)
    print(f"{name}: relative error {err:.2e}")
    assert err <= 1e-4


def test_every_weight_is_loaded(loaded_unet):
    """The loaded tree holds exactly the file's tensors (plus the new pose encoder)."""
    _, model, _, _, params = loaded_unet
    from consist_jax.convert.loading import params_to_state_dict

    exported = params_to_state_dict({k: v for k, v in params.items() if k != "pose_encoder"})
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_fp16_and_sharded_checkpoints(saved_unet, tmp_path, rng):
    _, _, folder = saved_unet
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    config = json.load(open(os.path.join(folder, "config.json")))
    # fp16 variant file.
    fp16 = tmp_path / "fp16"
    fp16.mkdir()
    json.dump(config, open(fp16 / "config.json", "w"))
    save_file({k: v.astype(np.float16) for k, v in state.items()}, fp16 / "diffusion_pytorch_model.fp16.safetensors")
    _, params16 = load_unet(str(fp16))
    w = params16["conv_in"]["kernel"]
    assert w.dtype == jnp.float32
    np.testing.assert_array_equal(w, state["conv_in.weight"].astype(np.float16).astype(np.float32).transpose(2, 3, 1, 0))
    # Two shards with an index, as save_pretrained(max_shard_size=...) writes them.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    json.dump(config, open(sharded / "config.json", "w"))
    keys = sorted(state)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for shard, shard_keys in halves.items():
        save_file({k: state[k] for k in shard_keys}, sharded / shard)
        weight_map.update({k: shard for k in shard_keys})
    json.dump({"weight_map": weight_map}, open(sharded / "diffusion_pytorch_model.safetensors.index.json", "w"))
    _, params_sharded = load_unet(str(sharded))
    np.testing.assert_array_equal(params_sharded["conv_out"]["bias"], state["conv_out.bias"])


def _broken_folder(folder, tmp_path, edit):
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    edit(state)
    out = tmp_path / "broken"
    out.mkdir(exist_ok=True)
    save_file(state, out / "diffusion_pytorch_model.safetensors")
    json.dump(json.load(open(os.path.join(folder, "config.json"))), open(out / "config.json", "w"))
    return str(out)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("mid_block.resnets.0.conv1.weight"), "missing key(s): mid_block.resnets.0.conv1.weight"),
        (lambda s: s.update(extra_layer=np.ones(3, np.float32)), "unexpected key(s): extra_layer"),
        (lambda s: s.update({"conv_in.bias": np.ones(7, np.float32)}), "conv_in.bias: file has (7,)"),
    ],
)
def test_checkpoint_errors_name_the_key(saved_unets, tmp_path, edit, message):
    _, folder = saved_unets["sd_like"]
    broken = _broken_folder(folder, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_unet(broken)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet(str(tmp_path))
    json.dump(TORCH_CONFIGS["sd_like"], open(tmp_path / "config.json", "w"))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickled"):
        load_unet(str(tmp_path))


def test_config_rejects_unsupported_options():
    base = dict(TORCH_CONFIGS["sd_like"])
    with pytest.raises(ValueError, match="unknown down block type 'SimpleDownBlock2D'"):
        UNetConfig.from_diffusers(dict(base, down_block_types=["SimpleDownBlock2D", "DownBlock2D"]))
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers(dict(base, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="unknown UNet config key"):
        UNetConfig.from_diffusers(dict(base, not_a_key=1))
    # upcast_attention is respected, not rejected.
    assert UNetConfig.from_diffusers(dict(base, upcast_attention=True)).upcast_attention


# ----------------------------------------------------------------------------- SCD mode

SCD_CONFIG = UNetConfig(
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_heads=(2, 2),
    transformer_layers_per_block=(1, 1),
    cross_attention_dim=8,
    norm_num_groups=4,
    pose_block_out_channels=(4, 8),
)


def _randomize(params, seed):
    """Random params everywhere (the pose encoder's zero output conv included)."""
    return random_params(params, seed)


@pytest.fixture(scope="module")
def scd_unet():
    from consist_jax.convert.unet import unet_param_shapes

    shapes = unet_param_shapes(SCD_CONFIG)
    params = _randomize(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), 1)
    module = UNet(SCD_CONFIG)
    layout = ReferenceLayout("joint", 2)

    @jax.jit
    def joint_all_images(params, images, times, context, poses, reference_mask):
        """Every image's output in the joint layout, the reference's included."""
        return module.apply(
            {"params": params}, images, times, context, poses, layout, reference_mask,
            method=UNet.forward_images,
        )

    return module, params, joint_all_images


def _joint_inputs(rng, b=2, f=2):
    images = rng.standard_normal((b * (1 + f), 8, 8, 4)).astype(np.float32)
    times = rng.integers(0, 1000, (b * (1 + f),))
    context = rng.standard_normal((b * (1 + f), 1, 8)).astype(np.float32)
    poses = rng.uniform(size=(b * (1 + f), 16, 16, 3)).astype(np.float32)
    return images, times, context, poses


def test_reference_is_causal(scd_unet, rng):
    """Changing a target changes nothing of the reference; changing the reference changes the target."""
    _, params, joint = scd_unet
    images, times, context, poses = _joint_inputs(rng)
    mask = np.ones((2,), bool)
    base = np.asarray(joint(params, images, times, context, poses, mask)).reshape(2, 3, 8, 8, 4)
    changed_target = images.copy().reshape(2, 3, 8, 8, 4)
    changed_target[:, 1:] = rng.standard_normal(changed_target[:, 1:].shape)
    out = np.asarray(joint(params, changed_target.reshape(images.shape), times, context, poses, mask))
    out = out.reshape(2, 3, 8, 8, 4)
    np.testing.assert_array_equal(out[:, 0], base[:, 0])  # bit-identical reference
    changed_ref = images.copy().reshape(2, 3, 8, 8, 4)
    changed_ref[:, 0] = rng.standard_normal(changed_ref[:, 0].shape)
    out = np.asarray(joint(params, changed_ref.reshape(images.shape), times, context, poses, mask))
    out = out.reshape(2, 3, 8, 8, 4)
    assert relative_error(out[:, 1:], base[:, 1:]) > 1e-3
    # A dropped reference (classifier-free guidance) makes the target blind to it.
    dropped = np.array([False, True])
    a = np.asarray(joint(params, images, times, context, poses, dropped)).reshape(2, 3, 8, 8, 4)
    b = np.asarray(joint(params, changed_ref.reshape(images.shape), times, context, poses, dropped))
    b = b.reshape(2, 3, 8, 8, 4)
    np.testing.assert_allclose(b[0, 1:], a[0, 1:], rtol=0, atol=1e-5)
    assert relative_error(b[1, 1:], a[1, 1:]) > 1e-3


def test_full_rule_lets_reference_see_targets(rng):
    import dataclasses

    config = dataclasses.replace(SCD_CONFIG, attention_rule="full")
    module = UNet(config)
    from consist_jax.convert.unet import unet_param_shapes

    params = _randomize(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), unet_param_shapes(config)), 2)
    images, times, context, poses = _joint_inputs(rng, b=1, f=1)
    run = lambda x: np.asarray(module.apply(
        {"params": params}, x, times, context, poses, ReferenceLayout("joint", 1), None,
        method=UNet.forward_images))
    changed = images.copy()
    changed[1] = rng.standard_normal(changed[1].shape)
    assert relative_error(run(changed)[0], run(images)[0]) > 1e-4


@pytest.mark.parametrize("frames", [1, 3])
def test_cached_target_pass_equals_joint(scd_unet, rng, frames):
    """Stage 1 + stage 2 (reference cache) equals the joint causal forward."""
    module, params, _ = scd_unet
    b = 2
    ref = rng.standard_normal((b, 8, 8, 4)).astype(np.float32)
    targets = rng.standard_normal((b, frames, 8, 8, 4)).astype(np.float32)
    t = rng.integers(0, 1000, (b,))
    t_ref = rng.integers(0, 10, (b,))
    context = rng.standard_normal((b, 1, 8)).astype(np.float32)
    ref_pose = rng.uniform(size=(b, 16, 16, 3)).astype(np.float32)
    tgt_pose = rng.uniform(size=(b, frames, 16, 16, 3)).astype(np.float32)
    mask = np.array([True, False])
    joint = module.apply({"params": params}, targets, t, context, reference=ref, reference_timesteps=t_ref,
                         reference_pose=ref_pose, target_pose=tgt_pose, reference_mask=mask)
    _, cache = module.apply({"params": params}, ref, t_ref, context, ref_pose,
                            method=UNet.extract_reference, mutable=["reference_cache"])
    cached = module.apply({"params": params, **cache}, targets, t, context, target_pose=tgt_pose,
                          reference_mask=mask, use_reference_cache=True)
    assert joint.shape == targets.shape
    assert relative_error(cached, joint) <= 1e-5


def test_reference_pose_injection_off(rng):
    """Without injection the reference pose is ignored; the targets' pose still matters."""
    import dataclasses

    from consist_jax.convert.unet import unet_param_shapes

    config = dataclasses.replace(SCD_CONFIG, reference_pose_injection=False)
    module = UNet(config)
    params = _randomize(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), unet_param_shapes(config)), 3)
    ref = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    tgt = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((1, 1, 8)).astype(np.float32)
    pose = rng.uniform(size=(1, 16, 16, 3)).astype(np.float32)
    run = lambda ref_pose, tgt_pose: np.asarray(module.apply(
        {"params": params}, tgt, 500, context, reference=ref, reference_pose=ref_pose, target_pose=tgt_pose))
    base = run(pose, pose)
    np.testing.assert_array_equal(run(rng.uniform(size=pose.shape).astype(np.float32), pose), base)
    assert relative_error(run(pose, rng.uniform(size=pose.shape).astype(np.float32)), base) > 1e-4


def test_bad_inputs_raise_clear_errors(scd_unet, rng):
    module, params, _ = scd_unet
    v = {"params": params}
    context = rng.standard_normal((2, 1, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="C=4"):
        module.apply(v, rng.standard_normal((2, 8, 8, 3)), 1, context)
    with pytest.raises(ValueError, match="divisible by 2"):
        module.apply(v, rng.standard_normal((2, 7, 8, 4)), 1, context)
    with pytest.raises(ValueError, match="reference must be"):
        module.apply(v, rng.standard_normal((2, 1, 8, 8, 4)), 1, context,
                     reference=rng.standard_normal((3, 8, 8, 4)))
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        module.apply(v, rng.standard_normal((2, 8, 8, 4)), 1, context[..., :5])
    with pytest.raises(ValueError, match="pose images must be"):
        module.apply(v, rng.standard_normal((2, 8, 8, 4)), 1, context,
                     target_pose=rng.uniform(size=(2, 8, 8, 3)))


def test_keys_can_start_as_the_queries(rng):
    """self_attention_key_init="query": each self-attention's to_k starts as a copy of its to_q
    (so a target token's first scores are highest on the reference tokens that look like it);
    every other parameter is the random init's; a pretrained UNet or another name is refused."""
    import dataclasses

    import ml_collections
    from flax.traverse_util import flatten_dict

    from consist_jax.convert.unet import init_unet_params
    from consist_jax.factory import build_model

    key = jax.random.key(int(rng.integers(2**31)))
    tied = flatten_dict(init_unet_params(dataclasses.replace(SCD_CONFIG, self_attention_key_init="query"), key))
    plain = flatten_dict(init_unet_params(SCD_CONFIG, key))
    keys = [p for p in tied if "attn1" in p and p[-2] == "to_k"]
    assert len(keys) == sum(1 for p in tied if "attn1" in p and p[-2] == "to_q") > 0
    for path in keys:
        query = path[:-2] + ("to_q", path[-1])
        np.testing.assert_array_equal(tied[path], tied[query])
        assert not np.array_equal(plain[path], plain[query])  # the random init's keys are their own
    for path in set(tied) - set(keys):  # cross-attention keys included
        np.testing.assert_array_equal(tied[path], plain[path])
    with pytest.raises(ValueError, match="self_attention_key_init='keys': expected one of"):
        UNetConfig(self_attention_key_init="keys")
    model = ml_collections.ConfigDict(dict(pretrained_unet="/some/unet", unet=dict(self_attention_key_init="query")))
    with pytest.raises(ValueError, match="model.unet.self_attention_key_init='query' initialises a fresh UNet"):
        build_model(model, key)


def test_no_cross_attention_is_the_zero_contexts_bias(scd_unet, rng):
    """cross_attention=False drops each block's attn2 and norm2. Over the constant zero context
    of model.context.kind "none" an attn2's values are zero (to_v has no bias), so whatever the
    scores it adds only its output bias: with those biases zeroed the UNet with cross-attention
    gives the same outputs as the one without, which has no attn2 or norm2 parameters (and
    ignores its context). Other contexts are refused."""
    import dataclasses

    import ml_collections
    from flax.traverse_util import flatten_dict, unflatten_dict

    from consist_jax.convert.unet import init_unet_params
    from consist_jax.factory import build_model

    _, params, joint = scd_unet
    flat = flatten_dict(params)

    def in_block(path):  # a transformer block's norm2, not a resnet's
        return any(part.startswith("transformer_blocks") for part in path)

    crossing = [p for p in flat if in_block(p) and ("attn2" in p or "norm2" in p)]
    assert crossing
    config = dataclasses.replace(SCD_CONFIG, cross_attention=False)
    fresh = flatten_dict(init_unet_params(config, jax.random.key(0)))
    assert set(fresh) == set(flat) - set(crossing)
    module = UNet(config)

    @jax.jit
    def without(params, images, times, context, poses, reference_mask):
        return module.apply({"params": params}, images, times, context, poses, ReferenceLayout("joint", 2),
                            reference_mask, method=UNet.forward_images)

    images, times, context, poses = _joint_inputs(rng)
    zero = np.zeros_like(context)
    mask = np.array([True, False])
    no_bias = {p: np.zeros_like(v) if p[-3:] == ("attn2", "to_out.0", "bias") else v for p, v in flat.items()}
    expected = joint(unflatten_dict(no_bias), images, times, zero, poses, mask)
    got = without(unflatten_dict({p: v for p, v in flat.items() if p not in crossing}), images, times, context,
                  poses, mask)
    # x + 0.0 is exact, so the only differences are XLA's fusion choices: float32 rounding.
    assert relative_error(got, expected) < 1e-5
    key = jax.random.key(0)
    for model, message in (
        (dict(pretrained_unet="/some/unet", unet=dict(cross_attention=False)),
         "model.unet.cross_attention=False builds a UNet without cross-attention; this run loads a pretrained"),
        (dict(pretrained_unet="", unet=dict(cross_attention=False), context=dict(kind="text")),
         "model.unet.cross_attention=False leaves the UNet without cross-attention, but model.context.kind='text'"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            build_model(ml_collections.ConfigDict(model), key)
        assert "\n" not in str(error.value)
