"""The TFDS side of the local-video builders: a thin GeneratorBasedBuilder.

Needs tensorflow_datasets (the `data` extra). Each example is one video, stored as
the record of consist_jax.data.records in the bytes feature "video_record" (plus
its ids and frame count for browsing with tfds). Files are ArrayRecord by default,
named NAME-SPLIT.array_record-SSSSS-of-NNNNN, so make_pipeline reads a TFDS build
directory (e.g. ~/tensorflow_datasets/tiktok/1.0.0) directly.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from consist_jax.data import records
from consist_jax.data.tfds import local_videos, splits


class LocalVideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the TikTok / UBC Fashion builders: subclasses set the class attributes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per video, consist_jax record format 1."}
    HOMEPAGE = ""
    FPS = 30.0
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Arrange the videos in the manual directory as described in "
        "consist_jax/data/tfds/local_videos.py (ROOT/<video_id>/images|video.mp4, poses...).")

    def __init__(self, *, file_format: str = "array_record", split_files: dict | None = None,
                 build_options: local_videos.BuildOptions | None = None, **kwargs):
        self._split_files = split_files
        self._build_options = build_options or local_videos.BuildOptions(fps=self.FPS)
        super().__init__(file_format=file_format, **kwargs)

    def split_ids(self, video_ids, split_files):
        """{split: [video ids]}; each subclass applies its dataset's convention."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                records.TFDS_FEATURE_NAME: tfds.features.Tensor(shape=(), dtype=np.object_),
                "video_id": tfds.features.Text(),
                "identity_id": tfds.features.Text(),
                "num_frames": tfds.features.Scalar(dtype=np.int64),
            }),
            homepage=self.HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir
        videos = local_videos.scan_local_videos(root)
        split_files = self._split_files or splits.default_split_files(root)
        split_ids = self.split_ids([v.video_id for v in videos], split_files)
        return {split: self._generate_examples(local_videos.select_videos(videos, ids))
                for split, ids in split_ids.items()}

    def _generate_examples(self, videos):
        for video in videos:
            example = local_videos.build_video_example(video, self._build_options)
            yield video.video_id, {
                records.TFDS_FEATURE_NAME: records.encode_video(
                    example, image_encoding=self._build_options.image_encoding),
                "video_id": example.video_id,
                "identity_id": example.identity_id,
                "num_frames": example.num_frames,
            }
