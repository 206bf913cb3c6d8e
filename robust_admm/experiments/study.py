"""Runs a study: a grid of training programs (cells), one workdir per cell, each cell's
final model evaluated with the study's attacks; resumable cell by cell, and shareable
between processes.

    python -m robust_admm.study --config configs/studies/mnist_width.py --workdir DIR \
        [--config.data.source=files --config.data.dir=PATH] [--config.cells.w2.train...]

Writes DIR/study.json (the study's config), DIR/cells/<cell>/ (the cell's run: config.json,
checkpoints, metrics.jsonl, summary.json, eval/<stage>.json), DIR/cells/<cell>/cell.json
once the cell is finished (its results), and DIR/report.md with its plots once the last
cell is (experiments/report.py). The layout: experiments/workdir.py.

Rerun after a crash or a kill, it skips finished cells and resumes the cell it was in
from that cell's checkpoints. Several processes (on one machine, or on several sharing DIR
on a filesystem with POSIX locks) may run the same command at once: each claims a cell
before running it (runtime/claims.py), so no cell runs twice at the same time; a
process with nothing left to claim waits for the cells that others hold.
"""
import json
import os
import re
import shutil
import threading
import time

import jax
import ml_collections

from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.evaluate import evaluate_workdir
from robust_admm.experiments.migrate import upgrade_config_dict
from robust_admm.experiments import report as report_lib
from robust_admm.experiments.run import train_and_evaluate
from robust_admm.experiments.study_config import CELL_INITS, cell, study_base
from robust_admm.experiments.validation import (check_config_types, check_types,
                                                config_differences, validate_config)
from robust_admm.runtime import claims, logs
from robust_admm.runtime.logs import read_json
from robust_admm.training.program import parse_program

# What a cell's shared first phase depends on: configs of a cell and its `start_from` must
# agree on these (and on the shared phase's own field).
SHARED_FIELDS = ("seed", "setting", "objective", "objective_beta", "label_smoothing",
                 "mixup_alpha", "batch_size", "data", "model", "attack", "init",
                 "cpu_convolutions")
CELL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ----------------------------------------------------------------------------- config

def cell_names(study) -> list:
    """The cells in the order the config file wrote them (ConfigDict.keys() sorts them;
    its JSON keeps that order)."""
    return list(json.loads(study.cells.to_json()))


def dependencies(study, name: str) -> list:
    c = study.cells[name]
    return [d for d in (c.start_from, c.inherit_from) if d]


def cell_train_config(study, name: str, workdir: str):
    """The training config cell `name` runs: its own, with the study's data source, the
    inherited cell's workdir and, when it shares a first phase, the phases after it."""
    c = study.cells[name]
    cfg = ml_collections.ConfigDict(c.train.to_dict())
    if study.data.source:
        cfg.data.source = study.data.source
    if study.data.dir:
        cfg.data.dir = study.data.dir
    if c.inherit_from:
        cfg.init.inherit_from = os.path.abspath(workdir_lib.cell_dir(workdir, c.inherit_from))
    if c.start_from:
        names = [p.name for p in parse_program(cfg)]
        cfg.stages = ",".join(names[1:])
    cfg.lock()
    return cfg


def shared_phase(study, name: str) -> str:
    """The first phase of cell `name`, which it takes from its `start_from` cell."""
    return parse_program(study.cells[name].train)[0].name


def validate_study(study, workdir: str) -> list:
    """The cells in an order that runs every cell after the cells it needs; refuses, naming
    the cell and the field, anything that would fail once cells are running."""
    check_types(study, study_base())
    names = cell_names(study)
    if not names:
        raise ValueError("the study has no cells (config.cells is empty)")
    for name in names:
        check_types(study.cells[name], cell(ml_collections.ConfigDict()), f"cells.{name}.")
        try:
            check_config_types(study.cells[name].train)
        except ValueError as e:
            raise ValueError(f"cell {name!r}: cells.{name}.train: {e}") from None
    for field in ("poll_s", "clock_every_s"):
        if not study[field] > 0:
            raise ValueError(f"{field}={study[field]!r}: must be a number of seconds > 0")
    for name in names:
        if not CELL_NAME.fullmatch(name):
            raise ValueError(f"cell name {name!r}: use letters, digits, '_', '-', '.'")
        c = study.cells[name]
        for field in ("start_from", "inherit_from"):
            dep = c[field]
            if dep and dep not in names:
                raise ValueError(f"cells.{name}.{field}={dep!r} is not a cell of the study; "
                                 f"cells: {', '.join(names)}")
        if c.labels.get("init", "scratch") not in CELL_INITS:
            raise ValueError(f"cells.{name}.labels.init={c.labels.init!r}; allowed: "
                             f"{', '.join(CELL_INITS)}")
        try:
            program, phases = validate_config(cell_train_config(study, name, workdir))
        except ValueError as e:
            raise ValueError(f"cell {name!r}: {e}") from None
        if c.start_from:
            check_shared_phase(study, name, program)
    order, visiting = [], set()

    def visit(name, path):
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"cells depend on each other in a cycle: {' -> '.join(path)}")
        visiting.add(name)
        for dep in dependencies(study, name):
            visit(dep, path + [dep])
        visiting.discard(name)
        order.append(name)

    for name in names:
        visit(name, [name])
    return order


