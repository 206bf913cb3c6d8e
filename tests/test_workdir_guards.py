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

from helpers import ROOT, write_idx
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.runtime import claims, logs

sys.path.insert(0, ROOT)
from configs import mnist as mnist_config  # noqa: E402


def smoke_config(idx_dir, **overrides):
    cfg = mnist_config.get_config("smoke")
    cfg.data.source, cfg.data.dir = "files", idx_dir
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


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

    def body(config, wd, allow_config_change):  # the run itself, past its lock
        ran.append(claims.owner_of(os.path.join(wd, workdir_lib.run_lock_name()))["pid"])
        return {}

    monkeypatch.setattr(run_lib, "_train_and_evaluate", body)
    run_lib.train_and_evaluate(cfg, workdir)
    assert ran == [os.getpid()]
