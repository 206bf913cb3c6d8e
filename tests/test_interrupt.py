"""SIGTERM during an evaluation: in training it stops the evaluation between batches,
saves a checkpoint and exits (the resumed run runs that evaluation first and ends bit for
bit as an uninterrupted one); in `robust_admm.eval` it saves the finished attack batches
and a rerun computes only the rest, ending with the uninterrupted numbers. The signal is
a real SIGTERM sent to this process while a batch runs; the runs are in-process."""
import dataclasses
import json
import os
import shutil
import signal
import sys
import time

import jax
import numpy as np

import pytest

from helpers import ROOT, assert_same_results
from robust_admm.evaluation import robustness
from robust_admm.attacks import Pgd
from robust_admm.experiments import eval_resume
from robust_admm.experiments import evaluate as evaluate_lib
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.runtime import checkpoint
from robust_admm.training import loop

sys.path.insert(0, ROOT)
from configs import mnist as mnist_config  # noqa: E402

EVAL_BATCHES = 2  # 48 test images in evaluation batches of 32


def pretrain_config(idx_dir):
    """The pretrain phase of conftest's `program_run` (:smoke_program with the test flags
    of helpers.RUN_FLAGS) alone: 2 epochs of 8 steps, evaluated after each."""
    cfg = mnist_config.get_config("smoke_program")
    cfg.data.source, cfg.data.dir = "files", idx_dir
    cfg.log_every_steps, cfg.checkpoint.every_steps, cfg.attack.num_steps = 1, 3, 30
    cfg.stages = "pretrain"
    return cfg


@pytest.fixture(scope="module")
def reference(program_run):
    """(workdir, idx folder) of an uninterrupted run whose pretrain phase is
    `pretrain_config`'s."""
    return program_run


def sigterm_after(calls: list, when: int):
    """Sends SIGTERM to this process once the `when`-th call has returned."""
    def after(result):
        calls.append(time.perf_counter())
        if len(calls) == when:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    return after


def counting_eval_step(monkeypatch, calls, when):
    """Every evaluation batch of the runs counted in `calls`; SIGTERM after the
    when["k"]-th."""
    make = run_lib.make_eval_step

    def make_counted(*args, **kw):
        step = make(*args, **kw)
        return lambda *a: sigterm_after(calls, when["k"])(step(*a))
    monkeypatch.setattr(run_lib, "make_eval_step", make_counted)


def test_sigterm_during_training_evaluations_checkpoints_at_once_and_resumes_equal(
        tmp_path, monkeypatch, reference):
    """SIGTERM during the first batch of epoch 1's evaluation (mid-phase), then, in the
    resumed run, of epoch 2's (the phase's last step): each time a checkpoint at that step
    and no further batch; the last rerun ends as the uninterrupted run."""
    reference, idx_dir = reference
    workdir = str(tmp_path / "w")
    ckdir = workdir_lib.stage_dir(workdir, "pretrain")
    calls, when = [], {}
    counting_eval_step(monkeypatch, calls, when)
    evals = lambda: [r["epoch"] for r in workdir_lib_records(workdir) if r["kind"] == "eval"]
    # (the batch after which SIGTERM comes, the batches the run evaluates in all)
    for epoch, (k, batches) in enumerate([(1, 1), (EVAL_BATCHES + 1, EVAL_BATCHES + 1)], 1):
        calls.clear()
        when["k"] = k
        with pytest.raises(loop.Preempted) as stopped:
            run_lib.train_and_evaluate(pretrain_config(idx_dir), workdir)
        t_exit = time.perf_counter()
        assert stopped.value.code == loop.PREEMPTED_EXIT_CODE
        # No evaluation batch ran after the signal, and the exit came within 5 s of it.
        assert len(calls) == batches
        assert t_exit - calls[k - 1] < 5.0
        with checkpoint.manager(ckdir) as mngr:
            assert mngr.latest_step() == 8 * epoch
        assert evals() == list(range(1, epoch))
    # The rerun evaluates epoch 2 first and ends the phase.
    calls.clear()
    when["k"] = -1
    run_lib.train_and_evaluate(pretrain_config(idx_dir), workdir)
    assert len(calls) == EVAL_BATCHES
    assert evals() == [1, 2]
    assert_same_results(workdir, reference, ("pretrain",))


def workdir_lib_records(workdir):
    with open(workdir_lib.metrics_path(workdir)) as f:
        return [json.loads(line) for line in f]


ATTACKS = "fgsm,pgd3"
STAGE = "retrain2"  # the last phase of `program_run`


