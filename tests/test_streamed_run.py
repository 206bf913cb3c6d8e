"""Training and evaluating from a folder of images and from its shards (the streamed
path, configs/imagenet.py:smoke): every phase, the eval command, a SIGKILL mid-epoch
resumed bit for bit, shards equal to the folder, bad images stopped or skipped."""
import json
import os
import re
import shutil
import signal

import pytest
from PIL import Image

from helpers import assert_same_results, rgb_noise, run_and_signal, run_cli, write_images
from robust_admm.data import folder as folder_lib
from robust_admm.data import shards as shards_lib
from robust_admm.experiments import evaluate as evaluate_lib
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.runtime import logs

CONFIG = "configs/imagenet.py:smoke"
# Checkpoints every 2 steps (3 steps an epoch: one lands mid-epoch) and a log line every
# step, so that a test can kill the run where it chooses.
FLAGS = ["--config.checkpoint.every_steps=2", "--config.log_every_steps=1",
         "--config.data.image_size=32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """An uninterrupted run of every phase from the folder."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    proc = run_cli(workdir, *FLAGS, f"--config.data.dir={images}", config=CONFIG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workdir, proc.stdout


def test_every_phase_runs_from_a_folder_and_the_eval_command_reads_it(reference):
    workdir, out = reference
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert list(summary["stages"]) == ["pretrain", "admm", "retrain"]
    assert "48 train / 18 val images" in out and "3 classes, read at 32x32 px" in out
    evals = [r for r in logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if r["kind"] == "eval"]
    assert [r["eval_examples"] for r in evals] == [18, 18, 18]
    train = [r for r in logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if r["kind"] == "train"]
    assert train and all(r["skipped"] == 0 for r in train)
    # The eval command reads the val split too (in chunks: several here), and its natural
    # accuracy is the training run's own at the end of the last phase.
    result = evaluate_lib.evaluate_workdir(workdir, attacks="pgd5", checks=False, batch=4)
    assert result["n"] == 18
    assert result["natural_acc"] == pytest.approx(summary["stages"]["retrain"]["nat_acc"])
    assert 0 <= result["attacks"]["pgd5"]["robust_acc"] <= result["natural_acc"]


def test_evaluation_in_chunks_counts_every_image_once(reference, monkeypatch):
    """Chunks of 4 images (5 of them, the last short): the natural accuracy over them
    equals the one read in a single chunk, image for image."""
    workdir, _ = reference
    whole = evaluate_lib.evaluate_workdir(workdir, attacks="pgd2", checks=False, batch=4)
    monkeypatch.setattr(evaluate_lib, "CHUNK_BYTES", 4 * 32 * 32 * 3 * 4)
    chunked = evaluate_lib.evaluate_workdir(workdir, attacks="pgd2", checks=False, batch=4)
    assert chunked["n"] == whole["n"] == 18
    assert chunked["natural_acc"] == whole["natural_acc"]


def test_merged_chunk_results_are_the_results_over_all_images():
    parts = [{"n": 3, "epsilon": 0.1, "norm": "linf", "natural_acc": 2 / 3,
              "attacks": {"aa": {"robust_acc": 1 / 3, "seconds": 1.0, "members": ["a", "b"],
                                 "after": {"a": 2 / 3, "b": 1 / 3},
                                 "member_seconds": {"a": 0.5, "b": 0.5}}}},
             {"n": 2, "epsilon": 0.1, "norm": "linf", "natural_acc": 1.0,
              "attacks": {"aa": {"robust_acc": 0.5, "seconds": 2.0, "members": ["a", "b"],
                                 "after": {"a": 1.0, "b": 0.5},
                                 "member_seconds": {"a": 1.5, "b": 0.5}}}}]
    merged = evaluate_lib.merge_results(parts)
    assert merged["n"] == 5 and merged["natural_acc"] == 4 / 5
    aa = merged["attacks"]["aa"]
    assert aa["robust_acc"] == 2 / 5 and aa["after"] == {"a": 4 / 5, "b": 2 / 5}
    assert aa["seconds"] == 3.0 and aa["member_seconds"] == {"a": 2.0, "b": 1.0}
    assert evaluate_lib.merge_results(parts[:1]) is parts[0]


def test_a_sigkill_mid_epoch_resumes_bit_for_bit(images, reference, tmp_path):
    """Killed at step 5 of the pretrain phase (of 6, 3 an epoch; checkpoints at steps 2
    and 4, the newer maybe still being written), the same command ends with the uninterrupted run's states, summary and metrics:
    the streamed reader restarts at the checkpoint's step with the same records and crops."""
    workdir = str(tmp_path / "w")
    flags = FLAGS + [f"--config.data.dir={images}"]
    code, out = run_and_signal(workdir, flags, "pretrain", 5, signal.SIGKILL,
                               after_checkpoint=True, config=CONFIG)
    assert code == -signal.SIGKILL, out
    proc = run_cli(workdir, *flags, config=CONFIG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = re.search(r"\[pretrain\] resuming from step (\d+) of 6", proc.stdout)
    assert resumed and int(resumed[1]) in (2, 4), proc.stdout  # mid-epoch, either one
    assert_same_results(workdir, reference[0])


def test_shards_made_by_the_converter_train_as_the_folder(images, reference, tmp_path):
    """The same records in the same order: the pretrain phase from shards ends bitwise
    equal to the one from the folder."""
    out = str(tmp_path / "shards")
    shards_lib.write_shards(folder_lib.list_image_folder(images), out, records_per_shard=10,
                            log=lambda *a: None)
    workdir = str(tmp_path / "w")
    proc = run_cli(workdir, *FLAGS, "--config.data.source=shards", f"--config.data.dir={out}",
                   "--config.stages=pretrain", config=CONFIG)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(shards), 3 classes" in proc.stdout
    assert_same_results(workdir, reference[0], phases=["pretrain"])


def _smoke(images, workdir_overrides=(), **fields):
    from configs import imagenet
    cfg = imagenet.get_config("smoke")
    cfg.data.dir, cfg.data.image_size = images, 32
    cfg.pretrain.epochs, cfg.admm.epochs, cfg.retrain.epochs = 1, 0, 0
    cfg.stages = "pretrain"
    for k, v in fields.items():
        section, name = k.split("__")
        cfg[section][name] = v
    return cfg


@pytest.fixture
def one_bad_image(images, tmp_path):
    """A copy of the folder whose first training image of 'bee' is cut short after its
    header: it lists and passes the header check, and fails when decoded."""
    root = str(tmp_path / "bad")
    shutil.copytree(images, root)
    path = os.path.join(root, "train", "bee", "0.png")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:200])
    return root, path