def check_shared_phase(study, name: str, program: list):
    src_name = study.cells[name].start_from
    phase = program[0].name
    if len(program) < 2:
        raise ValueError(f"cell {name!r} starts from cell {src_name!r} but its program "
                         f"{program[0].name!r} has nothing after the shared phase")
    src = study.cells[src_name].train
    if parse_program(src)[0].name != phase:
        raise ValueError(f"cell {name!r} shares its first phase {phase!r} with cell "
                         f"{src_name!r}, whose program does not start with it")
    a, b = json.loads(src.to_json()), json.loads(study.cells[name].train.to_json())
    fields = SHARED_FIELDS + (phase,)
    diffs = config_differences({k: a.get(k) for k in fields}, {k: b.get(k) for k in fields})
    if diffs:
        raise ValueError(f"cell {name!r} shares phase {phase!r} with cell {src_name!r}, but "
                         f"their configs differ in what it depends on:\n  " + "\n  ".join(diffs))


def check_study_file(workdir: str, study, allow_change: bool):
    path = workdir_lib.study_path(workdir)
    if os.path.exists(path):
        stored = logs.read_json_object(path)
        cells = stored.get("cells")
        for name, c in (cells.items() if isinstance(cells, dict) else ()):
            # A study an older release wrote: its cells' configs with the fields added since.
            if isinstance(c, dict) and isinstance(c.get("train"), dict):
                try:
                    c["train"] = upgrade_config_dict(c["train"])
                except ValueError as e:
                    raise ValueError(f"{path}: cells.{name}.train: {e}") from None
        diffs = config_differences(stored, json.loads(study.to_json()))
        # Where the data are read from may change between machines and reruns.
        diffs = [d for d in diffs if not d.startswith(("data.", "poll_s", "clock_every_s"))]
        if diffs and not allow_change:
            raise ValueError(f"{workdir} holds a study with a different config:\n  "
                             + "\n  ".join(diffs) + "\nUse another --workdir, or pass "
                             "--allow_config_change to continue anyway.")
    logs.write_json(path, json.loads(study.to_json()))


# ----------------------------------------------------------------------------- cells

def copy_shared_phase(workdir: str, study, name: str):
    """Puts the `start_from` cell's finished first phase into cell `name`'s workdir (once)."""
    phase = shared_phase(study, name)
    dst = workdir_lib.stage_dir(workdir_lib.cell_dir(workdir, name), phase)
    if os.path.isdir(dst):
        return
    src = workdir_lib.stage_dir(workdir_lib.cell_dir(workdir, study.cells[name].start_from), phase)
    tmp = f"{dst}.copying"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)


class CellClock:
    """A cell's wall time summed over every process that worked on it, so that a resumed
    cell reports all of its cost. Each process appends its attempt to
    DIR/cells/<cell>/time.json and saves its seconds every `every_s` from a daemon thread:
    a killed process's time counts up to its last save."""

    def __init__(self, path: str, every_s: float):
        self.path = path
        self.attempts = read_json(self.path)["attempts"] if os.path.exists(self.path) else []
        self.start = time.time()
        self.attempts.append({"pid": os.getpid(), "start": self.start, "seconds": 0.0})
        self.every_s = every_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.save()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        self.save()

    def _tick(self):
        while not self.stopped.wait(self.every_s):
            self.save()

    def save(self):
        self.attempts[-1]["seconds"] = time.time() - self.start
        logs.write_json(self.path, {"attempts": self.attempts})


def run_cell(workdir: str, study, name: str) -> dict:
    """Trains (or resumes) and evaluates cell `name`; writes and returns its cell.json."""
    with CellClock(workdir_lib.cell_time_path(workdir, name), study.clock_every_s) as clock:
        result = train_and_evaluate_cell(workdir, study, name)
    # The clock's final record: cell.json and time.json agree exactly.
    result.update(wall_time_s=sum(a["seconds"] for a in clock.attempts),
                  processes=len(clock.attempts), this_process_s=clock.attempts[-1]["seconds"],
                  ran_by=claims.owner())
    logs.write_json(workdir_lib.cell_result_path(workdir, name), result)
    return result


