"""Ablation: no reference-pose injection (only the target pose goes through the pose encoder)."""
from configs.demo import get_config as demo_config


def get_config():
    c = demo_config()
    c.model.unet.reference_pose_injection = False
    return c
