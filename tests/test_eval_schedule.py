"""What the evaluations during training measure and what they cost: in the natural setting
natural accuracy only before a phase's end and the configured attack, named, at its end;
`eval.n` examples before the end, the whole split at it; the share of the phase's wall
time spent evaluating, logged and recorded; no robust figure where no attack ran (never
'PGD-0'); an old config.json keeps attacking every evaluation on the whole split."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT
from robust_admm import attacks
from robust_admm.data import load_dataset
from robust_admm.data.feed import DeviceTest, StreamTest
from robust_admm.evaluation import eval_step as eval_lib
from robust_admm.experiments import migrate, report
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.validation import config_differences, validate_config
from robust_admm.models import apply_model, get_model
from robust_admm.runtime import logs
from robust_admm.training.loop import accuracy_line

sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402
from configs import imagenet as imagenet_config  # noqa: E402
from configs import mnist as mnist_config  # noqa: E402

TEST_EXAMPLES, SUBSET, EPOCHS = 40, 10, 2


def tiny_digits(setting: str):
    """One phase of 2 epochs x 4 steps on the digits, evaluated every epoch on 10 of 40
    test examples before the end, PGD-2 configured (compiled as one program)."""
    c = digits_config.get_config()
    c.setting, c.program = setting, "pretrain"
    c.model.width = 1
    c.batch_size, c.log_every_steps = 16, 4
    c.data.train_examples, c.data.test_examples = 64, TEST_EXAMPLES
    c.pretrain.epochs = EPOCHS
    c.eval.every_epochs, c.eval.batch_size, c.eval.n = 1, 8, SUBSET
    c.eval.num_steps, c.eval.step_size = 2, 0.1
    c.attack.loop = "fori"
    return c


@pytest.fixture(scope="module")
def natural_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("natural"))
    lines = []
    log = logs.log
    logs.log = lambda msg: (lines.append(msg), log(msg))
    try:
        summary = run_lib.train_and_evaluate(tiny_digits("natural"), workdir)
    finally:
        logs.log = log
    return workdir, summary, lines


def test_natural_setting_attacks_only_at_the_phase_end_and_names_the_attack(natural_run):
    workdir, summary, lines = natural_run
    records = logs.read_jsonl(workdir_lib.metrics_path(workdir))
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    label = eval_lib.eval_attack_label(tiny_digits("natural"))
    assert label.startswith("PGD-2 (")
    for r in evals[:-1]:  # natural accuracy only, on the subset
        assert "adv_acc" not in r and "adv_attack" not in r
        assert r["eval_examples"] == SUBSET
    end = evals[-1]
    assert (end["adv_attack"], end["eval_examples"]) == (label, TEST_EXAMPLES)
    stage = summary["stages"]["pretrain"]
    assert (stage["adv_acc"], stage["adv_attack"]) == (end["adv_acc"], label)
    logged = [ln for ln in lines if ln.startswith("[pretrain] epoch ")
              and "step" not in ln]
    assert len(logged) == EPOCHS and all("PGD" not in ln for ln in logged[:-1])
    assert "PGD-2 " in logged[-1]


def test_the_phase_end_evaluation_reads_the_whole_split(natural_run):
    """Its natural accuracy equals the final model's, recomputed in float64 numpy's argmax
    on the first 40 test digits."""
    workdir, summary, _ = natural_run
    params = workdir_lib.load_final_state(workdir, "pretrain")["params"]
    test = load_dataset("digits", "files", None).test
    x = jnp.asarray(test.images[:TEST_EXAMPLES], jnp.float32) / 255.0
    logits = np.asarray(apply_model(get_model("lenet_digits", 10, 1), params, {}, x,
                                    train=False)[0], np.float64)
    expected = float((logits.argmax(-1) == test.labels[:TEST_EXAMPLES]).mean())
    assert summary["stages"]["pretrain"]["nat_acc"] == pytest.approx(expected, abs=1e-12)


def test_the_share_of_evaluation_is_logged_and_recorded(natural_run):
    workdir, summary, lines = natural_run
    records = logs.read_jsonl(workdir_lib.metrics_path(workdir))
    (timing,) = [r for r in records if r["kind"] == "eval_time"]
    assert timing["stage"] == "pretrain"
    assert 0 < timing["eval_s"] < timing["wall_s"]
    assert timing["eval_share"] == pytest.approx(timing["eval_s"] / timing["wall_s"])
    speed = summary["stages"]["pretrain"]["speed"]
    assert speed["eval_share"] == timing["eval_share"]
    (line,) = [ln for ln in lines if "evaluation took" in ln]
    assert line == (f"[pretrain] evaluation took {timing['eval_s']:.1f} s of "
                    f"{timing['wall_s']:.1f} s ({100 * timing['eval_share']:.0f}%)")


def test_the_report_reads_records_without_a_robust_accuracy(natural_run):
    workdir, _, _ = natural_run
    text = open(report.write_report(workdir), encoding="utf-8").read()
    assert "PGD-2 %" in text and "PGD-0" not in text


def test_which_evaluations_attack_by_setting_and_field():
    c = tiny_digits("adversarial")
    assert eval_lib.attack_schedule(c) == "every_eval"
    c.setting = "natural"
    assert eval_lib.attack_schedule(c) == "phase_end"
    c.eval.adversarial = "every_eval"
    assert eval_lib.attack_schedule(c) == "every_eval"
    c.setting, c.eval.adversarial = "adversarial", "phase_end"
    assert eval_lib.attack_schedule(c) == "phase_end"
    for field, value in (("num_steps", 0), ("epsilon", 0.0)):  # no attack configured
        d = tiny_digits("adversarial")
        d.eval[field] = value
        assert eval_lib.attack_schedule(d) == "never"
        assert eval_lib.eval_attack_label(d) is None


def test_no_attack_is_natural_accuracy_only_never_pgd_0():
    model = get_model("lenet_digits", 10, 1)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    valid = np.arange(16) < 13
    logits = np.asarray(apply_model(model, params, {}, jnp.asarray(images) / 255.0,
                                    train=False)[0], np.float64)
    expected = int(((logits.argmax(-1) == labels) & valid).sum())
    identity = attacks.Pgd(epsilon=0.1, step_size=0.1, num_steps=0)
    for attack in (None, identity):
        step = eval_lib.make_eval_step(model, attack)
        counts = {k: int(v) for k, v in step(params, {}, images, labels, valid,
                                             jax.random.PRNGKey(1)).items()}
        assert counts == {"nat": expected, "valid": 13}
    result = eval_lib.evaluate(step, params, {}, [(images, labels, valid)],
                               jax.random.PRNGKey(1))
    assert result == {"nat_acc": expected / 13, "eval_examples": 13}
    assert accuracy_line(result, None) == f"natural {100 * expected / 13:.2f}%"
    assert accuracy_line({"nat_acc": 0.5, "adv_acc": 0.25}, "PGD-40 (L-inf eps 0.3)") == \
        "natural 50.00%  PGD-40 25.00%"
    table = logs.summary_table({"stages": {"pretrain": {
        "nat_acc": 0.5, "compression_rate": {"all": 1.0, "pruned": 1.0}}}})
    assert "adv_acc" not in table and "PGD" not in table


def test_subsets_of_the_test_split():
    n, batch = 10, 4
    images = jnp.arange(24 * 2, dtype=jnp.uint8).reshape(24, 2)
    labels = jnp.arange(24, dtype=jnp.int32)
    valid = jnp.asarray(np.arange(24) < 22)  # 22 examples padded to 24
    sub = DeviceTest((images, labels, valid)).subset(n, batch)
    got = list(sub.batches(batch))
    assert len(got) == 3  # ceil(10 / 4) whole batches
    kept = np.concatenate([np.asarray(lab)[np.asarray(v)] for _, lab, v in got])
    np.testing.assert_array_equal(kept, np.arange(n))
    whole = DeviceTest((images, labels, valid))
    assert whole.subset(0, batch) is whole and whole.subset(22, batch) is whole
    # A streamed split is in class order: n records spread evenly over it.
    stream = StreamTest(source=list(range(100)), reading=None)
    spread = stream.subset(7, batch).source
    assert [spread[i] for i in range(len(spread))] == [i * 100 // 7 for i in range(7)]
    assert stream.subset(0, batch) is stream and stream.subset(100, batch) is stream


def test_an_old_config_json_keeps_attacking_every_evaluation_on_the_whole_split():
    new = mnist_config.get_config("natural")
    assert eval_lib.attack_schedule(new) == "phase_end"
    old = json.loads(json.dumps(new.to_dict()))
    del old["eval"]["adversarial"], old["eval"]["n"]
    upgraded = migrate.upgrade_config_dict(old)
    assert (upgraded["eval"]["adversarial"], upgraded["eval"]["n"]) == ("every_eval", 0)
    new.eval.adversarial = "every_eval"
    assert config_differences(upgraded, new.to_dict()) == []
    assert eval_lib.attack_schedule(new) == "every_eval"
    # A config that has the fields keeps them.
    kept = migrate.upgrade_config_dict(dict(new.to_dict(), eval=dict(old["eval"], n=5,
                                                                      adversarial="auto")))
    assert (kept["eval"]["adversarial"], kept["eval"]["n"]) == ("auto", 5)


@pytest.mark.parametrize("field, value, message", [
    ("adversarial", "sometimes", r"eval.adversarial='sometimes' is not allowed: one of "
                                 r"\('auto', 'every_eval', 'phase_end'\)"),
    ("n", -1, r"eval.n=-1 is not allowed: an integer >= 0"),
])
def test_bad_evaluation_fields_are_refused_naming_the_value(field, value, message):
    c = tiny_digits("natural")
    c.eval[field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(c)


def test_imagenet_natural_presets_report_no_robust_accuracy_in_training():
    for preset in ("resnet50,natural", "smoke,natural"):
        c = imagenet_config.get_config(preset)
        assert eval_lib.attack_schedule(c) == "never"
        assert eval_lib.eval_attack_label(c) is None