def strip_times(result):
    """An eval result without what is measured (seconds) or where it is (the workdir)."""
    if isinstance(result, dict):
        return {k: strip_times(v) for k, v in result.items()
                if k not in ("seconds", "member_seconds", "wall_time_s", "workdir",
                             "epsilon_curve")}
    return result


def test_sigterm_during_robust_admm_eval_saves_batches_and_a_rerun_resumes_equal(
        tmp_path, monkeypatch, program_run, capsys):
    reference = str(tmp_path / "reference")
    shutil.copytree(program_run[0], reference)
    workdir = str(tmp_path / "w")
    shutil.copytree(program_run[0], workdir)
    fooled_fn = robustness.LogitsEvaluator.fooled_fn
    calls, when = [], {"k": -1}

    def counted(self, attack):  # every attack batch counted, SIGTERM after the k-th
        fn = fooled_fn(self, attack)
        return lambda *a: sigterm_after(calls, when["k"])(fn(*a))
    monkeypatch.setattr(robustness.LogitsEvaluator, "fooled_fn", counted)
    kw = dict(attacks=ATTACKS, batch=1, n=0, checks=False, loop="host")
    whole = evaluate_lib.evaluate_workdir(reference, **kw)
    total = len(calls)
    assert total >= 6  # each attack ran on several batches
    assert not os.path.exists(workdir_lib.eval_partial_path(reference, STAGE))

    calls.clear()
    k = when["k"] = 3
    capsys.readouterr()
    with pytest.raises(loop.Preempted) as stopped:
        evaluate_lib.evaluate_workdir(workdir, **kw)
    t_exit = time.perf_counter()
    assert stopped.value.code == loop.PREEMPTED_EXIT_CODE
    assert len(calls) == k and t_exit - calls[-1] < 5.0  # stopped before the next batch
    partial = workdir_lib.eval_partial_path(workdir, STAGE)
    assert f"SIGTERM: {k} attack batches saved in {partial}" in capsys.readouterr().out
    assert not os.path.exists(workdir_lib.eval_path(workdir, STAGE))

    calls.clear()
    when["k"] = -1
    again = evaluate_lib.evaluate_workdir(workdir, **kw)
    assert f"resuming: {k} finished attack batches in {partial}" in capsys.readouterr().out
    assert len(calls) == total - k  # only the rest
    assert not os.path.exists(partial)
    assert strip_times(again) == strip_times(whole)
    with open(workdir_lib.eval_path(workdir, STAGE)) as f:
        assert strip_times(json.load(f)) == strip_times(json.loads(json.dumps(whole)))


def test_a_saved_batch_is_reused_only_for_the_same_arguments_and_the_same_computation(
        tmp_path):
    path, logged = str(tmp_path / "s.partial.json"), []
    identity = {"stage": "retrain", "attacks": "pgd3", "seed": 0}
    rng = np.random.default_rng(0)
    x, y = rng.random((6, 4, 4, 1), np.float32), rng.integers(0, 10, 6)
    rows, fooled = np.array([0, 2, 3, 5]), np.array([True, False, False, True])
    attack, key = Pgd(epsilon=0.1, step_size=0.05, num_steps=3), jax.random.PRNGKey(0)
    args = ("pgd3", 1, attack, key, x, y, rows)
    j = eval_resume.BatchJournal(path, identity, log=logged.append)
    assert j.get(*args) is None
    j.put(*args, fooled)
    again = eval_resume.BatchJournal(path, identity, log=logged.append)
    np.testing.assert_array_equal(again.get(*args), fooled)
    assert "resuming: 1 finished attack batches" in logged[-1]
    # Anything that decides the batch's result differs: not reused.
    x2 = x.copy()
    x2[3, 0, 0, 0] += 1e-3
    for changed in [("pgd3", 2, attack, key, x, y, rows),  # another batch index
                    ("pgd3", 1, dataclasses.replace(attack, epsilon=0.2), key, x, y, rows),
                    ("pgd3", 1, attack, jax.random.PRNGKey(1), x, y, rows),
                    ("pgd3", 1, attack, key, x2, y, rows),  # a pixel of one of its points
                    ("pgd3", 1, attack, key, x, y, rows[:3])]:
        assert again.get(*changed) is None
    # Other arguments: the file is set aside, with a log line, and nothing is reused.
    other = eval_resume.BatchJournal(path, dict(identity, seed=1), log=logged.append)
    assert other.get(*args) is None and "set aside" in logged[-1]
    assert os.path.exists(path + ".discarded") and not os.path.exists(path)
