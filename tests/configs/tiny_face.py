"""The tiny run (tests/configs/tiny.py) on the face-reenactment data of
configs/face_reenact.py: 16x16 synthetic faces, face68 poses.

The data directory comes from the environment (CONSIST_TEST_FACE_DATA)."""
import os

from configs.face_reenact import get_config as face_config
from tests.configs.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.data.synthetic = dict(face_config().data.synthetic, identities=8, frames=8, size=16)
    c.data.pipeline.update(data_dir=os.environ.get("CONSIST_TEST_FACE_DATA", "data_cache/tiny_faces_16"))
    return c
