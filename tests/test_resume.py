"""Nothing lost, nothing silent: kill/resume bit for bit, SIGTERM, corrupted checkpoints,
non-finite losses, and every bad input refused before anything compiles. The kill/resume
runs are the five-phase :smoke_program (every phase kind, quantized layers both ways)."""
import os
import random
import shutil
import signal
import subprocess

import jax
import ml_collections
import numpy as np
import pytest

from helpers import (PROGRAM, ROOT, RUN_FLAGS, assert_same_results, cli_command,
                     has_checkpoint, run_and_signal, smoke_config)
from robust_admm import data
from robust_admm import models
from robust_admm.data import batching
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import validation
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.runtime import checkpoint, logs
from robust_admm.training import loop


KILLED = ("admm2", "retrain2")  # an admm phase after a retrain, an STE retrain phase


@pytest.fixture(scope="module")
def idx_dir(program_run):
    return program_run[1]


def files_flags(idx_dir):
    return ["--config.data.source=files", f"--config.data.dir={idx_dir}"]


@pytest.fixture(scope="module")
def reference(program_run):
    """An uninterrupted :smoke_program run (conftest.py)."""
    return program_run[0]


def test_sigkill_in_admm_and_ste_retrain_phases_then_resume_is_bitwise_identical(
        tmp_path, idx_dir, reference):
    rng = random.Random(1234)
    workdir = str(tmp_path / "killed")
    flags = files_flags(idx_dir) + RUN_FLAGS
    outputs, saved = [], []
    for stage in KILLED:
        step = rng.randint(5, 13)  # of 16 steps per stage; checkpoints every 3
        code, out = run_and_signal(workdir, flags, stage, step, signal.SIGKILL,
                                   after_checkpoint=True)
        assert code == -signal.SIGKILL, out[-3000:]
        outputs.append(out)
        saved.append(has_checkpoint(workdir, stage))
    r = subprocess.run(cli_command(workdir, *flags, config=PROGRAM), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    outputs.append(r.stdout)
    # Each rerun resumed the killed stage from its checkpoint (the kill waits for a finished
    # one; a stage whose writes were all still in flight at its last step starts over).
    for stage, out, had_checkpoint in zip(KILLED, outputs[1:], saved):
        assert (f"[{stage}] resuming from step" in out) == had_checkpoint, out[-2000:]
    assert sum(saved) >= 1
    assert_same_results(workdir, reference)


def test_a_stage_killed_before_its_first_checkpoint_starts_over_cleanly(tmp_path, idx_dir,
                                                                          reference):
    """A stage with metrics but no checkpoint (killed before the first one was written)
    restarts from step 0, and its earlier records are dropped, not duplicated."""
    workdir = str(tmp_path / "no_ckpt")
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir_lib.stage_dir(workdir, "retrain2"))
    r = subprocess.run(cli_command(workdir, *files_flags(idx_dir), *RUN_FLAGS, config=PROGRAM),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[retrain2] resuming" not in r.stdout and "[admm2] already complete" in r.stdout
    assert_same_results(workdir, reference)


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path, idx_dir, reference):
    """Pretrain and admm only (`stages`), compared with the reference's two."""
    workdir = str(tmp_path / "preempted")
    flags = files_flags(idx_dir) + [f for f in RUN_FLAGS if "checkpoint.every_steps" not in f] + [
        "--config.checkpoint.every_steps=100",  # only the SIGTERM checkpoint
        "--config.stages=pretrain,admm"]
    code, out = run_and_signal(workdir, flags, "admm", 5, signal.SIGTERM)
    assert code == loop.PREEMPTED_EXIT_CODE, out[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in out
    steps = [d for d in os.listdir(workdir_lib.stage_dir(workdir, "admm")) if d.isdigit()]
    assert steps and all(0 < int(s) < 16 for s in steps)
    r = subprocess.run(cli_command(workdir, *flags, config=PROGRAM), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"[admm] resuming from step {steps[0]}" in r.stdout
    assert_same_results(workdir, reference, ("pretrain", "admm"))


def truncate_files(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(root, name)) // 3)


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path, idx_dir):
    cfg = dict(stages="pretrain", **{"checkpoint.every_steps": 3, "checkpoint.keep": 10})
    workdir = str(tmp_path / "w")
    first = run_lib.train_and_evaluate(smoke_config(idx_dir, **cfg), workdir)
    params = workdir_lib.load_final_state(workdir, "pretrain")["params"]
    ckdir = workdir_lib.stage_dir(workdir, "pretrain")
    truncate_files(os.path.join(ckdir, "16"))
    again = run_lib.train_and_evaluate(smoke_config(idx_dir, **cfg), workdir)
    for summary in (first, again):  # all but the measured speed
        summary["stages"]["pretrain"].pop("speed")
    assert again == first
    jax.tree_util.tree_map(np.testing.assert_array_equal,
                           workdir_lib.load_final_state(workdir, "pretrain")["params"], params)
    assert any(d.startswith("unreadable-16-") for d in os.listdir(ckdir))
    # None readable: a clear error.
    for d in os.listdir(ckdir):
        if d.isdigit():
            truncate_files(os.path.join(ckdir, d))
    with pytest.raises(checkpoint.CheckpointError, match="no readable checkpoint"):
        run_lib.train_and_evaluate(smoke_config(idx_dir, **cfg), workdir)


def test_moving_aside_never_reuses_a_name(tmp_path, monkeypatch):
    # The same step found unreadable twice within one second (CI saw it: the rename onto
    # the first one's non-empty folder failed).
    monkeypatch.setattr(checkpoint.time, "time", lambda: 1234.5)
    moved = []
    for content in ("first", "second", "third"):
        step = tmp_path / "16"
        step.mkdir()
        (step / "f").write_text(content)
        moved.append(checkpoint._move_aside(str(step), "unreadable-16"))
    assert [os.path.basename(m) for m in moved] == [
        "unreadable-16-1234", "unreadable-16-1234-2", "unreadable-16-1234-3"]
    assert [open(os.path.join(m, "f")).read() for m in moved] == ["first", "second", "third"]
    assert not (tmp_path / "16").exists()
    # Already moved by another process of the run: nothing to do, no error.
    assert checkpoint._move_aside(str(tmp_path / "16"), "unreadable-16") is None


def test_a_workdir_with_another_config_is_refused(tmp_path, idx_dir):
    workdir = str(tmp_path / "w")
    run_lib.train_and_evaluate(smoke_config(idx_dir, stages="pretrain",
                                          **{"pretrain.epochs": 1}), workdir)
    with pytest.raises(ValueError, match=r"admm.rho: 0.001 -> 0.5"):
        run_lib.train_and_evaluate(smoke_config(idx_dir, stages="pretrain",
                                              **{"pretrain.epochs": 1, "admm.rho": 0.5}),
                                 workdir)
    # An explicit override allows it; fields that do not change results never need one.
    run_lib.train_and_evaluate(smoke_config(idx_dir, stages="pretrain", log_every_steps=2,
                                          **{"pretrain.epochs": 1, "admm.rho": 0.5}),
                             workdir, allow_config_change=True)


def test_a_diverging_run_stops_with_the_step_stage_and_checkpoint(tmp_path, idx_dir):
    # SGD with an absurd learning rate overflows the weights: the loss becomes non-finite.
    cfg = smoke_config(idx_dir, stages="pretrain", log_every_steps=5,
                       **{"pretrain.optimizer": "sgd", "pretrain.lr": 1e30,
                          "checkpoint.every_steps": 1})
    with pytest.raises(FloatingPointError,
                       match=r"\[pretrain\] non-finite loss or gradients at step \d+ .*"
                             r"the update was not applied .*last good checkpoint: \d+"):
        run_lib.train_and_evaluate(cfg, str(tmp_path / "w"))


def test_skip_policy_goes_past_nonfinite_steps_without_applying_them(tmp_path, idx_dir):
    cfg = smoke_config(idx_dir, stages="pretrain", log_every_steps=4,
                       **{"pretrain.optimizer": "sgd", "pretrain.lr": 1e30,
                          "nonfinite.policy": "skip", "nonfinite.max_consecutive": 100})
    summary = run_lib.train_and_evaluate(cfg, str(tmp_path / "w"))
    state = workdir_lib.load_final_state(str(tmp_path / "w"), "pretrain")
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state["params"]))
    # Steps were skipped (lr 1e30 overflows the logits), so the policy was exercised.
    records = logs.read_jsonl(workdir_lib.metrics_path(str(tmp_path / "w")))
    assert any(r["nonfinite"] > 0 for r in records if r["kind"] == "train")
    # 16 steps on random labels teach nothing: the reported accuracy is checked against
    # the saved final weights evaluated here directly (the model alone, no eval step), in
    # the eval's batch size; examples whose top two logits lie within 1e-4 may go either
    # way. (These weights overflow: every logit row holds NaN, and both argmaxes take the
    # first NaN, class 0.)
    _, _, test = run_lib.load_data(cfg)
    model = models.get_model(cfg.model.name, 10, cfg.model.width, cfg.model.dtype)
    b = cfg.eval.batch_size
    logits = np.concatenate([np.asarray(models.apply_model(
        model, state["params"], state["batch_stats"],
        batching.to_pixels(test.images[i:i + b]), train=False)[0])
        for i in range(0, len(test.labels), b)])
    top2 = np.sort(logits, axis=1)[:, -2:]
    near_ties = int(np.sum(top2[:, 1] - top2[:, 0] < 1e-4))
    correct = int(np.sum(logits.argmax(-1) == test.labels))
    nat_acc = summary["stages"]["pretrain"]["nat_acc"]
    assert abs(nat_acc * len(test.labels) - correct) <= near_ties + 1e-9, (nat_acc, correct)


