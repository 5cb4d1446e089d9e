"""Data: the per-video record format, the synthetic people set, TikTok / UBC Fashion
builders, and the grain pipeline that turns records into batches of clips.

    records.py    encode/decode of one video record (the on-disk format, documented there)
    shards.py     shard file naming, writing and finding (TFDS-compatible names)
    synthetic.py  procedural people videos; CLI: python -m consist_jax.data.synthetic
    source.py     random access to a split's records (grain data source)
    clips.py      record -> clip: frame sampling, crop/resize/flip, pose rendering
    pipeline.py   make_pipeline(config, split, seed=...) -> checkpointable batch iterator
    tfds/         local-copy scanners and split rules; TFDS builders (need tensorflow_datasets)
"""
