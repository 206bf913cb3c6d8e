"""launch.sh: syntax and shellcheck, --help, argument errors, and the --dry-run commands of
each mode. The printed commands are parsed back with shlex (POSIX quoting) and the parts
that run on the workers / Slurm tasks are executed here against stub `python` and
`scontrol`, so quoting is checked end to end, not by eye."""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from robust_admm.runtime import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch.sh")
TRICKY = "--config.data.dir=/data/it's a dir"  # a space and a quote


def launch(*args, env=None, check=None):
    proc = subprocess.run(["bash", LAUNCH, *args], capture_output=True, text=True,
                          timeout=30, env=env, cwd=ROOT)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def dry_run(*args):
    """The printed commands; --dry-run goes before any '--' (after it, it is an override)."""
    args = list(args)
    i = args.index("--") if "--" in args else len(args)
    return launch(*args[:i], "--dry-run", *args[i:], check=0).stdout.splitlines()


@pytest.fixture
def stub_python(tmp_path):
    """An executable that records its argv, its cwd and the launch variables as JSON."""
    out = tmp_path / "stub_out.json"
    stub = tmp_path / "stub_python"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "env = {k: v for k, v in os.environ.items()\n"
        "       if k.startswith(('ROBUST_ADMM_', 'TFDS_'))}\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': env, 'cwd': os.getcwd()}},\n"
        f"          open({str(out)!r}, 'w'))\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return str(stub), out


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ROBUST_ADMM_", "SLURM_", "TFDS_"))}
    env.update(extra)
    return env


# ------------------------------------------------------------------------ static checks

def test_bash_syntax():
    proc = subprocess.run(["bash", "-n", LAUNCH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed; install it (apt-get install shellcheck, "
                    "brew install shellcheck) to lint launch.sh. .ci/run does this with apt.")
    proc = subprocess.run(["shellcheck", LAUNCH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["tpu", "--help"],
                                  ["slurm", "--nodes", "2", "--help"]])
def test_help(args):
    out = launch(*args, check=0).stdout
    for word in ["local", "tpu", "slurm", "--config", "--workdir", "--dry-run", "--zone",
                 "--worker=all", "--nodes", "--gpus-per-node", "ROBUST_ADMM_MULTIHOST"]:
        assert word in out, word


# ------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args, words", [
    ([], ["missing MODE", "local, tpu, slurm"]),
    (["gke", "--config", "c"], ["unknown mode 'gke'", "local, tpu, slurm"]),
    (["local"], ["missing required", "--config"]),
    (["local", "--workdir", "w"], ["--config"]),
    (["local", "--config"], ["'--config' needs a value"]),
    (["local", "--config", "--dry-run"], ["'--config' needs a value"]),
    (["local", "--config", "c", "--frobnicate"], ["unknown option '--frobnicate'"]),
    (["local", "--config", "c", "--zone", "z"], ["'--zone' is not valid for mode 'local'"]),
    (["local", "--config=c"], ["--config c"]),
    (["local", "--config", "c", "stray"], ["'stray'", "after '--'"]),
    (["tpu", "--config", "c"], ["--name", "--zone", "--workdir"]),
    (["tpu", "--name", "t", "--zone", "z", "--config", "c", "--workdir", "w",
      "--repo", "u", "--copy"], ["--repo and --copy"]),
    (["slurm", "--config", "c", "--workdir", "w"], ["--nodes", "--gpus-per-node"]),
    (["slurm", "--nodes", "two", "--gpus-per-node", "8", "--config", "c", "--workdir", "w"],
     ["--nodes 'two'", "positive integer"]),
    (["slurm", "--nodes", "2", "--gpus-per-node", "8", "--config", "c", "--workdir", "w",
      "--port", "99999"], ["--port '99999'"]),
])
def test_argument_errors_exit_2(args, words):
    proc = launch(*args, check=2)
    assert proc.stdout == ""
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)


# -------------------------------------------------------------------------------- local