@pytest.mark.parametrize("overrides,message", [
    ({"attack.epsilon": -0.1}, "attack.epsilon=-0.1 is not allowed"),
    ({"attack.step_size": 0.0}, "attack.step_size=0.0 is not allowed"),
    ({"eval.epsilon": 1.5}, r"eval.epsilon=1.5 is not allowed.*\[0, 1\]"),
    ({"eval.loss": "kl"}, "eval.loss='kl' is not allowed.*'ce', 'margin', 'dlr'"),
    ({"attack.loss": "hinge"}, "attack.loss='hinge' is not allowed"),
    ({"attack.num_steps": -1}, "attack.num_steps=-1 is not allowed"),
    ({"eval.step_size": -1.0}, "eval.step_size=-1.0 is not allowed"),
    ({"prune.ratios": "conv1=1.0"}, "ratio 1.0 for 'conv1' is outside \\[0, 1\\)"),
    ({"prune.ratios": "conv1=-0.2"}, "outside \\[0, 1\\)"),
    ({"prune.kind": "diagonal"}, "prune.kind='diagonal' is not allowed"),
    ({"model.name": "alexnet"}, "model.name='alexnet' is not a known model"),
    ({"data.name": "svhn"}, "data.name='svhn' is not allowed"),
    ({"data.source": "http"}, "data.source='http' is not allowed"),
    ({"data.augment": "mixup"}, "data.augment='mixup' is not allowed.*crop_flip"),
    ({"model.dtype": "float16"}, "model.dtype='float16' is not allowed.*bfloat16"),
    ({"program": ""}, "program='' is empty"),
    ({"program": "pretrain,attack"}, "'attack' is not a phase"),
    ({"program": "pretrain,admm,admm"}, "names phase 'admm' twice"),
    ({"retrain.kind": "finetune"}, "retrain.kind='finetune' is not allowed"),
    ({"admm.rules": "fc1=irregular"}, "'irregular' takes one value"),
    ({"admm.rules": "fc1=nm:2"}, "'nm' takes N and M"),
    ({"admm.rules": "fc1=prune:0.5"}, "unknown set 'prune'"),
    ({"admm.rules": "fc1=irregular:0.5+filter:0.5"}, "at most one sparsity set"),
    ({"admm.rules": "fc1=irregular:x"}, "ratio='x' is not a number"),
    ({"admm.rules": "fc1"}, "not 'layer=set'"),
    ({"admm.update_every_epochs": 0}, "admm.update_every_epochs=0 is not allowed"),
    ({"admm.attack_steps": -2}, "admm.attack_steps=-2 is not allowed.*None for attack"),
    ({"retrain.attack_step_size": 0.0}, "retrain.attack_step_size=0.0 is not allowed"),
    ({"stages": "pretrain,finetune"}, "unknown stage 'finetune'"),
    ({"stages": "retrain,pretrain"}, "out of order"),
    ({"pretrain.lr": 0.0}, "pretrain: lr=0.0 must be > 0"),
    ({"admm.schedule": "steps"}, "admm: schedule='steps' is not known"),
    ({"admm.rho": 0.0}, "admm.rho=0.0 is not allowed"),
    ({"nonfinite.policy": "ignore"}, "nonfinite.policy='ignore' is not allowed"),
    ({"setting": "robust"}, "setting='robust' is not allowed"),
    ({"objective": "fgsm_at"}, "objective='fgsm_at' is not allowed.*'pgd_at', 'trades'"),
    ({"objective_beta": -1.0}, "objective_beta=-1.0 is not allowed"),
    ({"label_smoothing": 1.0}, r"label_smoothing=1.0 is not allowed: a number in \[0, 1\)"),
    ({"label_smoothing": -0.1}, "label_smoothing=-0.1 is not allowed"),
    ({"mixup_alpha": -0.2}, "mixup_alpha=-0.2 is not allowed: a number >= 0"),
    ({"objective": "trades", "setting": "natural"}, "objective='trades' needs an attack"),
    ({"objective": "trades", "attack.loss": "margin"},
     "attack.loss='margin' with objective='trades'"),
])
def test_bad_config_values_are_named(overrides, message, idx_dir):
    with pytest.raises(ValueError, match=message):
        validation.validate_config(smoke_config(idx_dir, **overrides), device_count=1)


