"""Bounded fuzzing of command-line config overrides (``--config.a.b=value``) against the
real run configs: every failure is one flag error on one line that names the override,
never a traceback from inside ml_collections, and nothing unknown is silently accepted."""
import importlib
import os

import ml_collections
import pytest
from absl import flags
from hypothesis import given
from hypothesis import strategies as st
from ml_collections import config_flags

from configs.common import ConfigOverrideError, check_override_path, parse_flags
from tests.fuzzing import bounded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
CONFIG_FILES = ["configs/demo.py", "configs/demo_video.py", "configs/sd15_image.py"]


def _parse(argv):
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "run config", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    return parse_flags(argv, flag_values), flag_values


def _key_paths(node, prefix=()):
    """Every dotted key path of a config (groups and leaves)."""
    for key in node.keys():
        path = prefix + (str(key),)
        yield path
        if isinstance(node[key], (dict, ml_collections.ConfigDict)):
            yield from _key_paths(node[key], path)


def _load(config_file):
    module = config_file.removesuffix(".py").replace("/", ".")
    return importlib.import_module(module).get_config()


KEY_PATHS = sorted(set(p for f in CONFIG_FILES for p in _key_paths(_load(f))))


def _typo(key: str, draw) -> str:
    """One random edit (replace / insert / delete a character) of ``key``."""
    i = draw(st.integers(0, len(key)))
    c = draw(st.sampled_from("abcxyz_0"))
    edit = draw(st.sampled_from(["replace", "insert", "delete"]))
    if edit == "insert" or not key:
        return key[:i] + c + key[i:]
    i = min(i, len(key) - 1)
    return key[:i] + (c if edit == "replace" else "") + key[i + 1:]


@st.composite
def override_paths(draw):
    """Real key paths, typo'd ones, ones extended past a leaf, and arbitrary strings."""
    path = list(draw(st.sampled_from(KEY_PATHS)))
    kind = draw(st.sampled_from(["real", "typo", "extend", "cut", "junk"]))
    if kind == "typo":
        i = draw(st.integers(0, len(path) - 1))
        path[i] = _typo(path[i], draw)
    elif kind == "extend":
        path.append(draw(st.sampled_from(["x", "real", "keys", "shape", "0", "lr"])))
    elif kind == "cut":
        path = path[:-1] + [draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8))]
    elif kind == "junk":
        return draw(st.text(st.characters(codec="ascii", exclude_characters="\n\r\x00= "),
                            min_size=1, max_size=20))
    return ".".join(path)


VALUES = st.one_of(
    st.sampled_from(["1", "0", "-1", "1e-4", "nan", "true", "False", "None", "abc", "",
                     "(1, 2)", "[1, 2]", "{'a': 1}", "(", "'x'", "1,2", "()"]),
    st.text(st.characters(codec="ascii", exclude_characters="\n\r\x00"), max_size=12),
)


def _is_field(config_file, path) -> bool:
    try:
        check_override_path(_load(config_file), path)
    except ConfigOverrideError:
        return False
    return True


@bounded(150)
@given(config_file=st.sampled_from(CONFIG_FILES), path=override_paths(), value=VALUES)
def test_fuzzed_overrides_fail_as_one_line_flag_errors(config_file, path, value):
    argv = ["train.py", f"--config={os.path.join(REPO, config_file)}", f"--config.{path}={value}"]
    try:
        _parse(argv)
    except flags.Error as error:
        message = str(error)
        assert "\n" not in message.strip(), message
        assert f"config.{path}" in message, message
        if not _is_field(config_file, path):
            assert isinstance(error, ConfigOverrideError), message
        return
    # Parsed: the override must have named a real field (nothing unknown is accepted).
    assert _is_field(config_file, path), argv


def test_unknown_key_names_the_nearest_valid_keys():
    with pytest.raises(ConfigOverrideError,
                       match=r"^--config\.optim\.lrr: config\.optim has no key 'lrr'; "
                             r"nearest valid keys: lr$"):
        _parse(["train.py", f"--config={DEMO}", "--config.optim.lrr=1"])
    with pytest.raises(ConfigOverrideError, match=r"config\.optim\.lr = 0\.001 \(float\) is not a group"):
        _parse(["train.py", f"--config={DEMO}", "--config.optim.lr.real=1"])


def test_missing_config_file_is_one_line():
    for extra in ([], ["--config.seed=1"]):
        with pytest.raises(ConfigOverrideError, match=r"^--config=configs/nope\.py: cannot read"):
            _parse(["train.py", "--config=configs/nope.py", *extra])


def test_valid_override_still_applies():
    _, flag_values = _parse(["train.py", f"--config={DEMO}", "--config.optim.lr=0.5",
                             "--noconfig.train.tryon"])
    assert flag_values.config.optim.lr == 0.5 and flag_values.config.train.tryon is False


def test_train_py_reports_a_typo_in_one_line(tmp_path):
    """The CLI path: absl's one-line flag error and exit status 1, before anything is built."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), f"--config={DEMO}",
         f"--workdir={tmp_path}", "--config.optim.lrr=1"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == ("FATAL Flags parsing error: --config.optim.lrr: "
                                             "config.optim has no key 'lrr'; nearest valid keys: lr")
    assert "Traceback" not in result.stderr and not os.listdir(tmp_path)
