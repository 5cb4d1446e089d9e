"""SCD's attention rule, in one place: which query segment may read which key segment.

A self-attention layer sees one reference and F target frames as segments of a joint
sequence ``[R ; T_1 ; ... ; T_F]`` (docs/method.md, "The causal rule"): segment id 0 is
the reference, f >= 1 target frame f, and -1 padding (kernels pad to their block size).

    causal (SCD):  R reads R;            T_f reads R and T_f
    full (ablation): R reads every real token; T_f reads R and T_f

and a per-example ``reference_mask`` (CFG's "reference dropped" branch) hides R from the
targets. ``segment_allows`` is that table; every form of the rule asks it: the joint
mask (``attention.segment_mask``), the splash kernel's block mask, and the decomposed
forms (through ``reference_reads_targets``). The sampler asks ``has_reference_cache``.
Plain numpy and jax operators only, so it serves static (numpy) and traced masks alike.
"""
from __future__ import annotations

from typing import Any

ATTENTION_RULES = ("causal", "full")
REFERENCE_SEGMENT = 0
PAD_SEGMENT = -1


def check_choice(name: str, value: str, choices) -> None:
    """One-line ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}")


def check_rule(rule: str) -> str:
    check_choice("attention_rule", rule, ATTENTION_RULES)
    return rule


def segment_allows(q_seg: Any, k_seg: Any, rule: str, reference_visible: Any = True) -> Any:
    """True where a query of segment ``q_seg`` may read a key of segment ``k_seg``.

    q_seg, k_seg: segment ids (ints or numpy / jax int arrays, broadcast together);
    reference_visible: True, or a bool array broadcastable against them (False: the
    reference is dropped for that example's targets). Every segment reads itself; a
    target frame reads the reference where visible; under the full rule the reference
    reads every real token. A padding query reads everything (no row is left empty) and
    a padding key is read by padding queries only.
    """
    check_rule(rule)
    own = q_seg == k_seg
    target_reads_reference = (q_seg > REFERENCE_SEGMENT) & (k_seg == REFERENCE_SEGMENT) & reference_visible
    allowed = own | target_reads_reference | (q_seg == PAD_SEGMENT)
    if rule == "full":
        allowed = allowed | ((q_seg == REFERENCE_SEGMENT) & (k_seg > REFERENCE_SEGMENT))
    return allowed


def reference_reads_targets(rule: str) -> bool:
    """Whether the reference's queries read the target frames (the full rule)."""
    return bool(segment_allows(REFERENCE_SEGMENT, REFERENCE_SEGMENT + 1, rule))


def has_reference_cache(rule: str) -> bool:
    """Whether the reference's keys/values can be computed once and cached for sampling:
    only if nothing of the targets flows into the reference."""
    return not reference_reads_targets(rule)
