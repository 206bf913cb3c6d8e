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

import pytest

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


# Left out of the default run to keep it near 12 minutes on 2 cores (run with
# `python -m pytest -q -m slow`): the longest checks whose behaviour another default-run
# test also covers in a smaller case (each line says which).
SLOW = {
    # robustness of a pruned digits model: the recipe tests check the programs' results
    "test_train.py::test_digits_pruned_model_is_robust_where_a_natural_one_is_not",
    # ResNet-18 at full width: its narrow blocks' forward/step and the pretrained tests
    "test_imagenet_models.py::test_each_imagenet_model_forward_and_a_training_step[imagenet_resnet18]",
    # streamed resume: test_resume/test_cifar_run resume bit for bit, the streamed order's
    # positions are tested in test_stream
    "test_streamed_run.py::test_a_sigkill_mid_epoch_resumes_bit_for_bit",
    "test_apgd.py::test_apgd_and_pgd_reach_the_analytic_worst_case_of_a_linear_model",
    "test_robustness.py::test_attacks_order_as_their_strength_on_a_trained_model",
    # the host-driven loop: its PGD-AT case on LeNet stays in the default run
    "test_step.py::test_host_driven_pgd_loop_matches_the_compiled_loop[model1-3-pgd_at]",
    "test_step.py::test_host_driven_pgd_loop_matches_the_compiled_loop[None-1-trades]",
    "test_step.py::test_host_driven_pgd_loop_matches_the_compiled_loop[model3-3-mart]",
    # mixup's draw: the streamed case (with smoothing) stays
    "test_smoothing_mixup.py::test_the_step_mixes_with_the_documented_draw[device-0.0]",
    "test_smoothing_mixup.py::test_the_training_attack_ascends_the_mixed_loss",
    "test_step.py::test_both_cpu_convolution_runtimes_give_the_same_training_run",
    # dropout's keys: test_dropout_drops_only_in_train_mode_with_a_key stays
    "test_imagenet_models.py::test_the_training_passes_drop_with_the_key_of_their_step_and_the_attack_does_not",
    "test_step.py::test_augmentation_transforms_each_batch_with_a_key_of_the_step",
    # top-5: test_step's top-5 counts stay
    "test_streamed_run.py::test_with_more_than_ten_classes_top5_is_reported",
    "test_streamed_run.py::test_a_tfds_dataset_other_than_the_small_ones_is_streamed",
    # bfloat16: the LeNet case stays
    "test_step.py::test_bfloat16_compute_stays_close_to_float32_with_float32_parameters_and_gradients[wrn10_1-1-shape1]",
    "test_streamed_run.py::test_one_channel_images_train_a_one_channel_model",
    "test_step.py::test_an_epoch_order_given_by_the_feed_trains_as_the_step_drawing_it_itself",
    # CIFAR resume: test_resume's bitwise resumes stay
    "test_cifar_run.py::test_sigkill_in_the_augmented_phase_then_resume_is_bitwise_identical",
    "test_apgd.py::test_apgd_halves_the_step_and_restarts_from_the_best_point_at_checkpoints",
    # two processes: the device-feed two-process run stays
    "test_distributed_run.py::test_two_processes_stream_only_their_own_files_and_end_as_one",
    "test_compression_api.py::test_straight_through_runs_on_the_levels_and_passes_the_gradient_to_the_latent_weights",
    # TRADES trains: its loss is tested against float64, PGD-AT and MART train
    "test_step.py::test_natural_and_adversarial_training_reduce_the_loss[adversarial-trades]",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("/")[-1] in SLOW:
            item.add_marker(pytest.mark.slow)
    rank = {m: i for i, m in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Hypothesis draws the same examples on every run (CI's result does not depend on the
# draw); HYPOTHESIS_PROFILE=explore draws new ones, to look for new failing cases (each
# found one is then kept as an @example).
import hypothesis  # noqa: E402

hypothesis.settings.register_profile("ci", derandomize=True, database=None)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

import fcntl  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402

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
