"""Which local videos form which split, for the TikTok and UBC Fashion builders.

Split-list files: one video id per line; a line may also be a URL or a path, whose
file stem is the id (UBC Fashion's official fashion_train.txt / fashion_test.txt list
video URLs). Blank lines and lines starting with # are ignored. ROOT/splits/<split>.txt
files are picked up automatically.

TikTok default (no lists): DisCo's split, used by the human-animation papers that
compare on TikTok: test = videos 335-340, train = every other video.
UBC Fashion: no default; give the official lists (500 train / 100 test videos).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

TIKTOK_TEST_VIDEOS = range(335, 341)  # DisCo's TikTok test videos, by number


def read_split_list(path: str | os.PathLike) -> list[str]:
    """Video ids from a split file (ids, URLs or paths; the file stem is the id)."""
    ids = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(Path(line.rstrip("/").split("/")[-1]).stem)
    return ids


def default_split_files(root: str | os.PathLike) -> dict:
    """{split: path} for the ROOT/splits/<split>.txt files that exist."""
    folder = Path(root) / "splits"
    return {p.stem: p for p in sorted(folder.glob("*.txt"))} if folder.is_dir() else {}


def splits_from_lists(video_ids: Sequence[str], split_files: Mapping[str, os.PathLike]) -> dict:
    """{split: [ids]} from {split: list file}; every listed id must exist locally."""
    known = set(video_ids)
    splits = {}
    for split, path in split_files.items():
        listed = read_split_list(path)
        missing = [v for v in listed if v not in known]
        if missing:
            raise FileNotFoundError(f"split {split!r} ({path}) lists {len(missing)} videos not "
                                    f"found locally, e.g. {missing[:3]}")
        splits[split] = listed
    _check_disjoint(splits)
    return splits


def tiktok_splits(video_ids: Sequence[str], split_files: Mapping | None = None) -> dict:
    """Split lists if given, else DisCo's: test = videos 335-340 (ids are numbers, "00335")."""
    if split_files:
        return splits_from_lists(video_ids, split_files)
    splits = {"train": [], "test": []}
    for video_id in video_ids:
        if not video_id.isdigit():
            raise ValueError(f"TikTok video id {video_id!r} is not a number: give split lists")
        splits["test" if int(video_id) in TIKTOK_TEST_VIDEOS else "train"].append(video_id)
    return splits


def ubc_fashion_splits(video_ids: Sequence[str], split_files: Mapping | None = None) -> dict:
    """The official lists are required: UBC Fashion ids carry no split."""
    if not split_files:
        raise FileNotFoundError("UBC Fashion needs split lists (ROOT/splits/train.txt and "
                                "test.txt, e.g. the official fashion_train.txt/fashion_test.txt)")
    return splits_from_lists(video_ids, split_files)


def _check_disjoint(splits: Mapping[str, Sequence[str]]) -> None:
    seen = {}
    for split, ids in splits.items():
        for video_id in ids:
            if seen.setdefault(video_id, split) != split:
                raise ValueError(f"video {video_id!r} is in both {seen[video_id]!r} and {split!r}")
