"""Verified, atomic file writes: a file the project writes is whole or absent.

A writer (ffmpeg, PIL, ArrayRecord, json) writes to a temporary name in the target's
folder; the result is checked (non-empty, plus the caller's check, e.g. the frame
count read back) and only then renamed onto the target. On any failure the partial
file is removed and a ``WriteError`` names the target path, so a full disk or a
rejected setting never leaves a 0-byte or truncated file that looks like a result.

    with atomic_path("out.mp4", check=lambda tmp: ...) as tmp:
        writer(tmp)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Callable, Iterator, Optional


class WriteError(OSError):
    """A file could not be written (or failed its check); no partial file is left."""


def temporary_name(path: str) -> str:
    """A hidden name next to ``path`` that keeps its suffix (writers pick formats by it)."""
    folder, base = os.path.split(os.path.abspath(path))
    stem, suffix = os.path.splitext(base)
    return os.path.join(folder, f".{stem}.partial-{os.getpid()}{suffix}")


def ensure_folder(folder: str) -> None:
    """``os.makedirs`` with a WriteError that names the folder (e.g. a parent is a file)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create folder {folder!r}: {e.strerror or e}") from e


def check_can_create(path: str, what: str = "output") -> None:
    """Refuses, before any work, a ``path`` under a plain file (its folder cannot be made)."""
    ancestor = os.path.dirname(os.path.abspath(path.rstrip("/")))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise FileExistsError(f"cannot write {what} {path!r}: {ancestor!r} is a file, not a folder")


def _describe(error: BaseException) -> str:
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    text = " ".join(text.split()) or type(error).__name__  # one line, whatever the writer printed
    return text if len(text) <= 300 else "..." + text[-300:]  # ffmpeg's log ends with its reason


@contextlib.contextmanager
def atomic_path(path: str, check: Optional[Callable[[str], None]] = None) -> Iterator[str]:
    """Yields a temporary path; after the block, checks it and renames it onto ``path``.

    The check: the file exists and is non-empty, then ``check(temporary path)`` (raise to
    refuse). Any error inside the block or the checks removes the temporary file and
    raises WriteError naming ``path``.
    """
    ensure_folder(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(path):
        raise WriteError(f"cannot write {path!r}: it is a folder")
    tmp = temporary_name(path)
    try:
        yield tmp
        if not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
            raise WriteError("the writer produced no data")
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # KeyboardInterrupt too: never leave the partial file
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if not isinstance(e, Exception):
            raise
        raise WriteError(f"cannot write {path!r}: {_describe(e)}") from e


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yields a temporary folder next to ``path``; after the block, it replaces ``path`` (a
    folder of that name is deleted first: only for folders the project owns, e.g. an
    evaluated example). On any error the temporary folder is removed, ``path`` is left as
    it was, and a WriteError raised inside names ``path`` instead of the temporary folder."""
    import shutil

    ensure_folder(os.path.dirname(os.path.abspath(path)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WriteError(f"cannot write folder {path!r}: it is a file")
    tmp = temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ensure_folder(tmp)
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except WriteError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(str(e).replace(tmp, os.path.abspath(path))) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str, data: bytes) -> None:
    """``data`` to ``path`` atomically, synced to disk and its size checked."""

    def same_size(tmp):
        if os.path.getsize(tmp) != len(data):
            raise WriteError(f"wrote {os.path.getsize(tmp)} of {len(data)} bytes")

    with atomic_path(path, same_size) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk can fail only here, on delayed allocation


def write_json(path: str, value: Any, indent: Optional[int] = 2) -> None:
    """``value`` as JSON to ``path`` atomically (serialised first: a bad value writes nothing)."""
    write_bytes(path, (json.dumps(value, indent=indent) + "\n").encode("utf-8"))


def write_npz(path: str, **arrays) -> str:
    """Arrays to an uncompressed ``.npz`` atomically (``.npz`` appended when missing, as
    ``np.savez`` does); returns the path written. Never pickles (object arrays refused)."""
    import numpy as np

    path = os.fspath(path)
    path = path if path.endswith(".npz") else path + ".npz"
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    write_bytes(path, buffer.getvalue())
    return path
