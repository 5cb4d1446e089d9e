"""consist_jax/host_memory.py: with freed memory kept, a large block allocated again (by
malloc on the main thread or a worker thread, or by XLA:CPU for a program's temporaries)
takes no new page faults; without it, the block is unmapped at each free. Each case runs in
a fresh process, so the setting never reaches the test process."""
import json
import os
import subprocess
import sys

import pytest

from consist_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 48 << 20  # over glibc's 32 MiB ceiling for its own mmap threshold, under a thread heap's 64 MiB
PAGE = os.sysconf("SC_PAGE_SIZE")
PAGES = BLOCK // PAGE

# Allocates, touches and frees BLOCK three times on the main thread, then on a worker thread
# (its own arena); prints per thread the page faults of the last two rounds and the resident
# memory gained after the first free.
MALLOC_SCRIPT = f"""
import ctypes, json, resource, sys, threading
if sys.argv[1] == "keep":
    from consist_jax import host_memory
    assert "keeps freed memory" in host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def faults():
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * {PAGE}

def rounds(out, name):
    start = resident()
    for i in range(3):
        if i == 1:
            kept, before = resident() - start, faults()
        p = libc.malloc({BLOCK})
        libc.memset(p, i + 1, {BLOCK})
        libc.free(p)
    out[name] = dict(faults=(faults() - before) / 2, kept=kept)

out = {{}}
rounds(out, "main")
worker = threading.Thread(target=rounds, args=(out, "worker"))
worker.start(); worker.join()
print(json.dumps(out))
"""

# A jitted program whose only large buffer is its temporaries (one block, ~BLOCK bytes: the
# cumulative sum's arrays; the output is a scalar): the median page faults of a call over 16
# calls, and the block's size. The setting comes once the backend has started, as the CLIs
# set it. Median: the first call on each of XLA's threads (its own arena) faults its pages once;
# PJRT_NPROC (run()) keeps XLA's pool at 2 threads on any machine.
XLA_SCRIPT = f"""
import json, resource, statistics, sys
import jax, jax.numpy as jnp
from consist_jax import host_memory
jax.devices()
if sys.argv[1] == "keep":
    host_memory.keep_freed_memory()
x = jnp.linspace(0.0, 1.0, {BLOCK // 8}, dtype=jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x * x) ** 2)).lower(x).compile()
temp = f.memory_analysis().temp_size_in_bytes
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(faults=statistics.median(faults), temp=temp)))
"""


def run(script, mode):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PJRT_NPROC="2")
    for name in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_",
                 "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(name, None)  # the "default" runs are glibc's defaults
    result = subprocess.run([sys.executable, "-c", script, mode], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def huge_pages_always():
    """Transparent huge pages on for every mapping (then a fresh block takes far fewer faults):
    the global setting, or any page size's own (kernel 6.8+: "inherit" follows the global one)."""
    root = "/sys/kernel/mm/transparent_hugepage"

    def setting(path):
        try:
            with open(path) as f:
                return f.read().split("[")[1].split("]")[0]
        except (OSError, IndexError):
            return None

    top = setting(os.path.join(root, "enabled"))
    sizes = [setting(os.path.join(root, d, "enabled")) for d in
             (os.listdir(root) if os.path.isdir(root) else []) if d.startswith("hugepages-")]
    return top == "always" or "always" in sizes


needs_glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="glibc's malloc only (Linux)")


@needs_glibc
def test_a_freed_block_is_reused_on_every_thread():
    kept = run(MALLOC_SCRIPT, "keep")
    default = run(MALLOC_SCRIPT, "default")
    for thread in ("main", "worker"):
        # Kept: the block's pages stay resident after free and come back without a fault.
        assert kept[thread]["kept"] >= BLOCK * 0.9, (thread, kept)
        assert kept[thread]["faults"] < PAGES / 20, (thread, kept)
        # Default (the contrast the test stands on): the block is unmapped at free.
        assert default[thread]["kept"] < BLOCK * 0.1, (thread, default)
        if not huge_pages_always():  # 2 MiB pages would take 1/512 the faults
            assert default[thread]["faults"] > PAGES * 0.9, (thread, default)


@needs_glibc
def test_xla_cpu_temporaries_take_no_new_faults():
    kept = run(XLA_SCRIPT, "keep")
    # The block the test is about: over glibc's own-mapping ceiling, under a thread heap.
    assert 32 << 20 < kept["temp"] <= 60 << 20, kept
    pages = kept["temp"] // PAGE
    assert kept["faults"] < pages / 20, kept
    if not huge_pages_always():
        default = run(XLA_SCRIPT, "default")
        assert default["faults"] > pages / 2, default  # the temporary is mapped anew at each call


def test_only_cpu_runs_are_changed(monkeypatch):
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: "changed")
    assert host_memory.keep_freed_memory_on("gpu") is None
    assert host_memory.keep_freed_memory_on("tpu") is None
    monkeypatch.setenv(host_memory.ENV_VAR, "0")
    assert host_memory.keep_freed_memory_on("cpu") is None
    monkeypatch.setenv(host_memory.ENV_VAR, "1")
    assert host_memory.keep_freed_memory_on("cpu") == "changed"


def test_another_c_library_is_left_as_it_is_with_a_warning(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    monkeypatch.setattr(host_memory, "_loaded_symbols", object)  # nor a preloaded malloc (pytest may run under one)
    warnings = []
    monkeypatch.setattr(host_memory.logging, "warning", warnings.append)
    message = host_memory.keep_freed_memory()
    assert "not glibc" in message and warnings == [message]


def test_a_preloaded_malloc_is_named_and_left_to_its_settings(monkeypatch):
    class Libc:  # glibc's entry points, plus the preloaded allocator's own
        def mallopt(self, option, value):
            raise AssertionError("glibc's settings applied under a preloaded malloc")

        def gnu_get_libc_version(self):
            return b"2.36"

    for name, symbol in (("mimalloc", "mi_version"), ("jemalloc", "mallctl")):
        libc = Libc()
        setattr(libc, symbol, lambda: 0)
        monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
        assert host_memory.keep_freed_memory() == f"host memory: {name} serves malloc (preloaded); glibc's settings not applied"
    monkeypatch.setattr(host_memory, "_glibc", lambda: Libc())
    with pytest.raises(AssertionError, match="settings applied"):  # the fake does stand for glibc
        host_memory.keep_freed_memory()
