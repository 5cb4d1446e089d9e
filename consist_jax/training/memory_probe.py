"""A train step's per-chip HBM on a TPU topology in minutes: XLA:TPU's buffer assignment.

A full compile of SD-1.5's step for a pod takes 20-45 minutes and 15-22 GiB on a 2-core
host, nearly all of it in XLA:TPU's back end (code generation, after the HLO passes). The
memory a program needs is settled before that: the buffer assignment, which fixes every
HBM buffer's size and lifetime, comes at the end of the HLO passes (1.5-5.5 minutes here).
``train_memory`` compiles the step in a child process that dumps the step's buffer
assignment (``--xla_dump_to``), reads the HBM total from it and kills the child before
the back end starts: what a search for the largest batch needs, at a tenth of the cost.

What the back end adds (its generated code, and temporaries it allocates beyond the
assignment: 1.7 GiB at 16 images a v5p chip, 1.05 of it code; 2.3 at 32; 4.4 at 160) is
not in the dump.
``calibrated_reports`` takes it from a full compile at one batch: a floor for larger
batches, a ceiling for smaller ones; ``largest_batch_bracket`` searches with such probes
and confirms its candidates by full compiles. BENCHMARKS.md "TPU" compares probes with
full compiles. The dump's files are XLA's debugging output (libtpu 0.0.42): their names
and the "Total bytes" line are what this reads, and a change there is an error, never a
silent guess.
"""
from __future__ import annotations

import glob
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from consist_jax.training import compile_report as cr

STEP_MODULE = "jit_train_step"  # the HLO module name of trainer.build_train_program's step
_REPORT_GLOB = f"*.{STEP_MODULE}.*after_optimizations-memory-usage-report.txt"
_HBM_TOTAL = re.compile(r"Memory Space: default \(color=0\)\nTotal bytes: (\d+)")
POLL_SECONDS = 1.0


def hbm_total(dump_dir: str) -> Optional[int]:
    """Bytes of HBM (XLA's memory space 0) in the step's buffer assignment dumped in
    ``dump_dir``: parameters, outputs (a donated one shares its parameter's buffer) and
    temporaries at their planned offsets; None while the dump is not written yet."""
    paths = glob.glob(os.path.join(dump_dir, _REPORT_GLOB))
    if not paths:
        return None
    with open(max(paths)) as f:  # the last module of that name: the optimised step
        match = _HBM_TOTAL.search(f.read(4096))
    return int(match.group(1)) if match else None  # None: still being written


