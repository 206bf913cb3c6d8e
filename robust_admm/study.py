"""`python -m robust_admm.study` (or `robust-admm study`): runs a study, a grid of training
programs (cells) each evaluated with the study's attacks; resumable cell by cell and
shareable between processes (experiments/study.py).

    python -m robust_admm.study --config configs/studies/mnist_width.py --workdir DIR \
        [--config.data.source=files --config.data.dir=PATH] [--config.cells.w2.train...]
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from robust_admm import cli
from robust_admm.experiments import config_files
from robust_admm.experiments.study import run_study
from robust_admm.runtime import checkpoint, claims, logs

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags (defined by the entry point only)."""
    config_flags.DEFINE_config_file("config", None, "Study config, e.g. "
                                    "configs/studies/mnist_width.py.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory of the study (cells, report).")
    flags.DEFINE_bool("allow_config_change", False,
                      "Continue a study whose study.json differs from this config.")
    flags.DEFINE_bool("wait", True, "When every cell left is held by another process (or "
                      "waits for one that is), wait for them instead of exiting.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    logs.exit_on_error(run_study, FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change,
                       FLAGS.wait, errors=(checkpoint.CheckpointError,
                                           checkpoint.CheckpointWriteError, claims.HeldError))


def run(argv=None):
    define_flags()
    # `--config configs/...` finds the package's own configs from any directory.
    cli.run_app(main, config_files.resolve_argv(sys.argv if argv is None else argv))


if __name__ == "__main__":
    run()
