"""`python -m robust_admm.eval` (or `robust-admm eval`): evaluates a finished phase of a run
again: natural accuracy, accuracy under each attack and under the AutoAttack ensemble,
sparsity, compression and stored size, with warnings on the signs of gradient masking.

    python -m robust_admm.eval --workdir DIR [--stage NAME] [--attacks fgsm,pgd40,aa-standard]
        [--norm linf|l2] [--epsilon E] [--epsilons 0.1,0.2,0.3] [--n N] [--batch B]
        [--export PATH]

Writes DIR/eval/<stage>.json (and, with --epsilons, <stage>_epsilons.json and .png) and
prints a table. On SIGTERM it saves the finished attack batches (DIR/eval/<stage>.partial.json)
within one batch's attack and exits with status 143; the same command, rerun, resumes.
"""
from absl import app, flags, logging

from robust_admm import cli
from robust_admm.attacks import suite
from robust_admm.experiments.config_base import STAGES
from robust_admm.experiments.evaluate import DEFAULT_ATTACKS, evaluate_workdir
from robust_admm.runtime import claims, logs, parallel

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags (defined by the entry point only)."""
    flags.DEFINE_string("workdir", None, "The run's directory (holds config.json, checkpoints).")
    flags.DEFINE_string("stage", "", "Stage to evaluate (default: the last one with "
                        "checkpoints), one of the run's program, e.g. "
                        + ", ".join(STAGES))
    flags.DEFINE_string("attacks", "",
                        "Comma-separated attacks and ensembles: " + ", ".join(suite.SINGLE)
                        + ", " + ", ".join(suite.ENSEMBLES) + " (default: L-inf "
                        + DEFAULT_ATTACKS["linf"] + "; L2 " + DEFAULT_ATTACKS["l2"] + ")")
    flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model. L2 has fgsm, pgd<N>, "
                      "apgd-ce, apgd-dlr, apgd-t, fab-t, square and aa-standard, as L-inf.")
    flags.DEFINE_float("epsilon", None, "Radius in pixels of [0, 1] (default: L-inf MNIST "
                       "0.3, CIFAR-10 8/255, ImageNet 4/255, else the run's eval.epsilon; L2 "
                       "CIFAR-10 0.5).")
    flags.DEFINE_string("epsilons", "", "Also a robust-accuracy-versus-epsilon curve at "
                        "these radii, e.g. 0.1,0.2,0.3 (JSON and PNG in DIR/eval).")
    flags.DEFINE_integer("n", None, "Evaluate n test images (0 = all; default: all, "
                         "ImageNet 5000): the first n, or for a streamed source (in class "
                         "order) n spread evenly over the split.")
    flags.DEFINE_integer("batch", 500, "Global batch of the attacks (a multiple of the "
                         "device count).")
    flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts and queries.")
    flags.DEFINE_string("data_dir", "", "Data folder, if not the run's data.dir.")
    flags.DEFINE_bool("checks", True, "Run the gradient-masking checks (a PGD-20 at "
                      "epsilon = 1 on one batch).")
    flags.DEFINE_string("export", "", "Also export the model to PATH.npz + PATH.json "
                        "(and a physically smaller model for filter/channel pruning).")
    flags.DEFINE_enum("loop", None, ["auto", "fori", "host"], "How attack loops run "
                      "(default: the run's attack.loop).")
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    f = FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    parallel.initialize_distributed()
    logs.exit_on_error(evaluate_workdir, f.workdir, f.stage or None, f.attacks, f.epsilon,
                       f.epsilons, f.n, f.batch, f.seed, f.data_dir, f.checks, f.export,
                       f.loop, f.norm, errors=(claims.HeldError,))


def run(argv=None):
    define_flags()
    cli.run_app(main, argv)


if __name__ == "__main__":
    run()