def _compile_in_child(config: Any, topology: str, num_slices: int, batch: int, dump_dir: str,
                      results: Any) -> None:
    """Child process: the step's full compile with the buffer assignment dumped; the parent
    kills it once the dump is there. Reports a refusal (or a finished compile) itself."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{flags} --xla_dump_to={dump_dir} --xla_dump_hlo_module_re=^{STEP_MODULE}$"
    cr.use_cpu_host()
    try:
        cr.compile_train_step(config, cr.tpu_devices(topology, num_slices), batch)
    except Exception as error:  # XlaRuntimeError; its type moves between jax versions
        needed = cr.hbm_exceeded(error)
        results.send(("refused", needed, cr.refusal_message(error)) if needed else ("error", None, str(error)))
        return
    results.send(("compiled", None, ""))


def _peak_rss(pid: int) -> int:
    """A running process's peak resident memory (Linux /proc), 0 where unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def train_memory(config: Any, topology: str, num_slices: int = 1, batch: Optional[int] = None,
                 timeout: float = 3600.0) -> dict:
    """Per-chip HBM of ``config``'s train step at global ``batch`` from XLA:TPU's buffer
    assignment -> {"hbm_bytes", "refused", "xla_message", "probe_seconds",
    "host_peak_rss_bytes"}. hbm_bytes: the assignment's total (arguments, outputs and
    temporaries, a donated buffer once; no generated code), or, where XLA:TPU refused the
    program for memory in its HLO passes, what it said it needed (refused: True; XLA dumps
    the assignment it refuses first, so such a probe may also come back unrefused with
    that total, past the chip's HBM)."""
    batch = int(batch or config.train.global_batch_size)
    where = f"memory probe of {topology} x{num_slices} at global batch {batch}"
    dump_dir = tempfile.mkdtemp(prefix="consist_probe_")
    spawn = multiprocessing.get_context("spawn")  # a fresh process: XLA reads its flags once
    receiver, sender = spawn.Pipe(duplex=False)
    child = spawn.Process(target=_compile_in_child, args=(config, topology, num_slices, batch, dump_dir, sender),
                          daemon=True)
    started = time.perf_counter()
    child.start()
    sender.close()
    try:
        rss = 0
        while True:
            total = hbm_total(dump_dir)
            if total is not None:
                return _result(total, False, "", started, rss)
            if receiver.poll(POLL_SECONDS):
                kind, value, message = _receive(receiver, where, child)
                if kind == "refused":
                    return _result(value, True, message, started, rss)
                if kind == "error":
                    raise RuntimeError(f"{where}: {message}")
                total = hbm_total(dump_dir)  # compiled before a poll saw the dump: it is complete
                if total is None:
                    raise RuntimeError(f"{where}: no {_REPORT_GLOB} in {dump_dir} after a full compile; "
                                       "this libtpu names or writes its dumps differently")
                return _result(total, False, "", started, rss)
            rss = max(rss, _peak_rss(child.pid))
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"{where}: no buffer assignment after {timeout:.0f} s")
    finally:
        child.kill()
        child.join()
        receiver.close()
        shutil.rmtree(dump_dir, ignore_errors=True)


def _receive(receiver: Any, where: str, child: Any) -> tuple:
    try:
        return receiver.recv()
    except EOFError:  # the child died without a word (killed, out of host memory)
        child.join()
        raise RuntimeError(f"{where}: the compiling process died (exit code {child.exitcode}) before "
                           "XLA:TPU assigned buffers") from None


def _result(hbm_bytes: int, refused: bool, message: str, started: float, rss: int) -> dict:
    return {"hbm_bytes": int(hbm_bytes), "refused": refused, "xla_message": message,
            "probe_seconds": round(time.perf_counter() - started, 1), "host_peak_rss_bytes": rss}


def calibrated_reports(config: Any, full_report: dict, probes: Optional[dict] = None) -> Callable[[int], dict]:
    """batch -> a train report (``compile_report`` keys, the cost figures None) from a
    memory probe at that batch, calibrated on ``full_report``: a full compile of this
    config and topology at a batch B0, whose own probe is made once, here.

    The back end adds to the buffer assignment its generated code and temporaries of its
    own, more for a larger batch (on v5p-8's image step 1.7 GiB at 64 and 2.3 GiB at 128;
    BENCHMARKS.md "TPU"). A probe's peak is its assignment plus what the back end added at
    B0: exact at B0, a floor above it (a probe that does not fit there proves the batch
    does not) and a ceiling below it (one that fits there proves the batch does).
    probes: batch -> ``train_memory`` result, reused and filled (one search after another)."""
    topology, slices, b0 = full_report["topology"], full_report["num_slices"], full_report["global_batch_size"]
    probes = {} if probes is None else probes

    def probe_at(batch: int) -> dict:
        if batch not in probes:
            probes[batch] = train_memory(config, topology, slices, batch)
        return probes[batch]

    at_full = probe_at(b0)
    if at_full["refused"]:
        raise RuntimeError(f"memory probe of {topology} at batch {b0}: refused where the full compile was not")
    added = full_report["per_device_bytes"]["peak"] - at_full["hbm_bytes"]
    target = {k: full_report[k] for k in cr.TARGET_KEYS}

    def report(batch: int) -> dict:
        probe = probe_at(batch)
        refused = probe["refused"]
        note = ("XLA:TPU refused the program: out of HBM" if refused else
                f"memory probe: buffer assignment {probe['hbm_bytes'] / cr.GIB:.2f} GiB + "
                f"{added / cr.GIB:.2f} GiB the back end added at batch {b0}")
        return cr.memory_only_report(
            target, batch, probe["hbm_bytes"] + (0 if refused else added), refused, note, program="train_step",
            probe=probe, calibration={"batch": b0, "probe": at_full, "back_end_bytes": added},
            compile_seconds=probe["probe_seconds"], host_peak_rss_bytes=probe["host_peak_rss_bytes"])
    return report


