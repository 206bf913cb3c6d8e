"""`python -m robust_admm.train` (or `robust-admm train`): runs a config's program of phases
in a workdir, resuming where it stopped.

    python -m robust_admm.train --config configs/mnist.py:cpu --workdir runs/mnist \
        [--config.admm.rho=0.01 ...]
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from robust_admm import cli
from robust_admm.experiments import config_files
from robust_admm.experiments.run import train_and_evaluate
from robust_admm.runtime import checkpoint, claims, host_memory, logs, parallel

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags; defined by the entry point only, so that importing this module
    defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mnist.py:cpu.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
    flags.DEFINE_bool("allow_config_change", False,
                      "Continue a workdir whose config.json differs from this config.")
    flags.DEFINE_bool("allow_data_change", False,
                      "Continue a workdir whose data.json (the fingerprint of the data it "
                      "trained on) differs from this config's data.")
    flags.DEFINE_enum("host_malloc", "auto", list(host_memory.MODES),
                      "'reuse': keep freed host memory for XLA's per-call buffers (glibc; "
                      "faster CPU steps for the CIFAR models, the process keeps its peak "
                      "memory); 'system': the C library's defaults; 'auto': reuse for the "
                      "CIFAR models, system for the others (runtime/host_memory.py).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (orbax) off the console
    malloc_note = host_memory.configure(  # before any thread starts
        host_memory.resolve(FLAGS.host_malloc, FLAGS.config.model.name))
    parallel.initialize_distributed()  # multi-host runs (launch.sh tpu/slurm); before any JAX use
    logs.log(malloc_note)
    logs.exit_on_error(train_and_evaluate, FLAGS.config, FLAGS.workdir,
                       FLAGS.allow_config_change, FLAGS.allow_data_change,
                       errors=(checkpoint.CheckpointError, checkpoint.CheckpointWriteError,
                               claims.HeldError))


def run(argv=None):
    define_flags()
    # `--config configs/...` finds the package's own configs from any directory.
    cli.run_app(main, config_files.resolve_argv(sys.argv if argv is None else argv))


if __name__ == "__main__":
    run()
