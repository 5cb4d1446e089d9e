"""TFDS builder `ubc_fashion`: the UBC Fashion videos (Zablotskaia et al., 2019) from a local copy.

    tfds build consist_jax/data/tfds/ubc_fashion.py --manual_dir=ROOT

ROOT/<video_id>/video.mp4 (move each of the dataset's mp4s into a folder of its name)
plus poses per video (layout: local_videos.py), and the official split lists as
ROOT/splits/train.txt and ROOT/splits/test.txt (fashion_train.txt / fashion_test.txt,
500 / 100 videos; URLs are fine, the file stem is the video id) or split_files=.
Needs tensorflow_datasets.
"""
from consist_jax.data.tfds import splits
from consist_jax.data.tfds.builder import LocalVideoBuilder


class UbcFashion(LocalVideoBuilder):
    """UBC Fashion catwalk videos, one record per video."""

    HOMEPAGE = "https://vision.cs.ubc.ca/datasets/fashion/"
    FPS = 30.0

    def split_ids(self, video_ids, split_files):
        return splits.ubc_fashion_splits(video_ids, split_files)
