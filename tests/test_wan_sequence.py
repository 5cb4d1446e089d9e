"""The DiT's sequence axis (model.wan.sequence_axis, consist_jax/parallel/sequence.py) on
8 CPU devices: the tokens of each clip split over a mesh axis give the unsharded numbers
(joint forward, the reference pass and its cache, the cached pass, one train step) and
the hidden states really live split."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from consist_jax.models.wan_transformer import WanTransformerConfig
from consist_jax.parallel.sequence import split_tokens

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from consist_jax.models.wan_scd import WanSCD, WanSCDConfig, init_wan_scd_params
    from consist_jax.models.wan_transformer import WanTransformerConfig
    from consist_jax.training import sharding

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(int(sys.argv[1]))
    base = WanTransformerConfig(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                out_channels=4, text_dim=8, freq_dim=16, ffn_dim=32, num_layers=1,
                                rope_max_seq_len=16)
    model = lambda axis: WanSCD(WanSCDConfig(dataclasses.replace(base, sequence_axis=axis)))
    shapes = jax.eval_shape(lambda: init_wan_scd_params(WanSCDConfig(base), jax.random.key(0)))
    params = jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    b, f, hw = 2, 3, 8  # 3 frames of 4x4 patches: 48 target tokens, 16 reference tokens
    sample = rng.standard_normal((b, f, hw, hw, 4)).astype(np.float32)
    reference = rng.standard_normal((b, hw, hw, 4)).astype(np.float32)
    t = rng.integers(0, 1000, (b,))
    context = rng.standard_normal((b, 5, 8)).astype(np.float32)

    def programs(m):
        joint = lambda p, x, r: m.apply({"params": p}, x, t, context, reference=r)
        extract = lambda p, r: m.apply({"params": p}, r, None, context, method="extract_reference",
                                       mutable=["reference_cache"])[1]["reference_cache"]
        cached = lambda p, x, c: m.apply({"params": p, "reference_cache": c}, x, t, context,
                                         use_reference_cache=True)
        return joint, extract, cached

    def run(m, x, r):
        joint, extract, cached = programs(m)
        compiled = jax.jit(joint).lower(params, x, r).compile()
        cache = jax.jit(extract)(params, r)
        return compiled, compiled(params, x, r), cache, jax.jit(cached)(params, x, cache)

    _, plain, plain_cache, plain_cached = run(model(None), sample, reference)
    mesh = sharding.make_mesh(("data", "sequence"), (2, 4))
    with jax.set_mesh(mesh):
        on_data = NamedSharding(mesh, P("data"))
        x, r = jax.device_put(sample, on_data), jax.device_put(reference, on_data)
        compiled, out, cache, cached = run(model("sequence"), x, r)
    rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
                             / np.abs(np.asarray(b, np.float64)).max())
    hlo = compiled.as_text()
    blocks = [line for line in hlo.splitlines() if "/blocks." in line]  # the ops inside the blocks
    print(json.dumps(dict(
        joint=rel(out, plain), cached=rel(cached, plain_cached),
        cache=max(rel(a, b) for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(plain_cache))),
        # inside the blocks one clip's 48 target tokens (width 16) are a quarter per device
        split_hidden=any("[1,12,16]" in line for line in blocks), whole_hidden=any("[1,48,16]" in line for line in blocks),
        all_gather="all-gather" in hlo,
        cache_spec=str(jax.tree.leaves(cache)[0].sharding.spec))))
    """
)

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from consist_jax import factory
    from consist_jax.training import sharding
    from consist_jax.training.compile_report import abstract_batch
    from consist_jax.training.state import create_train_state
    from consist_jax.training.trainer import build_train_program
    from tests.configs.tiny_dit import get_config

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(int(sys.argv[1]))
    config = get_config()
    config.model.wan.num_layers = 1  # one block, no EMA: the smallest compiles
    config.optim.ema_decay = 0.0
    config.mesh.update(axes=("data", "fsdp", "sequence"), shape=(2, 1, 4))
    batch = {k: (rng.integers(0, 8, s.shape) if s.dtype == np.int32 else rng.random(s.shape)).astype(s.dtype)
             for k, s in abstract_batch(config, config.train.global_batch_size).items()}
    key = jax.random.key(int(rng.integers(0, 2**31)))
    model, params, frozen = factory.build_model(config.model, jax.random.key(0))
    params = jax.tree_util.tree_map(np.asarray, params)  # on the host: each step's donated state is a copy
    config.model.wan.sequence_axis = "sequence"
    split_model = factory.build_model(config.model, jax.random.key(0), init_params=False)[0]

    def one_step(model, mesh):
        program = build_train_program(config, model, params, frozen, mesh)
        state = create_train_state(params, program.optimizer, ema=False)
        with jax.set_mesh(mesh):
            _, metrics = program.step(jax.device_put(state, program.state_sharding),
                                      jax.device_put(batch, program.batch_sharding), key, frozen)
        return {k: float(v) for k, v in metrics.items()}

    # The unsharded step on one device; the split one on data=2 x sequence=4.
    plain = one_step(model, sharding.make_mesh(config.mesh.axes, (1, 1, 1), jax.devices()[:1]))
    split = one_step(split_model, sharding.mesh_from_config(config.mesh))
    print(json.dumps({k: abs(split[k] - plain[k]) / abs(plain[k]) for k in ("loss", "grad_norm")}))
    """
)


def _run(script: str, rng) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    seed = int(rng.integers(0, 2**31))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, str(seed)], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# float32 sums taken in another order (sharded reductions, gathered attention): a few
# ulps per op through two blocks, far below this bar (the project's network parity bar).
TOLERANCE = 1e-4


def test_sequence_parallel_dit_equals_unsharded(rng):
    """2 clips x (16 reference + 48 target tokens) over data=2 x sequence=4."""
    result = _run(SCRIPT, rng)
    print(result)
    assert max(result["joint"], result["cached"], result["cache"]) <= TOLERANCE, result
    assert result["split_hidden"] and not result["whole_hidden"], "each device should hold 12 of 48 tokens"
    assert result["all_gather"], "self-attention should gather keys and values across the sequence axis"
    assert "sequence" not in result["cache_spec"], result["cache_spec"]  # the cache holds every token


def test_sequence_parallel_train_step_equals_unsharded(rng):
    """One train step of tests/configs/tiny_dit.py on mesh data=2 x sequence=4: same loss, same gradients."""
    result = _run(TRAIN_SCRIPT, rng)
    print(result)
    assert max(result.values()) <= TOLERANCE, result


def test_sequence_axis_is_checked():
    with pytest.raises(ValueError, match="sequence_axis=3"):
        WanTransformerConfig(sequence_axis=3)
    x = jax.numpy.zeros((1, 4, 2))
    with pytest.raises(ValueError, match=r"sequence_axis='sequence' needs a mesh with that axis"):
        jax.jit(lambda x: split_tokens(x, "sequence"))(x)
