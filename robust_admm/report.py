"""`python -m robust_admm.report DIR` (or `robust-admm report DIR`): writes the report of a
study or of one run, DIR/report.md with a results table and PNG plots
(experiments/report.py), and prints its path."""
from absl import app

from robust_admm import cli
from robust_admm.experiments.report import write_report
from robust_admm.runtime import logs


def define_flags():
    """None: the command takes the directory as its one argument."""


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m robust_admm.report DIR  (a study's or a run's "
                             "directory)", exitcode=2)
    print(logs.exit_on_error(write_report, argv[1]))


def run(argv=None):
    define_flags()
    cli.run_app(main, argv)


if __name__ == "__main__":
    run()
