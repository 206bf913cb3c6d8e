"""Fuzzed JSON and configs: a run's config.json, a study's study.json, a study config, the
metadata of a checkpoint, and command-line overrides, mutated from valid ones, give a
config that validates, or a ValueError (or CheckpointError) naming the file or the field
(tests/fuzz_support.py says what is checked)."""
import json
import os
import shutil
import tempfile

import ml_collections
import numpy as np
import pytest
from absl import flags
from hypothesis import given
from hypothesis import strategies as st
from ml_collections import config_flags

from configs import digits
from configs.studies import digits_width
from fuzz_support import fuzz_settings, mutated_json, outcome
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.study import check_study_file, validate_study
from robust_admm.experiments.validation import validate_config
from robust_admm.runtime import checkpoint

CONFIG = json.loads(digits.get_config("smoke").to_json())
STUDY = json.loads(digits_width.get_config("smoke").to_json())


def _names(path, edited):
    """What an error may name: the file, or a key on an edited path."""
    return [path] + [str(k) for p in (edited or ()) for k in p]


@given(mutated_json(CONFIG))
@fuzz_settings()
def test_config_json(doc):
    text, edited = doc
    workdir = tempfile.mkdtemp(prefix="fuzz-run-")
    path = workdir_lib.config_path(workdir)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)

    def read_and_validate():
        config = workdir_lib.read_config(workdir)
        validate_config(config, device_count=1)
        return config

    config = outcome(read_and_validate, _names(path, edited))
    if config is not None:  # what it read is what the file says (upgraded)
        for key, value in json.loads(text).items():
            if not isinstance(value, dict):
                assert config[key] == value or value != value, key


@given(mutated_json(STUDY, max_edits=2))
@fuzz_settings(0.5)
def test_study_json(doc):
    """A study directory's study.json, damaged: the rerun compares it or names it."""
    text, edited = doc
    workdir = tempfile.mkdtemp(prefix="fuzz-study-")
    path = workdir_lib.study_path(workdir)
    with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(text)
    study = ml_collections.ConfigDict(STUDY)
    outcome(lambda: check_study_file(workdir, study, allow_change=True),
            _names(path, edited) + [workdir])


@given(mutated_json(STUDY, max_edits=2))
@fuzz_settings(0.5)
def test_study_config(doc):
    """A study config with fields of other types, deleted or added: validate_study orders
    its cells or names the cell and field."""
    text, edited = doc
    if edited is None:
        return  # not JSON: a study config is Python, its values are what this mutates
    value = json.loads(text)

    def build_and_validate():
        try:
            study = ml_collections.ConfigDict(value)
        except (TypeError, AttributeError) as e:  # not a config at all
            raise ValueError(f"{edited}: {e}") from None
        return validate_study(study, tempfile.mkdtemp(prefix="fuzz-cells-"))

    order = outcome(build_and_validate, _names("", edited) + ["cell"])
    if order is not None:
        assert sorted(order) == sorted(value["cells"])


# ----------------------------------------------------------------------------- checkpoints

STATE = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(4)}
META = {"stage": "retrain", "complete": True, "result": {"nat_acc": 0.9, "adv_acc": 0.5}}


@pytest.fixture(scope="module")
def saved_stage():
    folder = os.path.join(tempfile.mkdtemp(prefix="fuzz-ckpt-"), "retrain")
    with checkpoint.manager(folder) as mngr:
        checkpoint.save(mngr, 4, STATE, META)
        mngr.wait_until_finished()
    meta_file = os.path.join("4", "meta", "metadata")  # where orbax's JsonSave writes it
    with open(os.path.join(folder, meta_file), encoding="utf-8") as f:
        assert json.load(f) == META
    return folder, meta_file


@given(mutated_json(META))
@fuzz_settings(0.5)
def test_checkpoint_metadata(saved_stage, doc):
    """A checkpoint whose metadata file is damaged: resuming moves it aside and names it
    (or says that no checkpoint is readable); loading the finished stage names it."""
    text, edited = doc
    template, meta_file = saved_stage
    folder = os.path.join(tempfile.mkdtemp(prefix="fuzz-ckpt-"), "retrain")
    shutil.copytree(template, folder)
    with open(os.path.join(folder, meta_file), "w", encoding="utf-8",
              errors="surrogatepass") as f:
        f.write(text)

    def resume():
        with checkpoint.manager(folder) as mngr:
            return checkpoint.restore_latest(mngr, STATE)

    restored = outcome(resume, [folder])
    if restored is not None:
        state, meta, step = restored
        checkpoint.check_meta(meta, folder)
        assert step == 4 and np.array_equal(state["w"], STATE["w"])
    shutil.rmtree(folder)
    shutil.copytree(template, folder)
    with open(os.path.join(folder, meta_file), "w", encoding="utf-8",
              errors="surrogatepass") as f:
        f.write(text)
    outcome(lambda: checkpoint.load_final_state(folder, "retrain"), [folder, "retrain"])


# ----------------------------------------------------------------------------- overrides

FIELDS = sorted(k for k in (
    ".".join(p) for p in (
        tuple(f"{a}.{b}".split(".")) if isinstance(v, dict) else (a,)
        for a, v in CONFIG.items() for b in (v if isinstance(v, dict) else [""])))
    if k)
VALUES = st.sampled_from(("0", "-1", "1e400", "nan", "inf", "abc", "", "True", "3.5",
                          "99999999999999999999", "conv1=0.5", "pretrain", "none", "[1]",
                          "{}", "None")) | st.text(max_size=6)


@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3))
@fuzz_settings()
def test_cli_overrides(overrides):
    """`--config.FIELD=VALUE` overrides of a real config file: the flag parser refuses
    the value naming the flag, or the config validates or names the field."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                    lock_config=True)
    argv = ["train", f"--config={digits.__file__}:smoke"] + [
        f"--config.{field}={value}" for field, value in overrides]
    names = [field for field, _ in overrides]
    try:
        values(argv)
    except flags.Error as e:  # absl's own refusal of a flag's value: names the flag
        assert any(n in str(e) for n in names) or "config" in str(e), str(e)
        return
    outcome(lambda: validate_config(values.config, device_count=1), names)
