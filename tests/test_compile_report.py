"""Ahead-of-time compiles for TPU topologies on this CPU host (libtpu describes the chips).

One tiny config is compiled for a TPU v5e slice through ``train.py --compile_topology``
(the report's keys, compiled splash kernels, it fits); a tiny Wan DiT likewise, and once
more with a batch far past the chip's memory (it does not fit). Nothing runs on a TPU.
"""
import json
import math
import subprocess

import pytest
from runs import REPO, run_env, train_cmd

from consist_jax.training import compile_report as cr

REPORT_KEYS = {
    "topology", "num_slices", "device_kind", "num_devices", "mesh", "global_batch_size",
    "per_device_bytes", "device_memory_bytes", "fits", "flops_per_step", "bytes_accessed_per_step",
    "estimated_step_seconds", "estimated_mfu", "tpu_attention_kernels",
    "compile_seconds", "host_peak_rss_bytes",
}
TINY_TPU = ["--config.model.unet.attention_impl=auto", "--config.mesh.shape=(1,-1)"]


@pytest.mark.parametrize("name, kind, chips, shape", [
    ("v4-8", "TPU v4", 4, (2, 2, 1)),
    ("v5p-8", "TPU v5", 4, (2, 2, 1)),
    ("v5p-128", "TPU v5", 64, (4, 4, 4)),
    ("v5e-8", "TPU v5 lite", 8, (2, 4)),
    ("v5e-16", "TPU v5 lite", 16, (4, 4)),
    ("v6e-8", "TPU v6 lite", 8, (2, 4)),
])
def test_accelerator_types_describe_their_chips(name, kind, chips, shape):
    """Cloud TPU names count TensorCores on v4 / v5p (two per megacore chip), chips on v5e / v6e."""
    assert cr.parse_accelerator_type(name)[1] == shape
    devices = cr.tpu_devices(name)
    assert len(devices) == chips and math.prod(shape) == chips
    assert {d.device_kind for d in devices} == {kind} and {d.platform for d in devices} == {"tpu"}
    assert kind in cr.TPU_CHIPS


def test_slices_multiply_the_devices():
    devices = cr.tpu_devices("v5e-16", num_slices=2)
    assert len(devices) == 32 and {d.slice_index for d in devices} == {0, 1}


@pytest.mark.parametrize("name", ["v5e", "v7-8", "v5p-12", "v4-2x2", "v5e-6"])
def test_unknown_accelerator_types_are_named(name):
    with pytest.raises(cr.TopologyError, match=f"--compile_topology={name!r}"):
        cr.parse_accelerator_type(name)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """train.py --compile_topology=v5e-4 on the tiny config (its data is never read)."""
    workdir = tmp_path_factory.mktemp("compile")
    cmd = train_cmd(str(workdir), "--compile_topology=v5e-4", *TINY_TPU)
    done = subprocess.run(cmd, cwd=REPO, env=run_env(str(workdir / "no_data")), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TPU attention kernels" in done.stdout
    with open(workdir / cr.REPORT_NAME) as f:
        return json.load(f)


def test_train_step_compiles_for_tpu_with_kernels(tiny_report):
    report = tiny_report
    assert REPORT_KEYS <= set(report)
    assert set(report["per_device_bytes"]) == {"arguments", "outputs", "temp", "generated_code", "peak"}
    assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 4} and report["global_batch_size"] == 8
    assert report["tpu_attention_kernels"] > 0, "auto on a TPU target must compile splash kernels"
    assert report["fits"] and 0 < report["per_device_bytes"]["peak"] < report["device_memory_bytes"]
    assert report["flops_per_step"] > 0 and report["estimated_step_seconds"] > 0
    assert 0 < report["estimated_mfu"] <= 1
    assert report["compile_seconds"] > 0 and report["host_peak_rss_bytes"] > 2**20


def tiny_dit_tpu_config():
    """tests/configs/tiny_dit.py (a 2-block Wan DiT) with the TPU kernels, FSDP over the slice,
    conditioned on a caption as the Wan configs are (its embeddings in the batch, L = 512)."""
    from tests.configs.tiny_dit import get_config

    config = get_config()
    config.model.wan.attention_impl = "auto"
    config.model.context.kind = "text"
    config.mesh.shape = (1, -1)
    return config


