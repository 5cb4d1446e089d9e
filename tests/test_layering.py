"""The package's import contracts (.importlinter) hold: layers with no upward arrow,
Flax modules free of weight files, a sampler free of the trainer, no import cycles."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_hold():
    lint_imports = os.path.join(os.path.dirname(sys.executable), "lint-imports")
    assert os.path.exists(lint_imports), f"{lint_imports} missing: pip install -e '.[test]' (import-linter)"
    result = subprocess.run([lint_imports, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"lint-imports failed:\n{result.stdout}\n{result.stderr}"