def test_local_dry_run_passes_overrides_quoted():
    lines = dry_run("local", "--config", "configs/mnist.py:cpu", "--workdir", "runs/a b",
                    "--", "--config.admm.rho=0.01", TRICKY)
    assert len(lines) == 1
    assert lines[0].startswith("python -m robust_admm.train --config configs/mnist.py:cpu")
    assert shlex.split(lines[0]) == [
        "python", "-m", "robust_admm.train", "--config", "configs/mnist.py:cpu",
        "--workdir", "runs/a b", "--config.admm.rho=0.01", TRICKY]


def test_local_default_workdir():
    argv = shlex.split(dry_run("local", "--config", "c.py")[0])
    assert argv[argv.index("--workdir") + 1].startswith("runs/")


def test_local_runs_the_printed_command(stub_python):
    stub, out = stub_python
    launch("local", "--config", "configs/digits.py", "--workdir", "w d", "--python", stub,
           "--", TRICKY, env=clean_env(), check=0)
    got = json.loads(out.read_text())
    assert got["argv"] == ["-m", "robust_admm.train", "--config", "configs/digits.py",
                           "--workdir", "w d", TRICKY]
    assert got["env"] == {}


# ---------------------------------------------------------------------------------- tpu

TPU = ["tpu", "--name", "my-v4-32", "--zone", "us-central2-b", "--project", "proj-1",
       "--tfds-data-dir", "gs://bucket/tfds", "--config", "configs/mnist.py",
       "--workdir", "gs://bucket/runs/m"]


def test_tpu_dry_run_copy_install_run():
    lines = dry_run(*TPU, "--", "--config.batch_size=1024", TRICKY)
    assert len(lines) == 3, lines
    # 1. copy this checkout to every worker.
    cd, _, scp = lines[0].partition(" && ")
    assert shlex.split(cd) == ["cd", ROOT]
    assert shlex.split(scp) == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", ".",
        "my-v4-32:~/robust-admm", "--worker=all", "--zone", "us-central2-b",
        "--project", "proj-1"]
    # 2./3. the same ssh prefix on all workers: install, then train.
    prefix = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32", "--zone",
              "us-central2-b", "--project", "proj-1", "--worker=all", "--command"]
    install, train = shlex.split(lines[1]), shlex.split(lines[2])
    assert install[:-1] == prefix and train[:-1] == prefix
    assert shlex.split(install[-1]) == ["cd", "~/robust-admm", "&&", "python3", "-m", "pip",
                                        "install", "-e", ".", "jax[tpu]"]
    remote = train[-1]
    assert remote.startswith("cd ~/robust-admm && ROBUST_ADMM_MULTIHOST=1 "
                             "TFDS_DATA_DIR=gs://bucket/tfds python3 -m robust_admm.train ")
    assert shlex.split(remote)[-2:] == ["--config.batch_size=1024", TRICKY]


def test_tpu_remote_command_runs_on_a_worker(stub_python, tmp_path):
    """Run the worker command in a shell whose HOME holds the checkout: the tilde
    expands, the variables reach the program and the overrides arrive intact."""
    stub, out = stub_python
    home = tmp_path / "home"
    (home / "robust-admm").mkdir(parents=True)
    lines = dry_run(*TPU, "--skip-setup", "--python", stub, "--", TRICKY)
    assert len(lines) == 1 and "scp" not in lines[0]
    remote = shlex.split(lines[0])[-1]
    subprocess.run(["bash", "-c", remote], env=clean_env(HOME=str(home)), check=True,
                   timeout=30)
    got = json.loads(out.read_text())
    assert got["cwd"] == str(home / "robust-admm")
    assert got["env"] == {"ROBUST_ADMM_MULTIHOST": "1", "TFDS_DATA_DIR": "gs://bucket/tfds"}
    assert got["argv"] == ["-m", "robust_admm.train", "--config", "configs/mnist.py",
                           "--workdir", "gs://bucket/runs/m", TRICKY]
    assert parallel.distributed_env(got["env"]) == {}  # -> initialize() auto-detects


