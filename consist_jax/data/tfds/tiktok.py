"""TFDS builder `tiktok`: the TikTok dance videos (Jafarian & Park, 2021) from a local copy.

    tfds build consist_jax/data/tfds/tiktok.py --manual_dir=ROOT   # or:
    from consist_jax.data.tfds.tiktok import Tiktok
    Tiktok(data_dir=OUT).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=ROOT))

ROOT is TikTok_dataset/ itself (ROOT/00001/images/0001.png, masks/0001.png) plus poses
per video (layout: local_videos.py). Split: DisCo's, test = videos 335-340, unless
ROOT/splits/*.txt or split_files= say otherwise. Needs tensorflow_datasets.
"""
from consist_jax.data.tfds import splits
from consist_jax.data.tfds.builder import LocalVideoBuilder


class Tiktok(LocalVideoBuilder):
    """TikTok dance videos, one record per video."""

    HOMEPAGE = "https://www.yasamin.page/hdnet_tiktok"
    FPS = 30.0

    def split_ids(self, video_ids, split_files):
        return splits.tiktok_splits(video_ids, split_files)
