"""Wan2.1 transformer: parity with diffusers' WanTransformer3DModel, checkpoint loading,
the 1.3B / 14B configs (shapes only, nothing allocated)."""
import copy
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import traverse_util
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from parity import assert_within_rounding, relative_error
from safetensors.numpy import load_file, save_file

from consist_jax import load_transformer
from consist_jax.convert.loading import CheckpointError, params_to_state_dict, torch_key, torch_to_flax_layout
from consist_jax.convert.wan import transformer_param_shapes
from consist_jax.models.wan_transformer import WanTransformerConfig, apply_rotary, rotary_angles, rotary_table

torch.set_num_threads(2)

# diffusers' I2V attention takes the last 512 context tokens as the text (hard-coded).
I2V_TEXT_TOKENS = 512

# Two tiny configs: T2V with an odd frame count and the (1, 2, 2) patch of the real models;
# I2V (image tokens through add_k/add_v) with a temporal patch, no cross-attention norm and
# the FLF2V image positions. Head dims 12 and 10 split unevenly into frame/row/column parts.
TORCH_CONFIGS = {
    "t2v": dict(
        config=dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                    out_channels=6, text_dim=20, freq_dim=16, ffn_dim=40, num_layers=2),
        sample=(2, 5, 6, 10), text_tokens=7,
    ),
    "i2v": dict(
        config=dict(patch_size=(2, 2, 2), num_attention_heads=3, attention_head_dim=10, in_channels=6,
                    out_channels=4, text_dim=12, freq_dim=32, ffn_dim=24, num_layers=2,
                    cross_attn_norm=False, image_dim=8, added_kv_proj_dim=30, pos_embed_seq_len=6),
        sample=(2, 4, 8, 6), text_tokens=I2V_TEXT_TOKENS, image_tokens=3,
    ),
}