def largest_batch_bracket(config: Any, full_report: dict, known: Sequence[dict] = (), full_compiles: int = 2,
                          on_probe: Optional[Callable[[dict], None]] = None) -> tuple[int, int]:
    """(low, high): the largest global batch whose train step fits lies in [low, high]; low
    fits by a full compile or by its ceiling, and the batch after high failed a probe's floor
    or a full compile.

    Each round searches with probes calibrated on two full compiles: floors on the largest
    batch that fitted give high (the search stops below the smallest batch refuted above
    it); ceilings on that refuted batch give low (a batch whose ceiling fits, fits). When
    they have not met, one more batch is compiled in full: low when only its ceiling says
    it fits (it then calibrates the floors above it), else high (it fits, closing the
    search, or is refuted and calibrates the ceilings below it); ``full_compiles`` of them
    at most (each 15-45 minutes on a small host). The back end's share is taken not to
    shrink as the batch grows (floors and ceilings both rest on that). Near the HBM limit
    it can: v5p-128's image step, 9.43 GiB at 7936 and 7.96 at 8192 (BENCHMARKS.md "TPU"),
    so a bracket's end that rests on a probe alone is an estimate; one a full compile
    gave is not. Ceilings come from the refuted compile nearest above, the closest
    calibration there is.
    known: reports already made of this config and topology, full compiles or probes
    (those that hold "probe"; the probe each was calibrated on is reused too). Full
    compiles among them bound the search as the ones it makes do."""
    topology, slices = full_report["topology"], full_report["num_slices"]
    full = {int(r["global_batch_size"]): r for r in (full_report, *known) if "probe" not in r}
    probes = {int(r["calibration"]["batch"]): r["calibration"]["probe"] for r in known if "calibration" in r}
    probes.update({int(r["global_batch_size"]): r["probe"] for r in known if "probe" in r})
    if not full_report["fits"]:
        raise ValueError(f"largest_batch_bracket: the full compile at batch {full_report['global_batch_size']} "
                         "must fit")
    unit = cr.batch_unit(config, topology, slices)  # the bracket's ends are batches the trainer takes
    searched: dict[tuple[int, int, int], int] = {}

    def search(calibration: dict, limit: int, start: int) -> int:
        key = (int(calibration["global_batch_size"]), limit, start)
        if key not in searched:  # a round repeats the last one's searches with a new compile beside them
            searched[key] = cr.largest_fitting_batch(config, topology, slices, limit=limit, known=[calibration],
                                                     on_probe=on_probe, start=start,
                                                     report_for=calibrated_reports(config, calibration, probes))
        return searched[key]

    compiles = 0
    while True:
        fit = max(b for b, r in full.items() if r["fits"])
        refuted = sorted(b for b, r in full.items() if not r["fits"] and b > fit)
        high = search(full[fit], min([b - unit for b in refuted], default=2**16), start=fit)
        low = fit
        # A refusal's peak is XLA's lower bound only: no calibration from it.
        ceiling = next((b for b in refuted if full[b]["per_device_bytes"].get("temp") is not None), None)
        if ceiling is not None and high > low:  # from the floors' candidate down: what they should prove
            low = max(low, min(high, search(full[ceiling], ceiling - 1, start=high)))
        if low >= high or compiles >= full_compiles:
            return low, max(high, low)
        batch = low if low not in full else high
        full[batch] = cr.train_report(config, topology, slices, batch)
        compiles += 1
        if on_probe is not None:
            on_probe(full[batch])
