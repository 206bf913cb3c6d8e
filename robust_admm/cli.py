"""The `robust-admm` command: `robust-admm VERB [flags]` runs the entry point of that verb,
as `python -m robust_admm.VERB [flags]` does (`python -m robust_admm VERB` too)."""
import importlib
import sys

VERBS = {
    "train": "train a config's program of phases in a workdir",
    "eval": "evaluate a finished phase: attacks, AutoAttack, masking checks, sizes",
    "export": "write a finished phase's model as .npz + JSON (and ONNX)",
    "study": "run a grid of training programs, shareable between processes",
    "report": "write the report (tables, plots) of a run or a study",
    "shards": "write a folder of images as ArrayRecord shards",
}


# absl's help flags: each prints the usage and exits with 1, where a command's help should
# exit with 0 (`run_app`).
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def asks_help(argv) -> bool:
    """Whether `argv` (argv[0] the program) holds a help flag before any `--`."""
    args = list(argv[1:])
    args = args[:args.index("--")] if "--" in args else args
    return any(a in HELP_FLAGS or a.split("=")[0] in HELP_FLAGS for a in args)


def run_app(main, argv=None) -> None:
    """`absl.app.run(main, argv=argv)` (None: sys.argv), except that a help request exits
    with 0."""
    from absl import app

    argv = sys.argv if argv is None else argv
    try:
        app.run(main, argv=argv)
    except SystemExit as e:
        if e.code == 1 and asks_help(argv):  # absl exits while parsing, before main
            raise SystemExit(0) from None
        raise


def usage() -> str:
    width = max(map(len, VERBS))
    return ("usage: robust-admm VERB [flags]   (robust-admm VERB --help for a verb's flags)\n"
            + "\n".join(f"  {v.ljust(width)}  {what}" for v, what in VERBS.items()))


def main(argv=None) -> None:
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    verb = argv[1]
    if verb not in VERBS:
        print(f"robust-admm: unknown verb {verb!r}; allowed: {', '.join(VERBS)}\n{usage()}",
              file=sys.stderr)
        sys.exit(2)
    # The verb's entry point, chosen by name: the dispatcher is the one place that knows
    # them all, and imports only the one it runs.
    entry = importlib.import_module(f"robust_admm.{verb}")
    # absl's --help prints __main__'s docstring and the flags of the module that argv[0]
    # names: the entry point takes both places, as `python -m robust_admm.VERB` gives it.
    sys.modules["__main__"] = entry
    sys.argv = [entry.__name__, *argv[2:]]
    entry.run(sys.argv)


if __name__ == "__main__":
    main()
