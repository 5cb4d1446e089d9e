"""Runs one CLI's main() on several argument lists in one process, with compiling forbidden.

    python tests/cli_driver.py sample.py '[["--checkpoint=x", "--steps=0"], ...]'

Prints a JSON list of {"code": exit code, "stderr": what main printed}. ``jax.jit`` is
replaced before the script is imported by one whose functions raise when called, so a
refusal that came after a compile shows as an AssertionError (code 1), never as code 2.
"""
import contextlib
import io
import json
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_jit(fun=None, *args, **kwargs):
    """jax.jit whose functions refuse to run (decorating at import time is no compile)."""
    if fun is None:  # @jax.jit(static_argnames=...)
        return lambda f: _no_jit(f)

    def refuse(*call_args, **call_kwargs):
        raise AssertionError(f"jitted {getattr(fun, '__name__', fun)} ran before the refusal")

    return refuse


def run_cases(script: str, cases: list) -> list:
    import jax

    jax.jit = _no_jit
    module = runpy.run_path(os.path.join(REPO, script), run_name="cli_driver")
    flags, main = module["FLAGS"], module["main"]
    results = []
    for argv in cases:
        flags.unparse_flags()
        sys.argv = [script, *argv]  # ml_collections reads --config.* overrides from sys.argv
        flags(sys.argv)
        stderr = io.StringIO()
        code = 0
        with contextlib.redirect_stderr(stderr):
            try:
                main([script])
            except SystemExit as e:
                code = e.code
            except Exception as e:  # a bug or a compile: reported, not raised, so every case runs
                code, stderr = 1, io.StringIO(f"{type(e).__name__}: {e}")
        results.append({"code": code, "stderr": stderr.getvalue()})
    return results


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    print(json.dumps(run_cases(sys.argv[1], json.loads(sys.argv[2]))))