def test_prune_kind_points_to_rules_for_what_it_cannot_say(idx_dir):
    with pytest.raises(ValueError, match="prune.kind='quantize' is not allowed.*rules"):
        validation.validate_config(smoke_config(idx_dir, **{"prune.kind": "quantize"}),
                                   device_count=1)


def test_a_batch_not_divisible_by_the_devices_is_refused(idx_dir):
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by the number of "
                                         r"devices \(8\).*Nearest valid values: 8 or 16"):
        validation.validate_config(smoke_config(idx_dir, batch_size=12), device_count=8)
    with pytest.raises(ValueError, match=r"eval.batch_size=36 is not divisible .*\(8\)"):
        validation.validate_config(smoke_config(idx_dir, **{"eval.batch_size": 36}),
                                   device_count=8)


def test_a_prune_key_that_matches_no_layer_is_refused_before_training(tmp_path, idx_dir):
    with pytest.raises(ValueError, match="from prune.kind / prune.ratios.*'conv9' matches no"):
        run_lib.train_and_evaluate(smoke_config(idx_dir, **{"prune.ratios": "conv9=0.5"}),
                                 str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_a_missing_or_wrong_dataset_folder_is_refused(tmp_path, idx_dir):
    with pytest.raises(data.DataError, match="does not exist|not found|missing"):
        run_lib.train_and_evaluate(smoke_config(str(tmp_path / "nope")), str(tmp_path / "w"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(idx_dir):
        (bad / name).write_bytes(b"\x00\x00\x08\x99" + b"\x00" * 64)
    with pytest.raises(data.DataError, match="magic"):
        run_lib.train_and_evaluate(smoke_config(str(bad)), str(tmp_path / "w2"))


def test_a_nan_in_the_input_pixels_stops_the_run(tmp_path, idx_dir, monkeypatch):
    """Stored images are uint8 and cannot hold a NaN, so the NaN is injected where they
    become floats; the guard is the same one a diverging loss meets."""
    from robust_admm.training import step as step_lib
    to_pixels = batching.to_pixels
    monkeypatch.setattr(step_lib, "to_pixels",
                        lambda u: to_pixels(u).at[0, 0, 0, 0].set(float("nan")))
    cfg = smoke_config(idx_dir, stages="pretrain", log_every_steps=4)
    with pytest.raises(FloatingPointError, match=r"\[pretrain\] non-finite loss or gradients "
                                                 r"at step 1 .*no checkpoint of this stage yet"):
        run_lib.train_and_evaluate(cfg, str(tmp_path / "w"))


@pytest.mark.parametrize("flags,carried", [
    ([], 0), ([], 3), ([1, 1, 0, 1], 0), ([1, 1, 1, 0, 0, 1, 1], 2), ([0, 0], 5), ([1] * 7, 1)])
def test_nonfinite_streaks_match_brute_force(flags, carried):
    seq = [1] * carried + flags

    def run_ending_at(j):  # length of the run of 1s ending at seq[j - 1]
        return next(k for k in range(j, -1, -1) if all(seq[j - k:j]))

    ends = range(carried + 1, len(seq) + 1)  # runs that end inside this window
    longest, trailing = loop.nonfinite_streaks([bool(f) for f in flags], carried)
    assert longest == max((run_ending_at(j) for j in ends), default=0)
    assert trailing == run_ending_at(len(seq))


def test_a_nonfinite_streak_that_ends_between_log_lines_still_stops_the_run():
    """optax's counter is 0 again after the finite step that ends the streak; the check
    reads the longest streak from the history instead."""
    cfg = ml_collections.ConfigDict({"policy": "skip", "max_consecutive": 4})
    history = [{"step": s, "nonfinite": int(s in (3, 4, 5, 6, 7))} for s in range(1, 10)]
    with pytest.raises(FloatingPointError, match=r"at most 5 in a row; "
                                                 r"nonfinite.max_consecutive=4"):
        loop.check_nonfinite("pretrain", history, 0, cfg, None)
    # A streak split over two log windows counts as one.
    first = [{"step": s, "nonfinite": int(s >= 3)} for s in range(1, 5)]
    second = [{"step": s, "nonfinite": int(s <= 6)} for s in range(5, 9)]
    streak = loop.check_nonfinite("pretrain", first, 0, cfg, None)
    assert streak == 2
    with pytest.raises(FloatingPointError, match="at most 4 in a row"):
        loop.check_nonfinite("pretrain", second, streak, cfg, None)
    # Shorter streaks are skipped with a warning and the trailing streak is returned.
    assert loop.check_nonfinite("pretrain", first[:3], 0, cfg, None) == 1


def as_release_01(stage_dir: str, step: int):
    """Rewrites the checkpoint of `step` in `stage_dir` in robust-admm 0.1's layout: ADMM's
    Z, U and rho beside the optimizer's state (empty outside an admm phase), the state of
    the optimizer the compression transformation wraps in its place."""
    import orbax.checkpoint as ocp
    path = os.path.join(stage_dir, str(step))
    with ocp.PyTreeCheckpointer() as ckpt:
        tree = ckpt.metadata(os.path.join(path, "state")).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        raw = ckpt.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
            restore_args=args))
    with ocp.CheckpointManager(stage_dir) as mngr:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    opt = raw["opt_state"]
    wrapped = isinstance(opt, dict) and "inner" in opt and "masks" in opt
    old = dict(raw, opt_state=opt["inner"] if wrapped else opt,
               admm=opt["admm"] if wrapped and "admm" in opt else {"z": {}, "u": {}, "rho": {}})
    shutil.rmtree(path)
    mngr = checkpoint.manager(stage_dir, keep=10)
    checkpoint.save(mngr, step, old, meta)
    mngr.wait_until_finished()
    mngr.close()
    assert checkpoint.saved_fields(stage_dir, step) == {
        "step", "params", "batch_stats", "opt_state", "masks", "admm", "key"}
    return wrapped


def test_a_workdir_of_release_01_resumes_and_ends_as_an_uninterrupted_run(tmp_path, idx_dir,
                                                                          reference):
    """The :smoke_program's run with its finished phases' checkpoints and a mid-phase one
    of admm2 (after a retrain: masks) rewritten in 0.1's layout, the rest removed: rerun,
    every phase is read and converted, admm2 resumes, and the run ends bit for bit as the
    uninterrupted one."""
    workdir = str(tmp_path / "old")
    shutil.copytree(reference, workdir)
    ckpts = os.path.join(workdir, "checkpoints")
    shutil.rmtree(os.path.join(ckpts, "retrain2"))
    steps = sorted(int(s) for s in os.listdir(os.path.join(ckpts, "admm2")) if s.isdigit())
    for s in steps[1:]:  # resume admm2 from its oldest kept checkpoint, mid-phase
        shutil.rmtree(os.path.join(ckpts, "admm2", str(s)))
    assert 0 < steps[0] < 16
    wrapped = {stage: as_release_01(os.path.join(ckpts, stage), 16)
               for stage in ("pretrain", "admm", "retrain")}
    wrapped["admm2"] = as_release_01(os.path.join(ckpts, "admm2"), steps[0])
    assert wrapped == {"pretrain": False, "admm": True, "retrain": True, "admm2": True}
    r = subprocess.run(cli_command(workdir, *files_flags(idx_dir), *RUN_FLAGS, config=PROGRAM),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("was written by robust-admm 0.1: read in its layout and converted") == 4
    assert f"[admm2] resuming from step {steps[0]} of 16" in r.stdout
    summaries = []
    for path in (workdir, reference):
        summary = logs.read_json_object(os.path.join(path, "summary.json"))
        for stage in summary["stages"].values():
            stage.pop("speed")
        summaries.append(summary)
    assert summaries[0] == summaries[1]
    for stage in ("pretrain", "admm", "retrain", "admm2", "retrain2"):
        a = workdir_lib.load_final_state(workdir, stage)
        b = workdir_lib.load_final_state(reference, stage)
        # The finished phases were read, not rewritten: their optimizer state is 0.1's.
        parts = ("params", "masks", "batch_stats", "key", "step") + (
            ("opt_state",) if stage in ("admm2", "retrain2") else ())
        for part in parts:
            jax.tree_util.tree_map(np.testing.assert_array_equal, a[part], b[part])


def test_a_checkpoint_of_an_unknown_layout_is_refused_naming_its_fields(tmp_path):
    """Neither this release's fields nor an earlier layout's: an error naming both, and the
    checkpoint left where it is (not moved aside as unreadable)."""
    stage_dir = str(tmp_path / "stage")
    mngr = checkpoint.manager(stage_dir)
    checkpoint.save(mngr, 17, {"weights": np.zeros(3)}, {"stage": "s", "complete": False})
    mngr.wait_until_finished()
    older = [checkpoint.Layout("release 0", {"w": np.zeros(3), "old": np.zeros(1)}, dict)]
    with pytest.raises(checkpoint.LayoutError,
                       match=r"holds the fields \['weights'\]; this release reads \['params'\] "
                             r"or release 0's \['old', 'w'\]"):
        checkpoint.restore_latest(mngr, {"params": np.zeros(3)}, older=older)
    mngr.close()
    assert os.listdir(stage_dir) == ["17"]
    # A known earlier layout is read in it and converted.
    mngr = checkpoint.manager(stage_dir)
    older = [checkpoint.Layout("release 0", {"weights": np.zeros(3)},
                               lambda old: {"params": old["weights"] + 1})]
    state, meta, step = checkpoint.restore_latest(mngr, {"params": np.zeros(3)}, older=older)
    mngr.close()
    np.testing.assert_array_equal(state["params"], np.ones(3))
    assert step == 17 and meta == {"stage": "s", "complete": False}