def make_torch_transformer(name, seed):
    """A random diffusers Wan transformer whose every parameter is perturbed (no all-ones norms)."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**TORCH_CONFIGS[name]["config"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def saved_transformers(tmp_path_factory):
    """{config name: (torch model, folder with its diffusers checkpoint)}."""
    saved = {}
    for name in TORCH_CONFIGS:
        model = make_torch_transformer(name, seed=len(name))
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        saved[name] = (model, str(folder))
    return saved


@pytest.fixture(scope="module", params=sorted(TORCH_CONFIGS))
def loaded_transformer(request, saved_transformers):
    """(config name, torch model, module, params, jitted apply), for each config."""
    model, folder = saved_transformers[request.param]
    module, params = load_transformer(folder)
    return request.param, model, module, params, jax.jit(module.apply)


def _random_inputs(name, rng):
    """Channels-last sample, float timesteps (flow matching's), text [and image] tokens."""
    spec, cfg = TORCH_CONFIGS[name], TORCH_CONFIGS[name]["config"]
    batch, *fhw = spec["sample"]
    inputs = {
        "sample": rng.standard_normal((batch, *fhw, cfg["in_channels"])).astype(np.float32),
        "timesteps": rng.uniform(0, 1000, size=(batch,)).astype(np.float32),
        "context": rng.standard_normal((batch, spec["text_tokens"], cfg["text_dim"])).astype(np.float32),
    }
    if "image_tokens" in spec:  # FLF2V: two images per clip
        images = 2 * batch if cfg.get("pos_embed_seq_len") else batch
        inputs["image_context"] = rng.standard_normal(
            (images, spec["image_tokens"], cfg["image_dim"])).astype(np.float32)
    return inputs


def test_parity_with_diffusers(loaded_transformer, rng):
    name, model, _, params, apply = loaded_transformer
    inputs = _random_inputs(name, rng)
    ours = apply({"params": params}, **inputs)
    with torch.no_grad():
        theirs = model(
            torch.from_numpy(inputs["sample"]).permute(0, 4, 1, 2, 3),
            torch.from_numpy(inputs["timesteps"]),
            encoder_hidden_states=torch.from_numpy(inputs["context"]),
            encoder_hidden_states_image=(torch.from_numpy(inputs["image_context"])
                                         if "image_context" in inputs else None),
        ).sample.permute(0, 2, 3, 4, 1).numpy()
    assert ours.shape == theirs.shape
    err = relative_error(ours, theirs)
    print(f"{name}: relative error {err:.2e}")
    assert err <= 1e-4


def test_every_weight_is_loaded(loaded_transformer):
    """The loaded tree holds exactly the file's tensors, unchanged."""
    _, model, _, params, _ = loaded_transformer
    exported = params_to_state_dict(params)
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(exported) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_rotary_table_matches_diffusers(rng):
    """Our cos/sin table equals diffusers' WanRotaryPosEmbed's (float64 angles rounded to float32)."""
    config = WanTransformerConfig(**TORCH_CONFIGS["t2v"]["config"])
    f, h, w = (int(n) for n in rng.integers(1, 12, size=3))
    rope = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
    theirs_cos, theirs_sin = rope(torch.zeros(1, 1, f, 2 * h, 2 * w))
    cos, sin = rotary_table(rotary_angles(config, (f, h, w)))
    # diffusers repeats each pair's value for its two channels.
    for ours, theirs in ((cos, theirs_cos), (sin, theirs_sin)):
        theirs = theirs.reshape(f * h * w, -1).numpy()
        np.testing.assert_array_equal(theirs[:, 0::2], theirs[:, 1::2])
        assert_within_rounding(ours, theirs[:, 0::2], 1.0, 1, "rotary table")


def _bf16_like_from_pretrained(model):
    """What ``from_pretrained(torch_dtype=torch.bfloat16)`` builds (it needs accelerate for the
    float32 modules): parameters under a ``_keep_in_fp32_modules`` component stay float32."""
    model16 = copy.deepcopy(model)
    keep = WanTransformer3DModel._keep_in_fp32_modules
    with torch.no_grad():
        for name, param in model16.named_parameters():
            fp32 = any(m in name.split(".") for m in keep)
            param.data = param.data.to(torch.float32 if fp32 else torch.bfloat16)
    return model16.eval()


def test_bf16_like_diffusers(saved_transformers, rng):
    """In bf16 the same parameters stay float32 as in diffusers' bf16 model,
    and our bf16 output is as close to the float32 one as diffusers' bf16 output is."""
    model, folder = saved_transformers["t2v"]
    theirs16 = _bf16_like_from_pretrained(model)
    module, params = load_transformer(folder, dtype=jnp.bfloat16)
    ours_dtypes = {k: v.dtype for k, v in params_to_state_dict(params).items()}
    their_dtypes = {k: v.dtype for k, v in theirs16.state_dict().items()}
    assert {k for k, d in ours_dtypes.items() if d == np.float32} == {
        k for k, d in their_dtypes.items() if d == torch.float32}
    assert {d for d in ours_dtypes.values()} == {np.dtype(np.float32), np.dtype(jnp.bfloat16)}
    inputs = _random_inputs("t2v", rng)
    ours = jax.jit(module.apply)({"params": params}, **inputs)
    assert ours.dtype == jnp.bfloat16
    torch_inputs = (torch.from_numpy(inputs["sample"]).permute(0, 4, 1, 2, 3),
                    torch.from_numpy(inputs["timesteps"]), torch.from_numpy(inputs["context"]))
    with torch.no_grad():
        exact = model(*torch_inputs).sample.permute(0, 2, 3, 4, 1).numpy()
        sample, timesteps, context = torch_inputs  # (the pipeline keeps the timesteps float32)
        theirs = theirs16(sample.to(torch.bfloat16), timesteps, context.to(torch.bfloat16)).sample
        theirs = theirs.float().permute(0, 2, 3, 4, 1).numpy()
    ours_err, their_err = relative_error(np.asarray(ours, np.float32), exact), relative_error(theirs, exact)
    print(f"bf16 relative error: ours {ours_err:.2e}, diffusers {their_err:.2e}")
    assert ours_err <= 2 * their_err


def test_rotary_scores_depend_on_frame_offsets_only(rng):
    """Shifting every frame position by the same amount leaves q.k unchanged (up to float32
    rounding): why a reference at a fixed frame position serves every window (docs/wan.md)."""
    config = WanTransformerConfig(**TORCH_CONFIGS["t2v"]["config"])
    grid, shift = (3, 2, 2), float(rng.integers(1, 100))
    n, heads, dim = math.prod(grid), config.num_attention_heads, config.attention_head_dim
    q, k = (rng.standard_normal((1, n, heads, dim)).astype(np.float32) for _ in range(2))
    positions = rng.integers(0, 20, size=grid[0]).astype(np.float64)

    def scores(frame_positions):
        cos, sin = rotary_table(rotary_angles(config, grid, frame_positions))
        q_rot, k_rot = (np.asarray(apply_rotary(jnp.asarray(x), cos, sin), np.float64) for x in (q, k))
        return np.einsum("bqhd,bkhd->bhqk", q_rot, k_rot)

    def pair_sums(x):  # |x1| + |x2| of every rotated pair: (1, n, heads, dim / 2)
        return np.abs(x).reshape(1, n, heads, -1, 2).sum(-1)

    # Each rotated pair rounds 3 times (table, product, sum) on |x1| + |x2|, in q and in k.
    scale = np.einsum("bqhd,bkhd->bhqk", pair_sums(q), pair_sums(k))
    assert_within_rounding(scores(positions + shift), scores(positions), 2 * scale, 6, "rotary scores")


def _folder_with(folder, out, state, config_edit=None):
    """A copy of a checkpoint folder with other weights (and config edits); returns its path."""
    os.makedirs(out, exist_ok=True)
    config = json.load(open(os.path.join(folder, "config.json")))
    json.dump(dict(config, **(config_edit or {})), open(os.path.join(out, "config.json"), "w"))
    if state is not None:
        save_file(state, os.path.join(out, "diffusion_pytorch_model.safetensors"))
    return str(out)


def test_sharded_fp16_and_bf16_checkpoints(saved_transformers, tmp_path):
    """fp16 weights in two shards with an index load (cast to the requested dtype); so do bf16 ones."""
    _, folder = saved_transformers["i2v"]
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    sharded = _folder_with(folder, tmp_path / "sharded", None)
    keys = sorted(state)
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, shard_keys in halves.items():
        save_file({k: state[k].astype(np.float16) for k in shard_keys}, os.path.join(sharded, shard))
        weight_map.update({k: shard for k in shard_keys})
    json.dump({"weight_map": weight_map},
              open(os.path.join(sharded, "diffusion_pytorch_model.safetensors.index.json"), "w"))
    for dtype in (jnp.float32, jnp.bfloat16):
        module, params = load_transformer(sharded, dtype=dtype)
        exported = params_to_state_dict(params)
        assert set(exported) == set(state)
        for key, value in state.items():
            # (diffusers' float32 modules stay float32: test_bf16_like_diffusers checks which)
            expected = value.astype(np.float16).astype(exported[key].dtype)
            np.testing.assert_array_equal(exported[key], expected, err_msg=key)
    # A bfloat16 file (as most checkpoints now are) reads exactly.
    bf16 = _folder_with(folder, tmp_path / "bf16", None)
    safetensors.torch.save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()},
                                os.path.join(bf16, "diffusion_pytorch_model.safetensors"))
    exported = params_to_state_dict(load_transformer(bf16)[1])
    for key, value in state.items():
        np.testing.assert_array_equal(exported[key], torch.from_numpy(value).to(torch.bfloat16).float().numpy(),
                                      err_msg=key)
    # The bf16 model computes in bf16 (shapes only: no compile).
    inputs = _random_inputs("i2v", np.random.default_rng(0))
    out = jax.eval_shape(module.apply, {"params": params}, **inputs)
    assert out.dtype == jnp.bfloat16 and out.shape == (*inputs["sample"].shape[:4], 4)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("blocks.1.attn1.norm_k.weight"), r"1 missing key\(s\): blocks.1.attn1.norm_k.weight"),
    (lambda s: s.update({"blocks.0.attn3.to_q.weight": np.ones((2, 2), np.float32)}),
     r"1 unexpected key\(s\): blocks.0.attn3.to_q.weight"),
    (lambda s: s.update({"proj_out.bias": np.ones(5, np.float32)}), r"proj_out.bias: file has \(5,\)"),
])
def test_checkpoint_errors_name_the_key(saved_transformers, tmp_path, edit, message):
    _, folder = saved_transformers["t2v"]
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    edit(state)
    with pytest.raises(CheckpointError, match=message) as info:
        load_transformer(_folder_with(folder, tmp_path / "broken", state))
    assert "\n" not in str(info.value)