def test_tpu_repo_clones_instead_of_copying():
    lines = dry_run("tpu", "--name", "t1", "--zone", "europe-west4-a", "--repo",
                    "https://example.com/r.git", "--config", "c.py", "--workdir", "gs://b/w")
    assert len(lines) == 2 and not any("scp" in line for line in lines)
    setup = shlex.split(lines[0])
    assert setup[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"]
    assert "--worker=all" in setup and "--project" not in setup
    assert setup[setup.index("--zone") + 1] == "europe-west4-a"
    assert "git clone https://example.com/r.git ~/robust-admm" in setup[-1]
    assert "pip install -e ." in setup[-1]
    assert "ROBUST_ADMM_MULTIHOST=1" in shlex.split(lines[1])[-1]


# -------------------------------------------------------------------------------- slurm

SLURM = ["slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
         "--time", "02:00:00", "--config", "configs/mnist.py", "--workdir", "/shared/r"]


def test_slurm_dry_run_srun_line():
    lines = dry_run(*SLURM, "--", TRICKY)
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:11] == ["srun", "--nodes", "4", "--ntasks-per-node", "1",
                         "--gpus-per-node", "8", "--partition", "gpu", "--time", "02:00:00"]
    assert argv[11:13] == ["bash", "-c"] and len(argv) == 14
    task = argv[13]
    for part in ["ROBUST_ADMM_MULTIHOST=1", "ROBUST_ADMM_COORDINATOR=",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1', ":12355",
                 'ROBUST_ADMM_NUM_PROCESSES="$SLURM_NTASKS"',
                 'ROBUST_ADMM_PROCESS_ID="$SLURM_PROCID"', "python -m robust_admm.train"]:
        assert part in task, part


def _fake_slurm_task(task, tmp_path, procid):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    scontrol = bindir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-10]" ] || exit 1\n'
                        'printf "gpu-07\\ngpu-08\\ngpu-09\\ngpu-10\\n"\n')
    scontrol.chmod(0o755)
    env = clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
                    SLURM_JOB_NODELIST="gpu-[07-10]", SLURM_NTASKS="4",
                    SLURM_PROCID=str(procid))
    subprocess.run(["bash", "-c", task], env=env, check=True, timeout=30)


def test_slurm_task_sets_the_env_contract(stub_python, tmp_path):
    """Each task, run as Slurm would (stub scontrol), gets the variables that
    parallel.initialize_distributed turns into jax.distributed.initialize arguments."""
    stub, out = stub_python
    task = shlex.split(dry_run(*SLURM, "--port", "23456", "--python", stub, "--",
                               TRICKY)[0])[-1]
    _fake_slurm_task(task, tmp_path, procid=3)
    got = json.loads(out.read_text())
    assert got["env"] == {"ROBUST_ADMM_MULTIHOST": "1",
                          "ROBUST_ADMM_COORDINATOR": "gpu-07:23456",
                          "ROBUST_ADMM_NUM_PROCESSES": "4", "ROBUST_ADMM_PROCESS_ID": "3"}
    assert got["argv"] == ["-m", "robust_admm.train", "--config", "configs/mnist.py",
                           "--workdir", "/shared/r", TRICKY]
    assert parallel.distributed_env(got["env"]) == {
        "coordinator_address": "gpu-07:23456", "num_processes": 4, "process_id": 3}


def test_slurm_sbatch_wraps_the_same_srun(stub_python, tmp_path):
    lines = dry_run(*SLURM, "--sbatch")
    argv = shlex.split(lines[0])
    assert argv[0] == "sbatch" and argv[1:7] == ["--nodes", "4", "--ntasks-per-node", "1",
                                                  "--gpus-per-node", "8"]
    assert argv[-2] == "--wrap"
    inner = shlex.split(argv[-1])
    assert inner[:3] == ["srun", "bash", "-c"]
    assert inner[3] == shlex.split(dry_run(*SLURM)[0])[-1]
