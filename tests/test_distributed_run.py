"""One program at every scale: the same :smoke run (ADMM updates and masked retraining
included) on 1 device, on 8 devices, and on 2 processes x 2 devices ends the same.

1 vs 8 devices compiles different per-device batches (16 vs 2), so float sums run in a
different order. Under adversarial training PGD takes the sign of the input gradient, and
a rounding-level difference in a near-zero entry moves that pixel by a whole step; Adam
and the ADMM projection's top-k (a near-tie between two weights) amplify that further. Measured
here: params 8e-7 apart after pretraining, 2e-3 after ADMM, ADMM Z 0.11 apart. So the
1-vs-8 run trains naturally (evaluation still attacks): it then ends within 5e-7. The
adversarial step across processes is checked by the 4-device vs 2 x 2 run, whose
per-device programs are the same."""
import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest

from helpers import ROOT, cli_command, write_idx, write_images
from robust_admm.experiments import workdir as workdir_lib


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_idx(str(tmp_path_factory.mktemp("idx")), np.random.default_rng(7))


def env_with(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROBUST_ADMM_")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def launch(workdir, idx_dir, devices, *overrides, process_id=None, port=None):
    env = env_with(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if process_id is not None:
        env.update(ROBUST_ADMM_MULTIHOST="1", ROBUST_ADMM_COORDINATOR=f"localhost:{port}",
                   ROBUST_ADMM_NUM_PROCESSES="2", ROBUST_ADMM_PROCESS_ID=str(process_id))
    cmd = cli_command(workdir, "--config.data.source=files", f"--config.data.dir={idx_dir}",
                      *overrides)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return out


def assert_same_run(a, b):
    for stage in ("pretrain", "admm", "retrain"):
        sa, sb = workdir_lib.load_final_state(a, stage), workdir_lib.load_final_state(b, stage)
        jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
                               sa["params"], sb["params"])
        jax.tree_util.tree_map(np.testing.assert_array_equal, sa["masks"], sb["masks"])
        if stage == "admm":  # ADMM's Z, U, rho, inside the optimizer's state
            jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                                   sa["opt_state"]["admm"], sb["opt_state"]["admm"])
    ja = json.load(open(os.path.join(a, "summary.json")))
    jb = json.load(open(os.path.join(b, "summary.json")))
    for stage, ra in ja["stages"].items():
        rb = jb["stages"][stage]
        # Accuracies over 48 test images: at most one prediction may flip on a near-tie.
        assert abs(ra["nat_acc"] - rb["nat_acc"]) <= 1 / 48 + 1e-9
        assert abs(ra["adv_acc"] - rb["adv_acc"]) <= 1 / 48 + 1e-9
        assert ra["compression_rate"] == rb["compression_rate"]


def test_one_device_and_eight_devices_end_the_same(tmp_path, idx_dir):
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    # Side by side: each run's compilations leave a core idle much of the time.
    procs = [launch(w, idx_dir, n, "--config.setting=natural") for w, n in ((one, 1),
                                                                           (eight, 8))]
    for p in procs:
        finish(p)
    assert_same_run(one, eight)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_end_as_one_and_write_metrics_once(tmp_path, idx_dir):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    reference = launch(single, idx_dir, 4)  # side by side with the two processes
    port = free_port()
    procs = [launch(multi, idx_dir, 2, process_id=i, port=port) for i in (0, 1)]
    outs = [finish(p) for p in procs]
    finish(reference)
    assert "done in" in outs[0] and "done in" not in outs[1]  # only process 0 logs
    assert_same_run(single, multi)
    with open(os.path.join(multi, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    with open(os.path.join(single, "metrics.jsonl")) as f:
        assert len(lines) == len(f.readlines())
    assert sum(r["kind"] == "done" for r in lines) == 1


# Installed in the runs below through PYTHONPATH: records every file a process opens under
# READS_ROOT (Python's audit hook on `open`), one line per open, in READS_LOG.<process>.
READS_HOOK = '''
import os, sys
_root, _log = os.environ.get("READS_ROOT"), os.environ.get("READS_LOG")
if _root and _log:
    _who = _log + "." + os.environ.get("ROBUST_ADMM_PROCESS_ID", "single")
    _fd = os.open(_who, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _fd_print = os.open(_who + ".fingerprint", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    _fingerprint = os.path.join("robust_admm", "data", "fingerprint.py")
    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(_root):
            f = sys._getframe(1)
            while f is not None and not f.f_code.co_filename.endswith(_fingerprint):
                f = f.f_back
            os.write(_fd if f is None else _fd_print, (args[0] + "\\n").encode())
    sys.addaudithook(_hook)
'''


def test_two_processes_stream_only_their_own_files_and_end_as_one(tmp_path):
    """The streamed path (configs/imagenet.py:smoke from a folder, one epoch of pretrain,
    evaluation included): 2 processes x 2 devices end with the parameters of 1 process x
    4 devices, and between them their readers open each image once, none opened by both
    (the data fingerprint's reads counted apart)."""
    images = write_images(str(tmp_path / "images"))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(READS_HOOK)
    log = str(tmp_path / "reads")
    flags = ["--config.data.source=folder", f"--config.data.dir={images}",
             "--config.data.image_size=32", "--config.stages=pretrain",
             "--config.pretrain.epochs=1", "--config.data.check_headers=false"]

    def start(workdir, devices, process_id=None, port=None):
        env = env_with(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                       READS_ROOT=images, READS_LOG=log,
                       PYTHONPATH=os.pathsep.join([str(hook), ROOT]))
        if process_id is not None:
            env.update(ROBUST_ADMM_MULTIHOST="1", ROBUST_ADMM_COORDINATOR=f"localhost:{port}",
                       ROBUST_ADMM_NUM_PROCESSES="2", ROBUST_ADMM_PROCESS_ID=str(process_id))
        return subprocess.Popen(cli_command(workdir, *flags, config="configs/imagenet.py:smoke"),
                                cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    port = free_port()
    procs = [start(single, 4)] + [start(multi, 2, i, port) for i in (0, 1)]
    for p in procs:
        finish(p)
    a = workdir_lib.load_final_state(single, "pretrain")
    b = workdir_lib.load_final_state(multi, "pretrain")
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
                           a["params"], b["params"])
    reads, printed = {}, {}
    for who in ("single", "0", "1"):
        with open(f"{log}.{who}") as f:
            reads[who] = f.read().split()
        with open(f"{log}.{who}.fingerprint") as f:
            printed[who] = f.read().split()
    every = sorted(os.path.join(d, f) for d, _, files in os.walk(images) for f in files)
    # The data's fingerprint (data.json) reads every file of a set this small once, in
    # every process (each checks it); the reader's opens are counted apart from it.
    assert all(sorted(printed[who]) == every for who in printed)
    assert sorted(reads["single"]) == every  # one epoch, one evaluation: each file once
    assert sorted(reads["0"] + reads["1"]) == every
    assert not set(reads["0"]) & set(reads["1"])
    assert 0 < len(reads["0"]) < len(every)