def test_unused_query_norm_of_old_i2v_files_is_ignored(saved_transformers, tmp_path):
    """diffusers ignores ``norm_added_q`` (_keys_to_ignore_on_load_unexpected); so do we."""
    _, folder = saved_transformers["i2v"]
    state = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    state["blocks.0.attn2.norm_added_q.weight"] = np.ones(30, np.float32)
    load_transformer(_folder_with(folder, tmp_path / "old", state))


def test_config_errors_are_one_line(saved_transformers, tmp_path):
    _, folder = saved_transformers["t2v"]
    for edit, message in [
        ({"window_size": [-1, -1]}, r"unknown WanTransformer3DModel config key\(s\) \['window_size'\]"),
        ({"num_layers": 0}, r"num_layers=0: must be an integer >= 1"),
        ({"patch_size": [1, 2]}, r"patch_size=\(1, 2\): must be 3 integers"),
        ({"image_dim": 8}, r"image_dim=8, added_kv_proj_dim=None"),
    ]:
        out = _folder_with(folder, tmp_path / "cfg", None, edit)
        with pytest.raises(ValueError, match=message) as info:
            load_transformer(out)
        assert "config.json" in str(info.value) and "\n" not in str(info.value)


def test_sample_shape_errors_name_the_shape():
    config = WanTransformerConfig(**TORCH_CONFIGS["t2v"]["config"])
    from consist_jax.models.wan_transformer import WanTransformer

    module = WanTransformer(config)
    params = transformer_param_shapes(config)
    context = jnp.zeros((1, 3, config.text_dim))
    with pytest.raises(ValueError, match=r"sample of shape \(1, 3, 5, 4, 4\): H=5 is not a multiple"):
        jax.eval_shape(module.apply, {"params": params}, jnp.zeros((1, 3, 5, 4, 4)), jnp.zeros((1,)), context)
    with pytest.raises(ValueError, match="rope_max_seq_len=1024"):
        jax.eval_shape(module.apply, {"params": params}, jnp.zeros((1, 1025, 2, 2, 4)), jnp.zeros((1,)), context)


