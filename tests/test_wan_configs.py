"""configs/wan_1_3b_scd.py and wan_14b_scd.py: the DiT builds abstractly (nothing
allocated), WAN_PARAM_RULES split every large kernel over fsdp, and the train step of a
tiny variant of the 1.3B config lowers on CPU."""
import dataclasses
import importlib
import math

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from consist_jax.convert.wan import transformer_param_shapes
from consist_jax.factory import build_model, wan_config_from
from consist_jax.models.wan_scd import init_wan_scd_params
from consist_jax.models.wan_transformer import WanTransformerConfig
from consist_jax.training import sharding
from consist_jax.training.compile_report import abstract_batch
from consist_jax.training.trainer import build_train_program

# Each config's transformer (tests/test_wan_transformer.py checks these against diffusers').
WAN21 = {"wan_1_3b_scd": WanTransformerConfig.wan21_t2v_1_3b, "wan_14b_scd": WanTransformerConfig.wan21_t2v_14b}
VAE_FACTOR, VAE_TEMPORAL_FACTOR = 8, 4  # Wan2.1 VAE: 8x in space, 4x in time


# Blocks are alike, and tracing 40 of them costs seconds: two at the configs' widths (the
# full depths are test_wan_transformer.py's named configs).
LAYERS = 2


def _abstract_params(config):
    dit = wan_config_from(dict(config.model.wan, num_layers=LAYERS), pose_factor=VAE_FACTOR,
                          pose_temporal_factor=VAE_TEMPORAL_FACTOR)
    return dit, jax.eval_shape(lambda: init_wan_scd_params(dit, jax.random.key(0)))


@pytest.mark.parametrize("name", sorted(WAN21))
def test_config_builds_abstractly_and_shards_over_fsdp(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.model.wan.num_layers == WAN21[name]().num_layers
    dit, params = _abstract_params(config)
    assert dit.transformer.dtype == np.dtype("bfloat16") and dit.transformer.remat and dit.pose_channels == 3 * 4 * 8 ** 2
    pose = params.pop("pose_patch_embedding")
    shape = lambda tree: jax.tree_util.tree_map(lambda a: a.shape, tree)  # noqa: E731
    assert shape(params) == shape(transformer_param_shapes(
        dataclasses.replace(WAN21[name](), num_layers=LAYERS)))  # a load_transformer tree plugs in
    params["pose_patch_embedding"] = pose
    fsdp = 4  # v5p-8's chips
    mesh = AbstractMesh((1, fsdp), config.mesh.axes)
    specs = sharding.param_shardings({"params": params}, mesh, rules=config.mesh.param_rules)
    for path, leaf in jax.tree_util.tree_leaves_with_path({"params": params}):
        spec, where = _leaf(specs, path).spec, sharding.leaf_path(path)
        # Kernels split; the rest (biases, norms, the (1, 6, D) modulation tables) replicated.
        if where.endswith("/kernel") and math.prod(leaf.shape) >= config.mesh.fsdp_min_size:
            assert "fsdp" in spec, (where, leaf.shape, spec)
        else:
            assert spec == P(), (where, leaf.shape, spec)


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_tiny_variant_train_step_lowers():
    config = importlib.import_module("configs.wan_1_3b_scd").get_config()
    config.data.pipeline.update(resolution=(16, 16), clip_length=2)
    config.model.codec = dict(kind="pixel", factor=2)
    config.model.wan.update(num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=12,
                            text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2)
    config.train.global_batch_size = 2
    model, _, frozen = build_model(config.model, jax.random.key(0), init_params=False)
    params = jax.eval_shape(lambda: init_wan_scd_params(model.unet.config, jax.random.key(0)))
    mesh = sharding.mesh_from_config(config.mesh, jax.devices()[:1])
    program = build_train_program(config, model, params, frozen, mesh)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh):
        lowered = program.step.lower(program.abstract_state, abstract_batch(config, 2, model), rng, frozen)
    assert "bf16" in lowered.as_text()  # the compute dtype reached the step
