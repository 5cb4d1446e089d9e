"""Ahead-of-time TPU compiles from a CPU host: the figures of BENCHMARKS.md ("TPU").

    python bench/compile_tpu.py --config=configs/sd15_image.py --topology=v5p-8 --out=DIR
        [--num_slices=2] [--program=train|sample] [--frames=24] [--largest_batch]
        [--config.train.global_batch_size=...]

``--program=train`` compiles the train step exactly as ``train.py --compile_topology``
does (``compile_report.train_report``); ``sample`` compiles the two-stage sampler
(reference pass, the whole guided loop over the temporal windows, VAE decode) for
``--frames`` frames on one chip. ``--largest_batch`` also finds the largest global
batch whose train step fits (``compile_report.search_largest``: from the config's batch,
where memory meets HBM on the line through two probes; each probe's report goes to
DIR/probes/, named ..._probe or ..._full). A probe stops at XLA:TPU's buffer assignment
(``training.memory_probe``: 1.5-5.5 minutes where a full compile takes 15-45), calibrated on
the full compile of the config's batch; the candidate is then compiled in full
(``memory_probe.largest_batch_bracket``, ``--full_compiles`` of them at most; the answer is
a bracket [low, high] where those did not close it; ``--probe=full`` compiles every probe whole).
``--known=a.json,b.json`` reuses earlier reports. Each report
goes to ``DIR/{program}_{topology}x{slices}.json`` and a summary table is printed.

Any backbone: the UNet configs (configs/sd15_*.py) and the Wan DiT (configs/wan_*_scd.py,
``model.backbone="wan"``; add its sequence axis with ``--config.mesh.axes=...
--config.model.wan.sequence_axis=sequence``, docs/wan.md "Scale").
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).", lock_config=True)
flags.DEFINE_string("topology", None, "Cloud TPU accelerator type: v4-8, v5e-16, v5p-128, ...")
flags.DEFINE_integer("num_slices", 1, "Slices (multislice over DCN); train only.")
flags.DEFINE_enum("program", "train", ["train", "sample"], "What to compile.")
flags.DEFINE_integer("frames", None, "Sampled frames (default: the config's clip length).")
flags.DEFINE_integer("steps", None, "Sampler steps (default: config.sample.steps).")
flags.DEFINE_bool("largest_batch", False, "Also search the largest global batch that fits (train).")
flags.DEFINE_enum("probe", "memory", ["memory", "full"], "How --largest_batch probes a batch: 'memory' "
                  "stops each compile at XLA's buffer assignment (minutes; training.memory_probe), "
                  "'full' compiles it whole.")
flags.DEFINE_list("known", [], "Reports of earlier compiles or memory probes of this config and topology "
                  "(JSON files), reused by --largest_batch where it probes their batch.")
flags.DEFINE_integer("full_compiles", 2, "With --probe=memory, full compiles that confirm the search's "
                     "candidates, at most (memory_probe.largest_batch_bracket).")
flags.DEFINE_string("out", "compile_reports", "Folder for the JSON reports.")
flags.mark_flags_as_required(["config", "topology"])


def _read_report(path):
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --known {path}: not a readable report ({e})") from None


def _largest_batch(config, report, known, keep):
    """--largest_batch -> {largest_fitting_global_batch, largest_batch_bracket, largest_batch_probes}."""
    from consist_jax.training import compile_report as cr
    from consist_jax.training import memory_probe

    if FLAGS.probe == "full":
        low = high = cr.largest_fitting_batch(config, FLAGS.topology, FLAGS.num_slices, known=[report, *known],
                                              on_probe=keep)
    else:
        low, high = memory_probe.largest_batch_bracket(config, report, known, FLAGS.full_compiles, on_probe=keep)
    return {"largest_fitting_global_batch": low, "largest_batch_bracket": [low, high],
            "largest_batch_probes": FLAGS.probe}


def main(argv):
    del argv
    from consist_jax import files
    from consist_jax.training import compile_report as cr

    cr.use_cpu_host()
    config = FLAGS.config
    if FLAGS.program == "train":
        known = [_read_report(path) for path in FLAGS.known]
        batch = int(config.train.global_batch_size)
        report = next((r for r in known if r["global_batch_size"] == batch and "probe" not in r), None)
        if report is None:
            report = cr.train_report(config, FLAGS.topology, FLAGS.num_slices)
        if FLAGS.largest_batch:
            def keep(probe):  # each probe's report beside the main one (a memory probe's, a full compile's)
                kind = "probe" if "probe" in probe else "full"
                files.write_json(os.path.join(FLAGS.out, "probes", f"train_{FLAGS.topology}x{FLAGS.num_slices}"
                                              f"_batch{probe['global_batch_size']}_{kind}.json"), probe)
                print(cr.format_table(probe), flush=True)

            report.update(_largest_batch(config, report, known, keep))
    else:
        frames = FLAGS.frames or int(config.data.pipeline.clip_length)
        report = cr.sample_report(config, FLAGS.topology, frames, FLAGS.steps)
    report["config"] = config_flags.get_config_filename(FLAGS["config"])
    path = os.path.join(FLAGS.out, f"{FLAGS.program}_{FLAGS.topology}x{FLAGS.num_slices}.json")
    files.write_json(path, report)
    print(cr.format_table(report))
    if "largest_batch_bracket" in report:
        low, high = report["largest_batch_bracket"]
        print(f"largest fitting global batch: {low}" + (f" (to {high}: not closed)" if high > low else ""))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
