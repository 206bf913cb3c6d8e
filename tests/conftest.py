"""Test-session setup: one persistent XLA compilation cache for the whole run.

Most of a :smoke CLI run is compiling its steps (about 40 s cold, 12 s warm here), and the
suite starts that run in many subprocesses. JAX reads these variables at import, in this
process and in every subprocess the tests start, so each program compiles once per session.
A cached executable is the one compilation would give (a run with a warm cache ends
bitwise equal to a cold one), so the tests check the same programs. A cache dir the
caller set is kept and used.
"""
import os
import shutil
import tempfile

_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="robust-admm-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
# Cache every program, not only those that took over a second to compile: the eval and
# ADMM programs of a smoke run are small but many.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# The suite runs on two workers (pytest.ini: pytest-xdist, --dist loadfile: a module's
# tests run in one worker, so its module fixtures run once). Modules start longest first
# (the order of the collected tests), so that no long module runs alone at the end; the
# two modules sharing `program_run` start apart, so that one finds it made.
LONGEST_FIRST = ("test_resume", "test_cifar_run", "test_train", "test_distributed_run",
                 "test_streamed_run", "test_benchmarks", "test_smoothing_mixup",
                 "test_imagenet_presets", "test_compression_api",
                 "test_step", "test_recipe", "test_autoattack_api", "test_robustness",
                 "test_study", "test_apgd",
                 "test_conv")


def pytest_collection_modifyitems(config, items):
    rank = {m: i for i, m in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


import fcntl  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import PROGRAM, ROOT, RUN_FLAGS, cli_command, write_idx  # noqa: E402


def _make_program_run(folder):
    idx_dir = write_idx(os.path.join(folder, "idx"), np.random.default_rng(0))
    workdir = os.path.join(folder, "run")
    r = subprocess.run(cli_command(workdir, "--config.data.source=files",
                                   f"--config.data.dir={idx_dir}", *RUN_FLAGS, config=PROGRAM),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, idx_dir


@pytest.fixture(scope="session")
def program_run(tmp_path_factory, worker_id):
    """(workdir, idx folder) of one uninterrupted run of the five-phase :smoke_program on
    small IDX files: the kill/resume tests' reference and the rules tests' subject. Made
    once per test session: under pytest-xdist in the workers' shared temporary folder, by
    the first worker to ask (holding a lock), and read by the other."""
    if worker_id == "master":  # not distributed
        return _make_program_run(str(tmp_path_factory.mktemp("program_run")))
    shared = tmp_path_factory.getbasetemp().parent / "program_run"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)  # blocks while the other worker makes it
        try:
            done = shared / "done.json"
            if not done.exists():
                paths = _make_program_run(str(shared))
                done.write_text(json.dumps(paths))
            return tuple(json.loads(done.read_text()))
        finally:
            fcntl.lockf(lock, fcntl.LOCK_UN)


@pytest.fixture
def tfds_mock(monkeypatch):
    """tensorflow_datasets with its mock made usable for batched reads."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking

    # tfds 4.9.10's mock assigns a plain functools.partial to the mocked
    # ArrayRecordDataSource's `__getitems__`, so it is called without `self`
    # and fails; `__getitem__` works.  Make the batched read usable: it only
    # needs the generator (examples are returned unserialized).
    def _getitems(record_keys, generator, serialized=False):
        assert not serialized
        return [generator[k] for k in record_keys]

    monkeypatch.setattr(mocking, "_getitems", _getitems)
    return tfds
