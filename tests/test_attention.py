"""The causal reference/target rule: the one predicate; joint masked == decomposed == the
rule written out; the attention settings as one config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import relative_error

from consist_jax.models.attention import dot_product_attention, segment_mask
from consist_jax.models.attention_rule import has_reference_cache, segment_allows
from consist_jax.models.self_attention import AttentionConfig, reference_target_attention
from consist_jax.models.unet import UNetConfig

HEADS, DIM = 2, 8


def _qkv(rng, *lead):
    return tuple(jnp.asarray(rng.standard_normal((*lead, HEADS, DIM)).astype(np.float32)) for _ in range(3))


def _softmax_attend(q, k, v):
    """numpy oracle: q (Nq, H, D), k/v (Nk, H, D) -> (Nq, H, D)."""
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", w, v)


def _rule_written_out(ref, tgt, rule, reference_mask):
    """The rule's equations (docs/method.md), one example and one frame at a time, in float64."""
    (q_r, k_r, v_r), (q_t, k_t, v_t) = [[np.asarray(a, np.float64) for a in x] for x in (ref, tgt)]
    b, f = q_t.shape[:2]
    out_r, out_t = np.zeros(q_r.shape), np.zeros(q_t.shape)
    for i in range(b):
        if rule == "causal":
            out_r[i] = _softmax_attend(q_r[i], k_r[i], v_r[i])
        else:
            out_r[i] = _softmax_attend(
                q_r[i], np.concatenate([k_r[i], *k_t[i]]), np.concatenate([v_r[i], *v_t[i]])
            )
        for j in range(f):
            visible = reference_mask is None or reference_mask[i]
            keys = np.concatenate([k_r[i], k_t[i, j]]) if visible else k_t[i, j]
            values = np.concatenate([v_r[i], v_t[i, j]]) if visible else v_t[i, j]
            out_t[i, j] = _softmax_attend(q_t[i, j], keys, values)
    return out_r, out_t


@pytest.mark.parametrize("rule", ["causal", "full"])
@pytest.mark.parametrize("frames, n_ref, n_tgt", [(1, 6, 6), (1, 5, 9), (3, 12, 4), (2, 7, 5)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_joint_equals_decomposed_equals_rule(rng, rule, frames, n_ref, n_tgt, with_mask):
    b = 2
    ref, tgt = _qkv(rng, b, n_ref), _qkv(rng, b, frames, n_tgt)
    mask = jnp.asarray([True, False]) if with_mask else None
    joint = reference_target_attention(ref, tgt, rule=rule, impl="xla_joint", reference_mask=mask)
    decomposed = reference_target_attention(ref, tgt, rule=rule, impl="xla", reference_mask=mask)
    expected = _rule_written_out(ref, tgt, rule, None if mask is None else np.asarray(mask))
    for ours_j, ours_d, exp in zip(joint, decomposed, expected):
        assert relative_error(ours_d, ours_j) <= 1e-5
        assert relative_error(ours_d, exp) <= 1e-5


def test_segment_mask_blocks():
    """[[1, 0], [1, 1]] per frame, rows = queries; frames do not see each other."""
    m = np.asarray(segment_mask(2, 1, 2, "causal", None))[0, 0].astype(int)
    expected = np.array(
        [
            [1, 1, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 0, 1],
        ]
    )
    np.testing.assert_array_equal(m, expected)


def test_upcast_matches_float32_within_bf16(rng):
    q, k, v = _qkv(rng, 2, 16)
    exact = dot_product_attention(q, k, v)
    low = dot_product_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), upcast=True)
    assert low.dtype == jnp.bfloat16
    assert relative_error(low.astype(jnp.float32), exact) < 3e-2


def test_decomposed_never_computes_the_masked_block():
    """Compiled FLOPs follow N_r^2 + F N_t (N_r + N_t), not (N_r + F N_t)^2."""
    b, f, n, heads, dim = 1, 2, 256, 1, 64
    ref = tuple(jnp.ones((b, n, heads, dim)) for _ in range(3))
    tgt = tuple(jnp.ones((b, f, n, heads, dim)) for _ in range(3))

    def flops(impl):
        fn = jax.jit(lambda r, t: reference_target_attention(r, t, impl=impl))
        return fn.lower(ref, tgt).compile().cost_analysis()["flops"]

    ratio = flops("xla") / flops("xla_joint")
    ideal = (n * n + f * n * 2 * n) / ((n + f * n) ** 2)  # 5/9 here
    print(f"decomposed/joint FLOPs {ratio:.3f}, ideal {ideal:.3f}")
    assert abs(ratio - ideal) < 0.05


# Segments [reference, frame 1, frame 2, padding]; rows = queries (docs/method.md).
RULE_TABLES = {
    "causal": [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]],
    "full": [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]],
}


@pytest.mark.parametrize("rule", sorted(RULE_TABLES))
def test_segment_allows_is_the_rule_table(rule):
    """Which segment reads which, with padding and with CFG's dropped reference."""
    seg = np.array([0, 1, 2, -1])
    table = np.asarray(RULE_TABLES[rule], bool)
    np.testing.assert_array_equal(segment_allows(seg[:, None], seg[None, :], rule), table)
    dropped = table.copy()
    dropped[1:3, 0] = False  # only the targets lose the reference
    np.testing.assert_array_equal(segment_allows(seg[:, None], seg[None, :], rule, False), dropped)


def test_only_the_causal_rule_has_a_reference_cache():
    assert has_reference_cache("causal") and not has_reference_cache("full")
    with pytest.raises(ValueError, match="attention_rule='sliding'"):
        has_reference_cache("sliding")


def test_unet_config_builds_one_attention_config():
    config = UNetConfig(attention_rule="full", attention_impl="xla_joint", upcast_attention=True)
    assert config.attention == AttentionConfig(rule="full", impl="xla_joint", upcast=True)
    for bad, message in [(dict(attention_impl="flash"), "attention_impl='flash'"),
                         (dict(attention_rule="sliding"), "attention_rule='sliding'")]:
        with pytest.raises(ValueError, match=message):
            UNetConfig(**bad)
