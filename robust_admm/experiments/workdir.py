"""The layout of a run's workdir and of a study's directory: the one module that knows
where each file is, and that reads a run's config.json (upgraded from older releases).

A run (`robust_admm.train --workdir DIR`):

    DIR/config.json                 the run's config (refused if a rerun differs)
    DIR/data.json                   the fingerprint of its data (data/fingerprint.py;
                                    refused if a rerun's data differ)
    DIR/metrics.jsonl               one JSON record per log step, evaluation, ADMM update
    DIR/summary.json                the program and each finished phase's result
    DIR/checkpoints/<phase>/<step>  orbax checkpoints of each phase
    DIR/eval/<phase>.json           `robust_admm.eval`'s result (and <phase>_epsilons.*)
    DIR/report.md                   `robust_admm.report`'s report, beside its plots
    DIR/run.lock                    held by the process running in DIR (runtime/claims.py);
                                    a multi-process run's process i > 0 holds run.<i>.lock

One process (one per process index of a multi-process run) trains in a workdir at a time:
a second is refused at once, naming the holder; a killed process's lock goes with it.
`robust_admm.eval` takes no lock: it reads finished phases' checkpoints and writes only
DIR/eval/, so it may run while training goes on (each phase it reads is finished).

A study (`robust_admm.study --workdir DIR`):

    DIR/study.json                  the study's config
    DIR/cells/<cell>/               the cell's run (the layout above)
    DIR/cells/<cell>/cell.json      its result, once finished
    DIR/cells/<cell>/time.json      its wall time, summed over processes
    DIR/cells/<cell>/claim.lock     the claim of the process running it (runtime/claims.py);
                                    its run holds DIR/cells/<cell>/run.lock too (another
                                    file: a process's two locks on one file would be one)
    DIR/report.md                   the study's report
"""
import contextlib
import json
import os

import ml_collections

from robust_admm.data.fingerprint import differences
from robust_admm.experiments.migrate import upgrade_config_dict
from robust_admm.experiments.validation import check_config_types, config_differences
from robust_admm.runtime import checkpoint, claims, logs
from robust_admm.training.program import parse_program

CONFIG, METRICS, SUMMARY, REPORT = "config.json", "metrics.jsonl", "summary.json", "report.md"
DATA = "data.json"
STUDY, CELL_RESULT, CELL_TIME = "study.json", "cell.json", "time.json"


# ----------------------------------------------------------------------------- a run

def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS)


def summary_path(workdir: str) -> str:
    return os.path.join(workdir, SUMMARY)


def report_path(workdir: str) -> str:
    return os.path.join(workdir, REPORT)


def stage_dir(workdir: str, stage: str) -> str:
    """Where the checkpoints of phase `stage` are."""
    return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, "eval")


def eval_path(workdir: str, stage: str) -> str:
    """`robust_admm.eval`'s result for phase `stage`."""
    return os.path.join(eval_dir(workdir), f"{stage}.json")


def eval_partial_path(workdir: str, stage: str) -> str:
    """The finished batches of an interrupted `robust_admm.eval` of `stage`, kept until it
    completes (`experiments/eval_resume.py`)."""
    return os.path.join(eval_dir(workdir), f"{stage}.partial.json")


def epsilon_curve_base(workdir: str, stage: str) -> str:
    """The robust-accuracy-versus-epsilon curve of `stage`, without its .json / .png."""
    return os.path.join(eval_dir(workdir), f"{stage}_epsilons")


def eval_results(workdir: str) -> list:
    """The paths of the run's `robust_admm.eval` results, sorted."""
    folder = eval_dir(workdir)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(".json") and not f.endswith(("_epsilons.json", ".partial.json"))]


def run_lock_name(process: int = 0) -> str:
    """The lock file that process `process` of a run holds in its workdir."""
    return claims.RUN_LOCK_NAME if process == 0 else f"run.{process}.lock"


@contextlib.contextmanager
def hold_run(workdir: str, process: int = 0):
    """Holds `workdir` for a run's process `process` (each process of a multi-process run,
    all in one workdir by design, holds its own lock); `claims.HeldError`, naming the
    holder's host and pid, if another live process holds it."""
    with claims.hold(workdir, "workdir", run_lock_name(process), warn=logs.log):
        yield


@contextlib.contextmanager
def hold_eval(workdir: str, stage: str, process: int = 0):
    """Holds the evaluation of `stage` in `workdir` (lock `eval/<stage>.lock`, process i > 0
    of a multi-process evaluation `eval/<stage>.<i>.lock`); `claims.HeldError`, naming the
    holder, if another live process is evaluating that stage."""
    name = f"{stage}.lock" if process == 0 else f"{stage}.{process}.lock"
    with claims.hold(eval_dir(workdir), f"the evaluation of stage {stage!r} in",
                     name, warn=logs.log):
        yield


