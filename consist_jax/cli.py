"""What train.py, sample.py and evaluate.py share: a user error is one line and exit code 2;
XLA:CPU's freed memory kept for reuse (``keep_freed_memory_on_cpu``).

    app.run(cli.reports_user_errors(main))

A user error is a bad flag, config key, input or output path, or a write that failed
(``USER_ERRORS`` and the project's named errors, e.g. a checkpoint the disk did not
take); anything else is a bug and keeps its traceback. ``CONSIST_TRACEBACK=1`` or ``--verbosity>=1`` shows the traceback of a user
error too.
"""
from __future__ import annotations

import functools
import os
import sys

from consist_jax.files import WriteError

USER_ERROR_EXIT_CODE = 2
# ValueError covers CheckpointError, RecordError, ClipError; FileNotFoundError covers
# WeightsUnavailable. The OSErrors are paths the user named.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, WriteError)
# Named errors that derive from RuntimeError, by module: looked up only when their
# module is loaded (an error of a module never imported cannot have been raised), so
# this module stays free of jax and grain imports.
NAMED_ERRORS = {
    "consist_jax.training.trainer": "NonFiniteLossError",
    "consist_jax.data.pipeline": "BadExampleError",
    "consist_jax.training.checkpoint": "CheckpointSaveError",
    "consist_jax.checkpoints": "CheckpointDamagedError",
}


def is_user_error(error: BaseException) -> bool:
    if isinstance(error, USER_ERRORS):
        return True
    for module, name in NAMED_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(error, getattr(loaded, name)):
            return True
    return False


def wants_traceback() -> bool:
    """CONSIST_TRACEBACK=1, or absl's --verbosity >= 1."""
    if os.environ.get("CONSIST_TRACEBACK", "") not in ("", "0"):
        return True
    from absl import flags

    try:
        return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
    except (KeyError, flags.UnparsedFlagAccessError):
        return False


def one_line(error: BaseException) -> str:
    """"error: MESSAGE" on one line; the project's own error types keep their name
    (NonFiniteLossError, CheckpointError, WriteError, ...), which says what failed."""
    text = " ".join(str(error).split()) or type(error).__name__
    if type(error).__module__.startswith("consist_jax."):
        text = f"{type(error).__name__}: {text}"
    return f"error: {text}"


def reports_user_errors(main):
    """Wraps an absl main: a user error prints one line to stderr and exits 2."""

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:
            if not is_user_error(e) or wants_traceback():
                raise
            print(one_line(e), file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)

    return wrapped


def keep_freed_memory_on_cpu() -> None:
    """``host_memory.keep_freed_memory_on`` JAX's backend: on CPU, XLA's per-call buffers are
    reused rather than mapped anew (a quarter of the demo's step). Call it where JAX may
    start its backend (train.py: after ``jax.distributed.initialize``) and before the first
    computation: glibc asks for ``mallopt`` before threads run, but the backend is known only
    once JAX has started it, and its threads are idle then (the settings are single words)."""
    import jax

    from consist_jax import host_memory

    host_memory.keep_freed_memory_on(jax.default_backend())