@pytest.fixture(scope="module")
def tiny_dit_report():
    """The DiT's train step (model.backbone="wan") for v5e-4, in this process."""
    return cr.train_report(tiny_dit_tpu_config(), "v5e-4")


def test_dit_train_step_compiles_for_tpu_with_kernels(tiny_dit_report):
    report = tiny_dit_report
    assert REPORT_KEYS <= set(report) and report["program"] == "train_step"
    assert report["mesh"] == {"data": 1, "fsdp": 4} and report["global_batch_size"] == 8
    assert report["tpu_attention_kernels"] > 0, "auto on a TPU target must compile splash kernels in the DiT"
    assert report["fits"] and 0 < report["per_device_bytes"]["peak"] < report["device_memory_bytes"]
    assert report["flops_per_step"] > 0 and 0 < report["estimated_mfu"] <= 1


def test_a_batch_past_the_chip_memory_does_not_fit(tiny_dit_report):
    """The tiny DiT's step at 16384x the batch (32768 clips a chip, ~50 GiB after XLA's
    rematerialisation): past a v5e's 16 GiB, so XLA:TPU refuses it in its HLO passes.

    A batch that XLA can rematerialise to just under HBM (the tiny UNet at 4096x: 24 GiB
    -> 14.4 GiB) passes the HLO passes and spends minutes in the backend on a program
    that then reports fits=false; one far past HBM is refused before the backend.
    """
    big = tiny_dit_report["global_batch_size"] * 16384
    report = cr.train_report(tiny_dit_tpu_config(), "v5e-4", global_batch_size=big)
    assert REPORT_KEYS <= set(report) and report["global_batch_size"] == big
    assert not report["fits"], report["per_device_bytes"]
    # XLA:TPU refuses past its usable HBM (15.75 of a v5e's 16 GiB) or reports the peak.
    assert report["per_device_bytes"]["peak"] > (1 - report["hbm_headroom"]) * report["device_memory_bytes"]
    if report["estimated_step_seconds"] is None:  # refused: XLA's listing of its largest buffers is kept
        assert "RESOURCE_EXHAUSTED" in report["xla_message"], report["xla_message"][:300]


def test_out_of_memory_compiles_are_read():
    """XLA:TPU refuses a program past HBM with RESOURCE_EXHAUSTED: the report reads the need."""
    error = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                         "memory space hbm. Used 20.81G of 15.48G hbm. Exceeded hbm capacity by 5.33G.")
    assert cr.hbm_exceeded(error) == int(20.81 * 2**30)
    error = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                         "HLO temporaries (36.00G) exceeds available HBM (15.75G).")
    assert cr.hbm_exceeded(error) == 36 * 2**30
    assert cr.hbm_exceeded(RuntimeError("INTERNAL: Mosaic failed to compile")) is None
    # The report keeps the head of XLA's message (its largest buffers), cut to a bounded size.
    listing = "RESOURCE_EXHAUSTED: Ran out of memory. Largest program allocations in hbm:\n" + "x" * 10**5
    kept = cr.refusal_message(RuntimeError(listing))
    assert kept.startswith(listing[:200]) and len(kept) <= cr.REFUSAL_MESSAGE_CHARS + 10


@pytest.mark.parametrize("start", [1, 12, 64])
@pytest.mark.parametrize("fixed_gib, per_example_gib", [(3.0, 0.05), (12.0, 0.7), (20.0, 9.0), (90.0, 1.0)])
@pytest.mark.parametrize("shape", ["linear", "convex", "jump"])
def test_largest_batch_search_finds_the_last_that_fits(start, fixed_gib, per_example_gib, shape):
    """``search_largest`` (each probe one compile in ``largest_fitting_batch``) against
    every batch tried: the same answer for memory linear, convex or jumping in the batch,
    with refused probes reporting only a lower bound of their need; and for linear memory
    from a start that fits (the config's batch), at most 5 compiles."""
    budget, most = 85.5 * 2**30, 4096

    def peak(m):
        extra = {"linear": 0.0, "convex": 0.01 * per_example_gib * m * m, "jump": 5.0 * (m > 37)}[shape]
        return (fixed_gib + per_example_gib * m + extra) * 2**30

    probed = []

    def probe(m):
        probed.append(m)
        fits = peak(m) <= budget
        return fits, peak(m) if fits else min(peak(m), 1.05 * budget), budget

    expected = max(m for m in range(most + 1) if m == 0 or peak(m) <= budget)
    assert cr.search_largest(probe, start, most) == expected, probed
    if shape == "linear" and peak(start) <= budget:
        assert len(probed) <= 5, probed