def holds_run(workdir: str) -> bool:
    return os.path.exists(summary_path(workdir))


def read_config_dict(workdir: str) -> dict | None:
    """The run's config.json as a dict, upgraded to this release's fields and each field's
    type checked; None if the workdir holds no run. A damaged or hand-edited file is a
    ValueError naming it and the field."""
    path = config_path(workdir)
    if not os.path.exists(path):
        return None
    try:
        d = upgrade_config_dict(logs.read_json_object(path))
        check_config_types(ml_collections.ConfigDict(d))
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(path) else f"{path}: {message}") \
            from None
    return d


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the run in `workdir` (upgraded); an error if there is none."""
    d = read_config_dict(workdir)
    if d is None:
        raise FileNotFoundError(f"workdir={workdir!r} holds no run (no {CONFIG})")
    return ml_collections.ConfigDict(d)


def write_config(workdir: str, config):
    logs.write_json(config_path(workdir), json.loads(config.to_json()))


def check_config(workdir: str, config, allow_change: bool):
    """Refuses a workdir that holds a run with a different config (unless allowed)."""
    old = read_config_dict(workdir)
    if old is None:
        return
    diffs = config_differences(old, json.loads(config.to_json()))
    if diffs and not allow_change:
        raise ValueError(
            f"{workdir} holds a run with a different config:\n  " + "\n  ".join(diffs)
            + "\nUse another --workdir, or pass --allow_config_change to continue anyway.")


def data_path(workdir: str) -> str:
    return os.path.join(workdir, DATA)


class DataChangedError(ValueError):
    """The data differ from those the workdir's run trained on."""


def check_data(workdir: str, fingerprint: dict, allow_change: bool):
    """Records the data's fingerprint (data.json) at a run's start; on a resume, refuses
    data that differ from the recorded ones, naming what changed (unless allowed: then
    the new fingerprint is recorded). A workdir from before fingerprints gets one now."""
    path = data_path(workdir)
    if not os.path.exists(path):
        if os.path.exists(config_path(workdir)):
            logs.log(f"{workdir} holds a run that recorded no data fingerprint (an older "
                     f"release): the data it ran on cannot be checked; recording this "
                     f"data's in {path}")
        logs.write_json(path, fingerprint)
        return
    old = logs.read_json(path)
    diffs = differences(old, fingerprint)
    if not diffs:
        return
    if not allow_change:
        raise DataChangedError(
            f"{workdir} holds a run on other data than this config reads (recorded in "
            f"{path}):\n  " + "\n  ".join(diffs)
            + "\nUse another --workdir, restore the data, or pass --allow_data_change to "
              "continue on these data anyway (--allow_config_change does not cover it).")
    logs.log(f"WARNING: the data differ from those recorded in {path} "
             f"(--allow_data_change): " + "; ".join(diffs) + "; recording the new ones")
    logs.write_json(path, fingerprint)


def read_summary(workdir: str) -> dict:
    """summary.json, or an empty summary where no phase has finished."""
    path = summary_path(workdir)
    return logs.read_json(path) if os.path.exists(path) else {"stages": {}}


def finished_stage(workdir: str, stage: str | None, config) -> str:
    """`stage` checked against the run's program, or the last phase with checkpoints."""
    names = [p.name for p in parse_program(config)]
    if stage:
        if stage not in names:
            raise ValueError(f"--stage={stage!r}; allowed: the run's phases {', '.join(names)}")
        return stage
    for s in reversed(names):
        if os.path.isdir(stage_dir(workdir, s)):
            return s
    raise FileNotFoundError(f"{workdir} holds no stage's checkpoints")


def load_final_state(workdir: str, stage: str) -> dict:
    """The final state of the finished phase `stage`, as nested dicts of numpy arrays."""
    return checkpoint.load_final_state(stage_dir(workdir, stage), stage)


# ----------------------------------------------------------------------------- a study

def study_path(workdir: str) -> str:
    return os.path.join(workdir, STUDY)


def holds_study(workdir: str) -> bool:
    return os.path.exists(study_path(workdir))


def cell_dir(workdir: str, name: str) -> str:
    return os.path.join(workdir, "cells", name)


def cell_result_path(workdir: str, name: str) -> str:
    return os.path.join(cell_dir(workdir, name), CELL_RESULT)


def cell_time_path(workdir: str, name: str) -> str:
    return os.path.join(cell_dir(workdir, name), CELL_TIME)


def is_cell_done(workdir: str, name: str) -> bool:
    return os.path.exists(cell_result_path(workdir, name))
