"""`python -m robust_admm.export` (or `robust-admm export`): writes a finished phase's model
as an .npz of float32 arrays with a JSON sidecar (and, for filter or channel pruning of a
LeNet, a physically smaller model; with --onnx, ONNX files checked with onnxruntime):
files and format in experiments/export.py.

    python -m robust_admm.export --workdir runs/digits --stage retrain --out runs/digits/model \
        [--onnx]
"""
from absl import app, flags, logging

from robust_admm import cli
from robust_admm.experiments.config_base import STAGES
from robust_admm.experiments.export import output_paths, write_export
from robust_admm.runtime import logs

FLAGS = flags.FLAGS


def define_flags():
    """The command's flags (defined by the entry point only)."""
    flags.DEFINE_string("workdir", None, "The run's directory.")
    flags.DEFINE_string("stage", "retrain", "A phase of the run's program, e.g. "
                        + ", ".join(STAGES))
    flags.DEFINE_string("out", None, "Output path (stem or .npz).")
    flags.DEFINE_bool("onnx", False, "Also write PATH.onnx, checked with onnxruntime "
                      "(optional extra: pip install -e '.[onnx]').")
    flags.mark_flags_as_required(["workdir", "out"])


def report(side: dict, out: str) -> str:
    """What was written, in words."""
    files = output_paths(out)
    lines = [f"wrote {files['npz']} and {files['json']}: {side['param_count']} parameters, "
             f"compression rate {side['compression_rate']:.2f}"]
    small = side.get("small_model")
    if small and small["written"]:
        lines.append(f"wrote {files['small_npz']}: shrunk model with {small['param_count']} "
                     "parameters")
    elif small:
        lines.append(f"no shrunk model: {small['reason']}")
    for label, entry in (("", side.get("onnx")), ("shrunk model's ", (small or {}).get("onnx"))):
        if entry and entry["written"]:
            lines.append(f"wrote the {label}ONNX file {entry['file']}: onnxruntime's logits "
                         f"within {entry['max_abs_logit_diff']:.2g} of JAX's")
        elif entry:
            lines.append(f"no {label}ONNX file: {entry['reason']}")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    side = logs.exit_on_error(write_export, FLAGS.workdir, FLAGS.stage, FLAGS.out, FLAGS.onnx,
                              errors=(ImportError,))
    print(report(side, FLAGS.out))


def run(argv=None):
    define_flags()
    cli.run_app(main, argv)


if __name__ == "__main__":
    run()