def test_largest_batch_search_steps_over_a_dip():
    """Near the chip's limit XLA rematerialises to fit, so one more example can need less
    (v4-8's SD-1.5 step: 28.71 GiB at 160 images, 28.42 at 164). The search takes its
    secant from a fitting probe below the dip, not a leap to the far end of the range
    (which once cost a dozen probes of batches 200 times too large)."""
    def peak(m):  # GiB: 0.5 an example; from 41 on 0.7 less
        return 10 + 0.5 * m - 0.7 * (m >= 41)

    probed = []

    def probe(m):
        probed.append(m)
        return peak(m) <= 30.2, peak(m) * 2**30, 30.2 * 2**30

    assert cr.search_largest(probe, 16, 4096) == 41
    assert probed == [16, 32, 40, 41, 42], probed


def test_largest_batch_reuses_known_reports(monkeypatch):
    """``largest_fitting_batch`` compiles only the batches no known report covers, and hands
    each new probe's report to on_probe (the bench keeps them); a compile is faked here by
    memory linear in the batch: 2 GiB + 1 GiB an example on 16 GiB v5e chips."""
    from tests.configs.tiny import get_config

    config = get_config()
    budget = 16 * 2**30 * (1 - cr.HBM_HEADROOM)

    def fake_report(batch):
        peak = (2 + batch / 4) * 2**30  # 4 chips, the batch split over them
        return {"global_batch_size": batch, "fits": peak <= budget, "device_memory_bytes": 16 * 2**30,
                "hbm_headroom": cr.HBM_HEADROOM, "per_device_bytes": {"peak": int(peak)}}

    compiled, kept = [], []
    monkeypatch.setattr(cr, "train_report", lambda c, t, n, batch: compiled.append(batch) or fake_report(batch))
    config.train.global_batch_size = 8
    known = [fake_report(8), fake_report(16), fake_report(64)]
    largest = cr.largest_fitting_batch(config, "v5e-4", known=known, on_probe=kept.append)
    assert largest == 4 * math.floor(budget / 2**30 - 2) == 48  # 14.4 GiB: 12 examples a chip
    assert 8 not in compiled and 16 not in compiled and 64 not in compiled and compiled
    assert [r["global_batch_size"] for r in kept] == compiled


def test_memory_probe_reads_the_buffer_assignment(tiny_dit_report):
    """The probe stops the compile at XLA:TPU's buffer assignment: its HBM total holds the
    parameters and is at most the full compile's (the back end only adds code and buffers);
    a batch XLA:TPU refuses in its HLO passes reports what it asked for (XLA dumps that
    assignment before it refuses, so either may reach the probe first)."""
    from consist_jax.training import memory_probe

    config, full = tiny_dit_tpu_config(), tiny_dit_report["per_device_bytes"]
    probe = memory_probe.train_memory(config, "v5e-4")
    assert not probe["refused"] and probe["probe_seconds"] > 0, probe
    assert full["arguments"] <= probe["hbm_bytes"] <= full["peak"] - full["generated_code"], (probe, full)
    refused = memory_probe.train_memory(config, "v5e-4", batch=16384 * tiny_dit_report["global_batch_size"])
    assert refused["hbm_bytes"] > 16 * 2**30, refused
    assert "RESOURCE_EXHAUSTED" in refused["xla_message"] or not refused["refused"]


