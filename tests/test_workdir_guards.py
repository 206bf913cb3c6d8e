"""A workdir's guards: one writer at a time (a second process refused at once, naming the
holder; a killed holder's lock does not block), data changed under a run refused on
resume, and checkpoints on a full or read-only disk (the error names path and step, the
previous checkpoint resumes)."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, smoke_config, write_idx
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.runtime import claims, logs



@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    import numpy as np
    return write_idx(str(tmp_path_factory.mktemp("idx")), np.random.default_rng(0),
                     n_train=64, n_test=16)


# ----------------------------------------------------------------------------- one writer

# A plain Python process (no JAX) that holds a workdir as a run does, then claims the
# folders it is sent on stdin and answers whether it could.
HOLDER = """import sys
from robust_admm.runtime import claims
with claims.hold(sys.argv[1], "workdir"):
    print("held", flush=True)
    for line in sys.stdin:
        with claims.claim(line.strip()) as mine:
            print(mine, flush=True)
"""


def test_a_second_process_on_a_held_workdir_is_refused_at_once_naming_the_holder(
        tmp_path, idx_dir, monkeypatch, capsys):
    workdir = str(tmp_path / "w")
    cfg = smoke_config(idx_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"{socket.gethostname()}:{holder.pid}"
        t0 = time.time()
        with pytest.raises(claims.HeldError, match=rf"workdir {workdir} is held by "
                                                   rf"{who} \(since "):
            run_lib.train_and_evaluate(cfg, workdir)
        assert time.time() - t0 < 5  # refused at once: nothing loaded, nothing compiled
        assert not os.path.exists(workdir_lib.config_path(workdir))  # nothing written
        # The command line prints the message alone and exits with status 2.
        with pytest.raises(SystemExit) as exit_:
            logs.exit_on_error(run_lib.train_and_evaluate, cfg, workdir,
                               errors=(claims.HeldError,))
        assert exit_.value.code == 2 and who in capsys.readouterr().err
        # Process 1 of a multi-process run holds its own lock in the same workdir.
        with workdir_lib.hold_run(workdir, 1):
            pass
        # A study cell: its claim and its run's hold are two files, so leaving the run's
        # hold keeps the claim (one POSIX lock file taken twice would have dropped it).
        cell = str(tmp_path / "cell")
        with claims.claim(cell) as mine:
            assert mine
            with workdir_lib.hold_run(cell):
                pass
            holder.stdin.write(cell + "\n")
            holder.stdin.flush()
            assert holder.stdout.readline().strip() == "False"
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock goes with it
        holder.wait()
    ran = []

    def body(config, wd, *allow):  # the run itself, past its lock
        ran.append(claims.owner_of(os.path.join(wd, workdir_lib.run_lock_name()))["pid"])
        return {}

    monkeypatch.setattr(run_lib, "_train_and_evaluate", body)
    run_lib.train_and_evaluate(cfg, workdir)
    assert ran == [os.getpid()]


EVAL_HOLDER = """import sys
from robust_admm.experiments import workdir
with workdir.hold_eval(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_evaluation_of_a_stage_is_refused_naming_the_first(tmp_path, capsys):
    """Two evaluations of one stage would write the same journal and result: the second is
    refused at once naming the first (host:pid); another stage is not blocked, and once
    the first is gone the evaluation runs."""
    from configs import digits as digits_config
    from robust_admm.experiments import evaluate
    config = digits_config.get_config("smoke")
    config.setting, config.stages, config.pretrain.epochs = "natural", "pretrain", 1
    config.eval.num_steps = 0
    workdir = str(tmp_path / "w")
    run_lib.train_and_evaluate(config, workdir)
    holder = subprocess.Popen([sys.executable, "-c", EVAL_HOLDER, workdir, "pretrain"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = f"{socket.gethostname()}:{holder.pid}"
        with pytest.raises(claims.HeldError, match=rf"the evaluation of stage 'pretrain' in "
                                                   rf"\S+ is held by {who} \(since "):
            evaluate.evaluate_workdir(workdir, attacks="fgsm", n=8, checks=False)
        assert not os.path.exists(workdir_lib.eval_path(workdir, "pretrain"))
        with workdir_lib.hold_eval(workdir, "admm"):  # another stage's lock is free
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    out = evaluate.evaluate_workdir(workdir, attacks="fgsm", n=8, checks=False)
    assert os.path.exists(workdir_lib.eval_path(workdir, "pretrain")) and out["n"] == 8


# ----------------------------------------------------------------------------- data changed

class Stop(Exception):
    """Raised by a patched model builder: the run stops after its data checks."""


def start_run(cfg, workdir, monkeypatch, **allow):
    """Runs `cfg` in `workdir` up to building the model (past config and data checks)."""
    def stop(*args, **kwargs):
        raise Stop
    monkeypatch.setattr(run_lib, "get_model", stop)
    with pytest.raises(Stop):
        run_lib.train_and_evaluate(cfg, workdir, **allow)


def test_a_resume_on_changed_data_is_refused_naming_what_changed(tmp_path, monkeypatch,
                                                                  capsys):
    import numpy as np
    data = str(tmp_path / "idx")
    write_idx(data, np.random.default_rng(0), n_train=64, n_test=16)
    cfg = smoke_config(data, **{"data.train_examples": 32})
    workdir = str(tmp_path / "w")
    start_run(cfg, workdir, monkeypatch)
    recorded = logs.read_json(workdir_lib.data_path(workdir))
    assert recorded["train"]["examples"] == 64  # the whole split, not the subset
    start_run(cfg, workdir, monkeypatch)  # the same data: resumes
    # Other training images (the same count and labels), then one training example more.
    rng = np.random.default_rng(0)
    write_idx(data, np.random.default_rng(1), n_train=64, n_test=16)
    for allow in ({}, {"allow_config_change": True}):
        with pytest.raises(workdir_lib.DataChangedError,
                           match=r"train\.images_sha256: '\w{12}' -> '\w{12}'") as e:
            run_lib.train_and_evaluate(cfg, workdir, **allow)
        assert "test." in str(e.value) and "--allow_data_change" in str(e.value)
    write_idx(data, rng, n_train=65, n_test=16)
    with pytest.raises(workdir_lib.DataChangedError, match=r"train\.examples: 64 -> 65"):
        run_lib.train_and_evaluate(cfg, workdir)
    # The named override goes on, and records the new data.
    capsys.readouterr()
    start_run(cfg, workdir, monkeypatch, allow_data_change=True)
    assert "train.examples: 64 -> 65" in capsys.readouterr().out
    assert logs.read_json(workdir_lib.data_path(workdir))["train"]["examples"] == 65
    # A workdir from before fingerprints: recorded at its next run, said in the log.
    os.remove(workdir_lib.data_path(workdir))
    start_run(cfg, workdir, monkeypatch)
    assert "recorded no data fingerprint" in capsys.readouterr().out
    assert logs.read_json(workdir_lib.data_path(workdir))["train"]["examples"] == 65


def test_file_fingerprints_hash_small_splits_whole_and_sample_large_ones(tmp_path,
                                                                         monkeypatch):
    import hashlib
    from robust_admm.data import fingerprint
    root = tmp_path / "d"
    paths = []
    for i in range(10):  # 10 files of 300 KiB: some bytes in the middle of each
        p = root / f"c{i % 2}" / f"{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * (300 << 10))
        paths.append(str(p))
    whole = fingerprint.of_files({"train": paths}, str(root))["train"]
    assert whole["contents_sha256"] == hashlib.sha256(
        b"".join(open(p, "rb").read() for p in paths)).hexdigest()  # every byte, in order
    assert (whole["files"], whole["bytes"]) == (10, 10 * (300 << 10))

    def changed(path, offset):  # one byte of `path` changed in place, size kept
        data = bytearray(open(path, "rb").read())
        data[offset] ^= 0xFF
        open(path, "wb").write(bytes(data))

    changed(paths[3], 150 << 10)  # the middle of a file
    after = fingerprint.of_files({"train": paths}, str(root))["train"]
    assert fingerprint.differences(whole, after) == [
        f"contents_sha256: {whole['contents_sha256'][:12]!r} -> "
        f"{after['contents_sha256'][:12]!r}"]
    # Over WHOLE_BYTES: the edges of SAMPLE_FILES files are read, and every size and name.
    monkeypatch.setattr(fingerprint, "WHOLE_BYTES", 1 << 20)
    monkeypatch.setattr(fingerprint, "SAMPLE_FILES", 5)  # files 0, 2, 4, 6, 8
    sampled = fingerprint.of_files({"train": paths}, str(root))["train"]
    assert "of 5 of 10 files" in sampled["contents"]
    edges = b"".join(open(paths[i], "rb").read()[:1 << 16] + open(paths[i], "rb").read()[-(1 << 16):]
                     for i in (0, 2, 4, 6, 8))
    assert sampled["contents_sha256"] == hashlib.sha256(edges).hexdigest()
    changed(paths[3], 0)  # an unsampled file changed in place: not seen (the documented cost)
    assert fingerprint.of_files({"train": paths}, str(root))["train"] == sampled
    changed(paths[4], (300 << 10) - 1)  # a sampled file's last byte
    assert fingerprint.of_files({"train": paths}, str(root))["train"][
        "contents_sha256"] != sampled["contents_sha256"]
    with open(paths[5], "ab") as f:  # an unsampled file grown: its size is in the listing
        f.write(b"x")
    d = fingerprint.differences(sampled, fingerprint.of_files({"train": paths}, str(root))["train"])
    assert [x.split(":")[0] for x in d] == ["bytes", "contents_sha256", "names_sizes_sha256"]
    os.rename(paths[9], str(root / "c1" / "renamed.bin"))  # a renamed file
    paths[9] = str(root / "c1" / "renamed.bin")
    a = fingerprint.of_files({"train": paths}, str(root))["train"]
    os.rename(paths[9], str(root / "c1" / "9.bin"))
    paths[9] = str(root / "c1" / "9.bin")
    b = fingerprint.of_files({"train": paths}, str(root))["train"]
    assert a["names_sizes_sha256"] != b["names_sizes_sha256"]


# ----------------------------------------------------------------------------- a full disk

def fail_writes_of(monkeypatch, step: int):
    """The checkpoint writer of `step` fails part way, as on a full disk: its metadata file
    is half written, then ENOSPC (the tests run as root, where a read-only mode does not
    stop writes). Returns the paths it failed on."""
    import errno
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler
    original, failed = handler.JsonCheckpointHandler._save_fn, []

    async def save_fn(self, x, directory):
        if os.path.basename(os.path.dirname(str(directory))).split(".")[0] == str(step):
            (directory / "metadata").write_text('{"sta')
            failed.append(str(directory))
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", save_fn)
    return failed


@pytest.mark.parametrize("surfaces_at", ["wait", "next save"])
def test_a_failed_checkpoint_write_names_step_and_path_and_keeps_the_previous(
        tmp_path, monkeypatch, surfaces_at):
    import jax.numpy as jnp
    import numpy as np
    from robust_admm.runtime import checkpoint
    folder = str(tmp_path / "ckpt")
    mngr = checkpoint.manager(folder, keep=1)  # the previous is the only one kept
    checkpoint.save(mngr, 1, {"w": jnp.arange(4.0)}, {"step": 1})
    mngr.wait_until_finished()
    failed = fail_writes_of(monkeypatch, 2)
    checkpoint.save(mngr, 2, {"w": jnp.arange(4.0) + 1}, {"step": 2})
    with pytest.raises(checkpoint.CheckpointWriteError) as e:
        if surfaces_at == "wait":
            mngr.wait_until_finished()
        else:  # the error of step 2's write, not of step 3's
            checkpoint.save(mngr, 3, {"w": jnp.arange(4.0)}, {"step": 3})
    assert failed and str(e.value).startswith(
        f"could not write the checkpoint of step 2 to {os.path.join(folder, '2')}: OSError: "
        f"[Errno 28] No space left on device")
    assert f"the checkpoint of step 1 in {folder} is intact" in str(e.value)
    assert isinstance(e.value, OSError) and e.value.errno == 28
    mngr.close()
    monkeypatch.undo()
    mngr = checkpoint.manager(folder, keep=1)
    state, meta, step = checkpoint.restore_latest(mngr, {"w": jnp.zeros(4)})
    assert (step, meta) == (1, {"step": 1})
    np.testing.assert_array_equal(state["w"], np.arange(4.0))
    mngr.close()


@pytest.mark.slow  # three runs, each compiling its steps (about 10 s idle, 60 s loaded)
def test_a_run_whose_checkpoint_write_fails_resumes_from_the_previous_and_ends_equal(
        tmp_path, idx_dir, monkeypatch):
    from helpers import assert_same_results
    from robust_admm.runtime import checkpoint
    cfg = smoke_config(idx_dir, stages="pretrain", log_every_steps=1,
                       **{"pretrain.epochs": 1, "checkpoint.every_steps": 1})
    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "w")
    run_lib.train_and_evaluate(cfg, reference)  # 4 steps, a checkpoint after each
    failed = fail_writes_of(monkeypatch, 2)
    with pytest.raises(checkpoint.CheckpointWriteError,
                       match=r"could not write the checkpoint of step 2 to .*checkpoints/"
                             r"pretrain/2: OSError: .*No space left on device.*the "
                             r"checkpoint of step 1 in .* is intact"):
        run_lib.train_and_evaluate(cfg, workdir)
    assert failed
    monkeypatch.undo()
    run_lib.train_and_evaluate(cfg, workdir)  # resumes from step 1
    assert_same_results(workdir, reference)
