"""Train an SCD model.

    python train.py --config=configs/demo.py --workdir=runs/demo [--config.optim.lr=3e-5]

Multi-host: start one process per host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment variables; on TPU pods and SLURM, JAX finds them itself
with --distributed). Each process loads its own shard of the data.

The config's numbers are range-checked before anything is built; a user error prints
one line and exits 2 (CONSIST_TRACEBACK=1 or --verbosity=1 shows the traceback).
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so configs/ imports resolve
from configs.common import parse_flags_with_usage  # noqa: E402  (after the path insert)
from consist_jax import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and TensorBoard logs go.")
flags.DEFINE_bool("resume", None, "Continue from the workdir's latest checkpoint (default: config.resume).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detected settings.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_string("compile_topology", None,
                    "Compile the train step ahead of time for a Cloud TPU accelerator type (v4-8, v5e-16, "
                    "v5p-128, ...) from this host, write {workdir}/compile_report.json and exit; no training.")
flags.DEFINE_integer("compile_topology_num_slices", 1, "Slices of --compile_topology (multislice, over DCN).")
flags.mark_flags_as_required(["config", "workdir"])


def compile_for_topology(config) -> None:
    """--compile_topology: the report, no training (exits non-zero when it cannot compile)."""
    from consist_jax.training import compile_report

    compile_report.use_cpu_host()
    compile_report.run(config, FLAGS.workdir, FLAGS.compile_topology, FLAGS.compile_topology_num_slices)


def initialize_distributed() -> None:
    """jax.distributed from flags or environment; CPU processes talk over gloo."""
    import jax

    address = FLAGS.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not (address or FLAGS.distributed):
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu" or FLAGS.coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if address:
        kwargs = dict(
            coordinator_address=address,
            num_processes=FLAGS.num_processes or int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=FLAGS.process_id if FLAGS.process_id is not None else int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
    # The first cross-process collective sets up the CPU (gloo) connections, and waits only
    # 30 s for every process to get there. Here all processes arrive together; later, one
    # can be a compile behind (on CPU only process 0's compiles are read back from the
    # persistent cache): a restore or checkpoint save then failed with "Gloo context
    # initialization failed ... timed out".
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("distributed initialized")


def check_flags(config) -> None:
    """Everything train() would refuse that needs no device: before jax starts."""
    from consist_jax import checks, files
    from consist_jax.training.validate import check_run_config

    check_run_config(config)
    if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
        raise FileExistsError(f"--workdir={FLAGS.workdir!r} is a file, not a folder")
    files.check_can_create(FLAGS.workdir, "--workdir")
    if FLAGS.num_processes is not None:
        checks.positive_int("--num_processes", FLAGS.num_processes)
    if FLAGS.process_id is not None:
        last = FLAGS.num_processes - 1 if FLAGS.num_processes else None
        checks.non_negative_int("--process_id", FLAGS.process_id, last)


@cli.reports_user_errors
def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    config = FLAGS.config
    if FLAGS.resume is not None:
        with config.unlocked():
            config.resume = FLAGS.resume
    check_flags(config)
    if FLAGS.compile_topology:
        return compile_for_topology(config)
    from consist_jax.training import sharding

    sharding.split_cpu_host(config.get("mesh", {}).get("cpu_devices", 0))
    initialize_distributed()
    cli.keep_freed_memory_on_cpu()
    from consist_jax.training.trainer import train

    train(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_with_usage)  # one-line errors for --config.* typos
