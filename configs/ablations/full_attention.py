"""Ablation: bidirectional reference/target attention instead of SCD's causal rule
(the reference also attends to the target; no reference cache is possible)."""
from configs.demo import get_config as demo_config


def get_config():
    c = demo_config()
    c.model.unet.attention_rule = "full"
    return c
