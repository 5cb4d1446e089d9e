"""Random access to the video records of a split, one ArrayRecord reader per shard file.

grain's own ArrayRecordDataSource returns bare bytes; this source also says where a
record came from (global index, file, position), so a bad record can be named in an
error, and it turns a read failure (a corrupt chunk) into a value instead of an
exception, so the pipeline can decide between raising and skipping.
"""
from __future__ import annotations

import bisect
import dataclasses
import os
import threading
from typing import Sequence

from array_record.python import array_record_module

from consist_jax.data.records import RecordError, VideoExample, decode_video
from consist_jax.data.shards import count_records, find_split_files


@dataclasses.dataclass(frozen=True)
class RawVideoRecord:
    """One record as read from disk: `data` is None when reading failed (`read_error` says why)."""

    index: int
    path: str
    position: int
    data: bytes | None
    read_error: str | None = None

    def where(self) -> str:
        return f"record {self.index} ({os.path.basename(self.path)}, position {self.position})"

    def decode(self, frame_indices: Sequence[int] | None = None) -> VideoExample:
        """The video (or the frames at `frame_indices`); a RecordError that names this record's
        file and position if it could not be read or decoded."""
        if self.data is None:
            raise RecordError(f"{self.where()}: unreadable: {self.read_error}")
        try:
            return decode_video(self.data, frame_indices)
        except RecordError as error:
            raise RecordError(f"{self.where()}: {error}") from None


class VideoRecordSource:
    """grain RandomAccessDataSource over ArrayRecord shard files.

    Picklable (grain's worker processes get a copy); readers are opened lazily in
    whichever process reads.
    """

    def __init__(self, paths: Sequence[str]):
        self._paths = [os.fspath(p) for p in paths]
        counts = [count_records(p) for p in self._paths]
        self._ends = [sum(counts[:i + 1]) for i in range(len(counts))]
        self._readers: list = [None] * len(self._paths)
        self._lock = threading.Lock()

    @classmethod
    def for_split(cls, data_dir: str, split: str) -> "VideoRecordSource":
        return cls(find_split_files(data_dir, split))

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """Global record index -> (shard file index, position in that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range [0, {len(self)})")
        file_index = bisect.bisect_right(self._ends, index)
        start = self._ends[file_index - 1] if file_index else 0
        return file_index, index - start

    def __getitem__(self, index) -> RawVideoRecord:
        index = int(index)
        file_index, position = self.locate(index)
        path = self._paths[file_index]
        try:
            data = self._reader(file_index).read([position])[0]
        except Exception as error:  # array_record raises RuntimeError on a bad chunk
            return RawVideoRecord(index, path, position, None, f"{type(error).__name__}: {error}")
        return RawVideoRecord(index, path, position, data)

    def _reader(self, file_index: int):
        if self._readers[file_index] is None:
            with self._lock:
                if self._readers[file_index] is None:
                    # No readahead: records are read one at a time, in random order.
                    self._readers[file_index] = array_record_module.ArrayRecordReader(
                        self._paths[file_index], "readahead_buffer_size:0")
        return self._readers[file_index]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = [None] * len(self._paths)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # grain compares this string when restoring an iterator's state: keep it stable.
        return f"VideoRecordSource(paths={self._paths!r}, num_records={len(self)})"
