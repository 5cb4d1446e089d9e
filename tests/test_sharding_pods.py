"""Pod-shaped meshes (slices over DCN, FSDP over ICI), ordered sharding rules, and the
training profiler. The meshes are built from TPU topologies libtpu describes on this
CPU host (nothing runs on them)."""
import glob
import logging

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from consist_jax.training import compile_report as cr
from consist_jax.training import sharding
from consist_jax.training.trainer import _Profile


def test_hybrid_mesh_keeps_fsdp_within_a_slice():
    """Data parallel across 2 slices over DCN, FSDP over the 16 chips of each slice."""
    devices = cr.tpu_devices("v5e-16", num_slices=2)
    mesh = sharding.make_mesh(("data", "fsdp"), (1, -1), devices, dcn_shape=(2, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 16}
    for data_index, row in enumerate(mesh.devices):
        assert {d.slice_index for d in row} == {data_index}


def test_dcn_shape_must_match_the_slices():
    devices = cr.tpu_devices("v5e-16", num_slices=2)
    with pytest.raises(ValueError, match=r"mesh.dcn_shape \(4, 1\).*2 slice"):
        sharding.make_mesh(("data", "fsdp"), (1, -1), devices, dcn_shape=(4, 1))


def test_param_rules_first_match_decides_and_replication_is_logged(caplog):
    mesh = sharding.make_mesh(("data", "fsdp"), (1, -1), cr.tpu_devices("v5e-8"))
    leaf = jax.ShapeDtypeStruct
    tree = {
        "params": {
            "motion_modules.0": {"proj": {"kernel": leaf((320, 640), jnp.float32)}},
            "conv_in": {"kernel": leaf((3, 3, 4, 320), jnp.float32)},
            "odd": {"kernel": leaf((5, 3), jnp.float32)},
            "norm": {"scale": leaf((320,), jnp.float32)},
        }
    }
    rules = [
        (r"motion_modules.*kernel$", (None, "fsdp")),
        (r"odd", ("fsdp", None)),
        (r"conv_in", "fsdp"),
    ]
    with caplog.at_level(logging.WARNING):
        out = sharding.param_shardings(tree, mesh, min_size=1, rules=rules)
    specs = jax.tree.map(lambda s: s.spec, out)["params"]
    assert specs["motion_modules.0"]["proj"]["kernel"] == P(None, "fsdp")
    assert specs["conv_in"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["odd"]["kernel"] == P() and specs["norm"]["scale"] == P()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "params/odd/kernel (5, 3) is replicated" in logged
    assert "params/norm/scale (320,) is replicated: no mesh.param_rules entry matches" in logged


def test_param_rules_name_unknown_axes():
    mesh = sharding.make_mesh(("data", "fsdp"), (1, -1), cr.tpu_devices("v5e-8"))
    tree = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}
    with pytest.raises(ValueError, match=r"mesh.param_rules 'w': axes \['model'\]"):
        sharding.param_shardings(tree, mesh, rules=[("w", ("model", None))])


def test_profile_steps_write_a_trace(tmp_path):
    """log.profile_steps=(1, 2): one trace over steps 1..2, where TensorBoard finds it."""
    profile = _Profile((2, 1), str(tmp_path))
    step = jax.jit(lambda x: x * 2 + 1)
    x = jnp.ones((4,))
    for i in range(4):
        profile.before(i)
        x = step(x)
        profile.after(i, x)
        assert profile.active == (i == 1)
    profile.stop()
    assert glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
