"""TFDS builders for TikTok and UBC Fashion from a local copy.

Importing this package needs nothing beyond the core dependencies. The builders
themselves (`consist_jax.data.tfds.tiktok.Tiktok`,
`consist_jax.data.tfds.ubc_fashion.UbcFashion`) import tensorflow_datasets, which
comes with the `data` extra: `pip install -e .[data]`. Everything they do lives in
local_videos.py and splits.py, plain Python.
"""
