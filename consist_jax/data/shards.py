"""Where a split's ArrayRecord shards live, how they are written and counted.

Shard files follow the TFDS naming, so a synthetic set and a TFDS-built set look
alike on disk and the pipeline finds both the same way:

    DIR/{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import math
import os
import re
from typing import Iterable

from array_record.python import array_record_module

from consist_jax import files
from consist_jax.data.records import RecordError

# group_size:1 makes every record its own chunk: random access reads one record.
WRITER_OPTIONS = "group_size:1"
_SHARD_PATTERN = re.compile(r"^(?P<name>.+)-(?P<split>[^-]+)\.array_record-(\d{5})-of-(\d{5})$")


def shard_paths(out_dir: str, name: str, split: str, num_shards: int) -> list[str]:
    return [os.path.join(out_dir, f"{name}-{split}.array_record-{i:05d}-of-{num_shards:05d}")
            for i in range(num_shards)]


def count_records(path: str) -> int:
    """Records in one shard; a shard that cannot be opened is an error in every mode
    (its records cannot even be counted, let alone skipped one by one)."""
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        # A truncated shard loses its footer: the reader opens "not ok", or close() raises.
        count = reader.num_records() if reader.ok() else None
        reader.close()
    except RuntimeError:
        count = None
    if count is None:
        raise RecordError(f"cannot read ArrayRecord file {path} (truncated or not an "
                          f"ArrayRecord file); rewrite or remove the shard")
    return count


def write_records(path: str, encoded_records: Iterable[bytes]) -> int:
    """Writes records to one ArrayRecord file; returns how many.

    Written under a temporary name, its records counted back, then renamed: a failed
    write (a full disk) raises files.WriteError naming ``path`` and leaves no file."""
    count = 0

    def all_records_read_back(tmp):
        if count_records(tmp) != count:
            raise ValueError(f"wrote {count} records but {count_records(tmp)} read back")

    with files.atomic_path(path, all_records_read_back) as tmp:
        writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
        try:
            for record in encoded_records:
                writer.write(record)
                count += 1
        finally:
            writer.close()
    return count


def write_split_shards(out_dir: str, name: str, split: str, encoded_records: Iterable[bytes],
                       num_records: int, records_per_shard: int) -> list[str]:
    """Writes `num_records` records in order over ceil(num_records / records_per_shard) shards.

    A split is all its shards or none: a failure removes the shards written before it."""
    num_shards = max(1, math.ceil(num_records / records_per_shard))
    paths = shard_paths(out_dir, name, split, num_shards)
    iterator = iter(encoded_records)
    written = 0
    try:
        for path in paths:
            take = min(records_per_shard, num_records - written)
            written += write_records(path, itertools.islice(iterator, take))
        if written != num_records:
            raise ValueError(f"expected {num_records} records for split {split!r}, got {written}")
    except Exception:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise
    return paths


def find_split_files(data_dir: str, split: str) -> list[str]:
    """Sorted shard files of `split` in data_dir (synthetic or TFDS-built)."""
    candidates = glob.glob(os.path.join(glob.escape(data_dir), f"*-{split}.array_record-*"))
    files = sorted(p for p in candidates
                   if (m := _SHARD_PATTERN.match(os.path.basename(p))) and m["split"] == split)
    if not files:
        raise FileNotFoundError(f"no '{split}' ArrayRecord shards in {data_dir} "
                                f"(expected NAME-{split}.array_record-SSSSS-of-NNNNN)")
    return files