def _faked_v5e_compiles(monkeypatch, growth_gib):
    """4 v5e chips faked for ``memory_probe``: buffer assignment 2 GiB + 0.5 GiB an example
    a chip, the back end 0.25 GiB of code and ``growth_gib`` an example a chip more.
    -> (the full compile at batch 8, assignment(batch), full_peak(batch), the largest
    batch that truly fits, the batches probed, the batches compiled in full);
    ``cr.train_report`` compiles in this fake."""
    from consist_jax.training import memory_probe

    def assignment(batch):
        return (2 + 0.5 * batch / 4) * 2**30

    def full_peak(batch):
        return assignment(batch) + (0.25 + growth_gib * batch / 4) * 2**30

    budget = 0.9 * 16 * 2**30
    probed, compiled = [], []
    monkeypatch.setattr(memory_probe, "train_memory", lambda c, t, n, batch: probed.append(batch) or {
        "hbm_bytes": int(assignment(batch)), "refused": False, "probe_seconds": 1.0, "host_peak_rss_bytes": 0})
    full = {"topology": "v5e-4", "num_slices": 1, "device_kind": "TPU v5 lite", "num_devices": 4,
            "mesh": {"data": 1, "fsdp": 4}, "device_memory_bytes": 16 * 2**30, "hbm_headroom": cr.HBM_HEADROOM,
            "chip": {}, "global_batch_size": 8, "fits": True,
            "per_device_bytes": {"generated_code": int(0.25 * 2**30), "temp": 1, "peak": int(full_peak(8))}}

    def fake_full(c, t, n, batch):
        compiled.append(batch)
        return dict(full, global_batch_size=batch, fits=full_peak(batch) <= budget,
                    per_device_bytes={"temp": 1, "peak": int(full_peak(batch))})

    monkeypatch.setattr(cr, "train_report", fake_full)
    truth = max(b for b in range(4, 4096, 4) if full_peak(b) <= budget)
    return full, assignment, full_peak, truth, probed, compiled


@pytest.mark.parametrize("growth_gib, full_compiles, expected", [
    (0.0, 2, ((96, 96), [96])),  # the back end's share constant: the floors' candidate fits
    (0.025, 1, ((92, 92), [96])),  # it grows: 96 refuted, 92's ceiling fits: closed
    (0.1, 3, ((80, 80), [92, 76, 80])),  # faster: the ceilings' 76, compiled, calibrates floors to 80
    (0.1, 2, ((76, 80), [92, 76])),  # one compile fewer: a bracket (of batches 4 chips take)
    (0.1, 1, ((76, 88), [92])),  # one compile only: 76 by its ceiling
])
def test_probed_search_brackets_the_largest_batch(monkeypatch, growth_gib, full_compiles, expected):
    """``largest_batch_bracket``: memory probes (the buffer assignment plus what the back
    end added at a full compile's batch) give floors above that batch and ceilings below
    it; full compiles confirm the candidates (``_faked_v5e_compiles``). The answer is the
    batch a search of full compiles gives, or brackets it."""
    from consist_jax.training import memory_probe
    from tests.configs.tiny import get_config

    full, assignment, full_peak, truth, probed, compiled = _faked_v5e_compiles(monkeypatch, growth_gib)
    kept = []
    at_40 = memory_probe.calibrated_reports(get_config(), full)(40)
    assert at_40["per_device_bytes"]["peak"] == int(assignment(40)) + int(full_peak(8)) - int(assignment(8))
    assert at_40["probe"]["hbm_bytes"] == int(assignment(40)) and probed == [8, 40]
    probed.clear()  # that check's probes are not the search's (nor kept by it)

    config = get_config()
    config.train.global_batch_size = 8
    bracket = memory_probe.largest_batch_bracket(config, full, full_compiles=full_compiles, on_probe=kept.append)
    assert (bracket, compiled) == expected, (bracket, compiled)
    assert bracket[0] <= truth <= bracket[1]
    assert [r["global_batch_size"] for r in kept if "probe" not in r] == compiled  # the bench keeps all
    # A second search given what was kept (probes, their calibrations, full compiles) repeats
    # no probe or compile of the first; it goes on where the first stopped, narrowing the bracket.
    first_probed, first_compiled, closed = set(probed), set(compiled), bracket[0] == bracket[1]
    probed.clear()
    compiled.clear()
    again = memory_probe.largest_batch_bracket(config, full, kept, full_compiles=full_compiles)
    assert bracket[0] <= again[0] <= truth <= again[1] <= bracket[1], again
    assert not (first_probed & set(probed) or first_compiled & set(compiled)), (probed, compiled)
    assert not closed or probed == compiled == [], (probed, compiled)