def train_and_evaluate_cell(workdir: str, study, name: str) -> dict:
    """Cell `name`'s results (without its times): its final model evaluated."""
    cdir = workdir_lib.cell_dir(workdir, name)
    cfg = cell_train_config(study, name, workdir)
    if study.cells[name].start_from:
        copy_shared_phase(workdir, study, name)
    summary = train_and_evaluate(cfg, cdir)
    stage = summary["program"][-1]
    e = study.eval
    ev = evaluate_workdir(cdir, stage=stage, attacks=e.attacks, n=e.n, batch=e.batch,
                                   seed=e.seed, data_dir=cfg.data.dir)
    trained = summary["stages"][stage]
    return {
        "cell": name,
        "labels": study.cells[name].labels.to_dict(),
        "stage": stage,
        "natural_acc": ev["natural_acc"],
        "attacks": {label: {"robust_acc": r["robust_acc"], "epsilon": r["epsilon"]}
                    for label, r in ev["attacks"].items()},
        "n": ev.get("n"),
        "train_eval": {k: trained[k] for k in ("nat_acc", "adv_acc", "adv_attack")
                       if k in trained},
        "compression_rate": ev["compression_rate"],
        "size": ev["size"]["total"],
        "warnings": ev["warnings"],
    }


def progress_line(workdir: str, order: list, name: str, t_start: float) -> str:
    done = [n for n in order if workdir_lib.is_cell_done(workdir, n)]
    times = [read_json(workdir_lib.cell_result_path(workdir, n))["wall_time_s"] for n in done]
    left = len(order) - len(done)
    eta = (f"ETA {logs.fmt_duration(left * sum(times) / len(times))} at the mean time of a "
           f"finished cell, one process" if times else "ETA after the first cell")
    return (f"[study] cell {name} ({order.index(name) + 1} of {len(order)}): {len(done)} done, "
            f"{left} left; {logs.fmt_duration(time.time() - t_start)} in this process; {eta}")


def run_study(study, workdir: str, allow_config_change: bool = False, wait: bool = True) -> list:
    """Runs every cell not yet finished that this process can claim; with `wait`, then
    waits for the cells other processes hold. Returns the names of the cells it ran."""
    if jax.process_count() > 1:
        raise NotImplementedError(
            "a study runs each cell in one process; run one study process per machine "
            "(sharing --workdir), not one multi-host program")
    os.makedirs(workdir, exist_ok=True)
    order = validate_study(study, workdir)
    check_study_file(workdir, study, allow_config_change)
    t_start, ran = time.time(), []
    # The report is written by the process that finishes the last cell (or by a rerun of a
    # finished study), not by every process that waited for it.
    write_report = all(workdir_lib.is_cell_done(workdir, n) for n in order)
    logs.log(f"[study] {study.name or workdir}: {len(order)} cells ({', '.join(order)}); "
             f"{sum(workdir_lib.is_cell_done(workdir, n) for n in order)} already done")
    while True:
        pending = [n for n in order if not workdir_lib.is_cell_done(workdir, n)]
        if not pending:
            break
        claimed = False
        for name in pending:
            if not all(workdir_lib.is_cell_done(workdir, d) for d in dependencies(study, name)):
                continue
            with claims.claim(workdir_lib.cell_dir(workdir, name)) as mine:
                if not mine or workdir_lib.is_cell_done(workdir, name):
                    continue
                claimed = True
                logs.log(progress_line(workdir, order, name, t_start))
                try:
                    r = run_cell(workdir, study, name)
                except (ValueError, FileNotFoundError, FloatingPointError) as e:
                    raise type(e)(f"cell {name!r} ({workdir_lib.cell_dir(workdir, name)}): {e}") from e
                ran.append(name)
                write_report = all(workdir_lib.is_cell_done(workdir, n) for n in order)
                logs.log(f"[study] cell {name} done in {logs.fmt_duration(r['wall_time_s'])}: "
                         + cell_line(r))
            break
        if claimed:
            continue
        held = {n: claims.holder(workdir_lib.cell_dir(workdir, n)) for n in pending}
        if not wait:
            logs.log(f"[study] not waiting for {len(pending)} cell(s) held by other processes "
                     f"or waiting for them: {held}")
            return ran
        logs.log(f"[study] waiting {study.poll_s:g} s: cells held by other processes or "
                 f"waiting for them: {held}")
        time.sleep(study.poll_s)
    logs.log(f"[study] all {len(order)} cells done")
    if write_report and logs.is_main_process():
        logs.log(f"[study] report: {report_lib.write_report(workdir)}")
    return ran


def cell_line(r: dict) -> str:
    accs = ", ".join(f"{label} {100 * a['robust_acc']:.2f}%" for label, a in r["attacks"].items())
    return (f"natural {100 * r['natural_acc']:.2f}%, {accs}; compression "
            f"{r['compression_rate']:.2f}x")