# ----------------------------------------------------------------------------- named configs

# The transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers.
_WAN21_COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16,
                     text_dim=4096, freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                     eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
WAN21_CONFIGS = {
    "wan21_t2v_1_3b": dict(_WAN21_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan21_t2v_14b": dict(_WAN21_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}


@pytest.mark.parametrize("name", sorted(WAN21_CONFIGS))
def test_named_configs_match_diffusers_shapes(name):
    """The 1.3B / 14B configs build: the same parameter names, shapes and count as diffusers'
    model (on the meta device: no weights allocated on either side)."""
    config = getattr(WanTransformerConfig, name)()
    assert WanTransformerConfig.from_diffusers(WAN21_CONFIGS[name]) == config
    with torch.device("meta"):
        model = WanTransformer3DModel(**WAN21_CONFIGS[name])
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = traverse_util.flatten_dict(transformer_param_shapes(config))
    assert {torch_key(path) for path in ours} == set(theirs)
    for path, leaf in ours.items():  # their shape in our layout (a zero-stride view: no memory)
        layout = torch_to_flax_layout(path, np.broadcast_to(np.float32(0), theirs[torch_key(path)]))
        assert leaf.shape == layout.shape, torch_key(path)
    count = sum(math.prod(leaf.shape) for leaf in ours.values())
    assert count == sum(p.numel() for p in model.parameters())
    print(f"{name}: {count / 1e9:.3f}B parameters")