@pytest.mark.parametrize("growth_gib, known_batches, expected", [
    (0.025, [96], (92, 92)),  # refuted beside the floors' candidate: 92's ceiling closes it
    (0.1, [96, 84], (80, 80)),  # a refuted compile below the floors' candidate bounds them too
    (0.1, [76], (76, 80)),  # a fitting one calibrates the floors
    (0.1, [84, 96, 64, 72], (80, 80)),  # any order, several of each
])
def test_full_compiles_already_made_bound_the_search(monkeypatch, growth_gib, known_batches, expected):
    """Full compiles made before (another search's, or one run by hand at the batch a
    bracket left open) are used as the search's own: with no compile left to make, the
    bracket is what they and the probes calibrated on them prove."""
    from consist_jax.training import memory_probe
    from tests.configs.tiny import get_config

    full, _, _, truth, _, compiled = _faked_v5e_compiles(monkeypatch, growth_gib)
    known = [cr.train_report(None, "v5e-4", 1, batch) for batch in known_batches]
    compiled.clear()
    config = get_config()
    config.train.global_batch_size = 8
    bracket = memory_probe.largest_batch_bracket(config, full, known, full_compiles=0)
    assert bracket == expected and compiled == [], (bracket, compiled)
    assert bracket[0] <= truth <= bracket[1]


def test_bench_brackets_the_largest_batch_with_probes(tmp_path, tiny_dit_report):
    """bench/compile_tpu.py --largest_batch on the tiny DiT: the full compile of the
    config's batch (this module's, passed as --known), then memory probes (no further full
    compile here), each kept in DIR/probes/; the report holds the bracket, the batch above
    it failing a probe."""
    from runs import script_cmd

    known = tmp_path / "known.json"
    known.write_text(json.dumps(tiny_dit_report))
    cmd = script_cmd("bench/compile_tpu.py", "--config=tests/configs/tiny_dit.py", "--topology=v5e-4",
                     "--largest_batch", "--full_compiles=0", f"--out={tmp_path}", f"--known={known}",
                     "--config.model.wan.attention_impl=auto", "--config.mesh.shape=(1,-1)",
                     "--config.model.context.kind=text")
    done = subprocess.run(cmd, cwd=REPO, env=run_env(str(tmp_path / "no_data")), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "train_v5e-4x1.json") as f:
        report = json.load(f)
    assert report["per_device_bytes"] == tiny_dit_report["per_device_bytes"]  # reused, not compiled again
    low, high = report["largest_batch_bracket"]
    assert report["largest_fitting_global_batch"] == low == 8 < high and report["largest_batch_probes"] == "memory"
    probes = {}
    for path in (tmp_path / "probes").glob("*.json"):
        with open(path) as f:
            probe = json.load(f)
        probes[probe["global_batch_size"]] = probe
    assert all("probe" in p and p["per_device_bytes"]["peak"] > 0 for p in probes.values()), probes
    assert probes[high]["fits"] and not probes[high + 4]["fits"], sorted(probes)
    assert f"largest fitting global batch: 8 (to {high}: not closed)" in done.stdout


def test_dit_sampler_compiles_for_tpu_with_kernels():
    """The DiT's two-stage sampler (reference pass, guided loop over two windows), one v5e chip."""
    config = tiny_dit_tpu_config()
    config.sample.update(window=2, overlap=1)
    report = cr.sample_report(config, "v5e-4", num_frames=3, steps=2)
    assert REPORT_KEYS <= set(report) and report["num_devices"] == 1
    assert report["tpu_attention_kernels"] > 0 and report["fits"]


def test_two_stage_sampler_compiles_for_tpu_with_kernels():
    """Reference pass + the guided loop over two temporal windows + decode, one v5e chip."""
    from tests.configs.tiny import get_config

    config = get_config()
    config.model.unet.attention_impl = "auto"
    config.sample.update(window=2, overlap=1)
    report = cr.sample_report(config, "v5e-4", num_frames=3, steps=2)
    assert REPORT_KEYS <= set(report) and report["program"] == "sampler"
    assert report["num_devices"] == 1 and report["frames"] == 3
    assert report["tpu_attention_kernels"] > 0 and report["fits"]
    # what its FLOPs count is said in the report and its table
    assert report["cost_counts"] == cr.SAMPLER_COST_COUNTS and cr.SAMPLER_COST_COUNTS in cr.format_table(report)