def test_a_corrupt_image_stops_the_run_naming_it(one_bad_image, tmp_path):
    root, path = one_bad_image
    with pytest.raises(Exception, match=re.escape(path)):
        run_lib.train_and_evaluate(_smoke(root), str(tmp_path / "w"))


def test_a_corrupt_image_is_skipped_logged_and_counted(one_bad_image, tmp_path, capsys):
    root, path = one_bad_image
    workdir = str(tmp_path / "w")
    run_lib.train_and_evaluate(_smoke(root, data__bad_images="skip"), workdir)
    out = capsys.readouterr().out
    assert f"skipped an unreadable image (data.bad_images='skip'): {path}" in out
    train = [r for r in logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if r["kind"] == "train"]
    assert sum(r["skipped"] for r in train) == 1  # one epoch: each record read once


@pytest.mark.parametrize("field,value,message", [
    ("data__dir", "", "data.dir=''"),
    ("data__image_size", 0, "data.image_size=0"),
    ("data__augment", "crop_flip", "data.augment='crop_flip'.*RandomResizedCrop"),
    ("data__bad_images", "ignore", "data.bad_images='ignore'.*stop"),
    ("data__num_threads", 0, "data.num_threads=0"),
    ("data__crops", "center", "data.crops='center'.*imagenet.*resize"),
    ("data__train_examples", 10, "data.train_examples=10"),
])
def test_streamed_fields_are_checked_naming_the_field(images, tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        run_lib.train_and_evaluate(_smoke(images, **{field: value}), str(tmp_path / "w"))


def test_a_folder_with_a_non_image_is_refused_before_anything_compiles(images, tmp_path):
    root = str(tmp_path / "f")
    shutil.copytree(images, root)
    bad = os.path.join(root, "val", "cat", "notes.jpg")
    with open(bad, "w") as f:
        f.write("not an image")
    with pytest.raises(Exception, match=re.escape(bad)):
        run_lib.train_and_evaluate(_smoke(root), str(tmp_path / "w"))
    assert not os.path.exists(os.path.join(tmp_path, "w", "checkpoints"))


def test_with_more_than_ten_classes_top5_is_reported(tmp_path):
    """Twelve classes: the training's evaluation and the eval command report top-5
    accuracy beside top-1 (at least as high)."""
    root = str(tmp_path / "twelve")
    for split, n in (("train", 2), ("val", 1)):
        for c in range(12):
            os.makedirs(os.path.join(root, split, f"c{c:02d}"))
            for i in range(n):
                Image.fromarray(rgb_noise(20, 24, seed=c * 10 + i)).save(
                    os.path.join(root, split, f"c{c:02d}", f"{i}.png"))
    workdir = str(tmp_path / "w")
    summary = run_lib.train_and_evaluate(_smoke(root), workdir)
    stage = summary["stages"]["pretrain"]
    assert stage["nat_top5"] >= stage["nat_acc"] and stage["adv_top5"] >= stage["adv_acc"]
    assert abs(stage["nat_top5"] * 12 - round(stage["nat_top5"] * 12)) < 1e-9  # of 12 images
    result = evaluate_lib.evaluate_workdir(workdir, attacks="pgd2", checks=False, batch=4)
    assert result["natural_top5"] == pytest.approx(stage["nat_top5"])


def test_the_share_of_time_waiting_for_input_is_measured(monkeypatch):
    """Progress's input-wait share: the waits reported in an interval over its length
    (a controlled clock), reset at each interval and after the compiling first step."""
    now = [0.0]
    monkeypatch.setattr(logs.time, "perf_counter", lambda: now[0])
    p = logs.Progress(total_steps=10, batch_size=4)
    p.waited(5.0)  # before the first step finished: not part of any interval
    now[0] = 10.0
    p.compiled(1)
    p.waited(1.0)
    p.waited(0.5)
    now[0] = 14.0
    speed = p.update(3)
    assert speed["input_wait_share"] == pytest.approx(1.5 / 4.0)
    assert speed["img_per_s"] == pytest.approx(2 * 4 / 4.0)
    now[0] = 16.0
    assert p.update(4)["input_wait_share"] == 0.0


def test_a_streamed_run_logs_its_input_wait(reference):
    workdir, out = reference
    train = [r for r in logs.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if r["kind"] == "train"]
    assert all(0.0 <= r["input_wait_share"] <= 1.0 for r in train)
    assert re.search(r"img/s ETA \S+ \(input wait \d+%\)", out)


def test_a_tfds_dataset_other_than_the_small_ones_is_streamed(tmp_path, capsys):
    """data.source=tfds with imagenet2012 (TFDS's mock: random images of random sizes,
    1,000 classes) trains through the streamed path and evaluates its validation split,
    top-5 included."""
    import tensorflow_datasets as tfds
    cfg = _smoke("")
    cfg.data.source, cfg.data.name, cfg.data.dir = "tfds", "imagenet2012", ""
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        summary = run_lib.train_and_evaluate(cfg, str(tmp_path / "w"))
    out = capsys.readouterr().out
    assert "imagenet2012: 20 train / 20 val images" in out and "1000 classes" in out
    stage = summary["stages"]["pretrain"]
    assert 0 <= stage["nat_acc"] <= stage["nat_top5"] <= 1
    evals = [r for r in logs.read_jsonl(os.path.join(tmp_path, "w", "metrics.jsonl"))
             if r["kind"] == "eval"]
    assert [r["eval_examples"] for r in evals] == [20]


def test_a_tfds_dataset_that_is_not_there_is_named_with_how_to_prepare_it(tmp_path):
    from robust_admm.data import DataError
    from robust_admm.data.streamed import open_tfds
    with pytest.raises(DataError, match="not a TFDS dataset"):
        open_tfds("no_such_dataset_anywhere", str(tmp_path))
    with pytest.raises(DataError, match="(?s)TFDS imagenet2012 in .*tfds build imagenet2012 "
                                        "--file_format=array_record"):
        open_tfds("imagenet2012", str(tmp_path))


def test_a_subset_of_a_streamed_split_spreads_over_its_classes(reference):
    from robust_admm.data.streamed import SpreadRecords
    records = list(range(18))  # 6 of each class, in class order, as a folder lists them
    assert [SpreadRecords(records, 3)[i] for i in range(3)] == [0, 6, 12]
    assert [SpreadRecords(records, 4)[i] for i in range(4)] == [0, 4, 9, 13]
    assert len(SpreadRecords(records, 40)) == 18
    with pytest.raises(IndexError):
        SpreadRecords(records, 3)[3]
    result = evaluate_lib.evaluate_workdir(reference[0], attacks="pgd2", checks=False,
                                           batch=4, n=3)
    assert result["n"] == 3


def test_one_channel_images_train_a_one_channel_model(images, tmp_path):
    workdir = str(tmp_path / "w")
    run_lib.train_and_evaluate(_smoke(images, data__channels=1, data__crops="resize"),
                               workdir)
    state = workdir_lib.load_final_state(workdir, "pretrain")
    assert state["params"]["conv1"]["kernel"].shape[2] == 1
