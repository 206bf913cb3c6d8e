"""Programs of phases and per-layer rules: parsing, inheritance, errors, and a progressive
program with mixed kinds whose every phase ends exactly on its rules."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT
from robust_admm.compression import projections
from robust_admm.compression import rules as rules_lib
from robust_admm.compression import size as size_lib
from robust_admm.experiments import migrate
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.config_base import phase_config
from robust_admm.models import get_model
from robust_admm.training import program as program_lib

sys.path.insert(0, ROOT)
from configs import mnist as mnist_config  # noqa: E402


def lenet_shapes(width):
    model = get_model("lenet_adv", 10, width)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 28, 28, 1), jnp.float32))["params"]


def test_rules_text_parses_every_kind_and_combination():
    got = rules_lib.parse_rules("conv*=filter:0.5, conv2=column:w4,fc1=irregular:0.9+quantize:4,"
                             "fc2=nm:2:4, out=quantize:2, x=channel:0.25, y=quantize:1+nm:1:4")
    assert got == {
        "conv*": {"kind": "filter", "ratio": 0.5},
        "conv2": {"kind": "column", "width": 4},
        "fc1": {"kind": "quantize", "bits": 4, "sparsity": "irregular", "ratio": 0.9},
        "fc2": {"kind": "nm", "n": 2, "m": 4},
        "out": {"kind": "quantize", "bits": 2},
        "x": {"kind": "channel", "ratio": 0.25},
        "y": {"kind": "quantize", "bits": 1, "sparsity": "nm", "n": 1, "m": 4},
    }


@pytest.mark.parametrize("text,match", [
    ("", "name no layer"), ("fc1=", "not 'layer=set'"), ("fc1=irregular:0.5:1", "one value"),
    ("fc1=nm:2:x", "M='x' is not an integer"), ("fc1=quantize:4+quantize:2", "at most one"),
    ("fc1=filter:w", "width='' is not an integer"), ("a=irregular:0.5,a=filter:0.5", "twice"),
])
def test_bad_rules_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        rules_lib.parse_rules(text)


def test_rules_resolve_per_layer_with_widths_and_mixed_kinds():
    params = lenet_shapes(16)
    specs = rules_lib.resolve_rules("conv1=filter:0.5,conv2=irregular:w4+quantize:2,fc*=nm:2:4",
                                 params, mnist_config.get_config("paper").model, 10,
                                 (1, 28, 28, 1))
    assert specs == {
        "conv1/kernel": {"kind": "filter", "ratio": 0.5},
        # conv2 grows with w^2: the w = 4 model keeps 1/16 of the w = 16 model's weights.
        "conv2/kernel": {"kind": "quantize", "bits": 2, "method": "auto",
                         "sparsity": "irregular", "ratio": pytest.approx(1 - 1 / 16)},
        "fc1/kernel": {"kind": "nm", "n": 2, "m": 4},
        "fc2/kernel": {"kind": "nm", "n": 2, "m": 4},
    }


@pytest.mark.parametrize("text,match", [
    ("conv*=filter:0.5,conv1=irregular:0.5", "matched by two rules: 'conv\\*' and 'conv1'"),
    ("conv9=filter:0.5", "'conv9' matches no kernel leaf.*available layers"),
    ("conv1=filter:w16", "width 16 must be in \\(0, model.width=16\\)"),
    ("conv1=nm:2:4", "divisible by m"),  # conv1 has one input channel
])
def test_rules_that_do_not_fit_the_model_are_named(text, match):
    with pytest.raises(ValueError, match=match):
        rules_lib.resolve_rules(text, lenet_shapes(16), mnist_config.get_config("paper").model, 10,
                             (1, 28, 28, 1))


def test_the_default_program_and_rule_inheritance():
    cfg = mnist_config.get_config("cpu")
    program = program_lib.parse_program(cfg)
    assert [(p.name, p.kind, p.index) for p in program] == [
        ("pretrain", "dense", 0), ("admm", "admm", 1), ("retrain", "retrain", 2)]
    legacy = "conv1=irregular:0.5,conv2=irregular:0.8,fc1=irregular:0.9,fc2=irregular:0.75"
    assert [p.rules for p in program] == ["", legacy, legacy]
    assert [p.rules_from for p in program] == ["", "prune", "prune"]
    cfg.program = "pretrain,admm,retrain,admm2,retrain2"
    cfg.admm2 = phase_config("admm", 1, 1e-3, rules="fc1=irregular:0.95")
    cfg.retrain2 = phase_config("retrain", 1, 1e-3)
    cfg.admm.rules = "fc*=filter:0.5"
    program = program_lib.parse_program(cfg)
    assert [p.rules for p in program[1:]] == ["fc*=filter:0.5"] * 2 + ["fc1=irregular:0.95"] * 2
    assert [p.rules_from for p in program[1:]] == ["admm", "admm", "admm2", "admm2"]
    cfg.stages = "admm2,retrain2"
    assert [p.name for p in program_lib.phases_to_run(cfg, program)] == ["admm2", "retrain2"]
    for stages, match in [("retrain2,admm2", "out of order"), ("admm,admm2", "consecutive"),
                          ("admm3", "unknown stage 'admm3'")]:
        cfg.stages = stages
        with pytest.raises(ValueError, match=match):
            program_lib.phases_to_run(cfg, program)


def test_prune_to_width_keeps_the_weights_of_the_narrow_model():
    """The paper's "w=16 pruned to 4": conv1 and fc2 shrink with w, conv2 and fc1 with w^2."""
    cfg = mnist_config.get_config("paper")
    specs = rules_lib.resolve_rules(rules_lib.legacy_rules(cfg.prune), lenet_shapes(16), cfg.model,
                                 10, (1, 28, 28, 1))
    got = {k: v["ratio"] for k, v in specs.items()}
    assert got == pytest.approx({"conv1/kernel": 0.75, "conv2/kernel": 1 - 1 / 16,
                                 "fc1/kernel": 1 - 1 / 16, "fc2/kernel": 0.75})


@pytest.mark.parametrize("text,match", [("conv1", "not 'layer=ratio'"), ("", "names no layer"),
                                        ("fc1=abc", "not 'layer=ratio'")])
def test_bad_ratio_strings_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        rules_lib.parse_ratios(text)


def group_counts(w, m):
    """Nonzeros of every group of m consecutive input channels (axis -2)."""
    g = np.moveaxis(w, -2, -1)
    return (g.reshape(g.shape[:-1] + (g.shape[-1] // m, m)) != 0).sum(-1)


def assert_on_levels(w, bits, nonzero=None):
    """w = alpha * q on the bits' levels: few distinct magnitudes, and projecting onto the
    levels (within w's support) leaves w where it is."""
    mags = np.unique(np.abs(w[w != 0]))
    assert len(mags) <= (1 if bits <= 2 else 2 ** (bits - 1) - 1)
    again, _ = projections.project_leaf(w, "quantize", bits=bits, mask=w != 0)
    np.testing.assert_allclose(np.asarray(again), w, atol=1e-6 * np.abs(w).max())
    if nonzero is not None:
        assert np.count_nonzero(w) == nonzero


def test_a_progressive_program_with_mixed_kinds_ends_each_phase_on_its_rules(program_run):
    """:smoke_program (conftest.py): two admm + retrain rounds, rising rates, every kind.
    Each retrain's model satisfies its rules exactly (retrain projecting after each update,
    retrain2 with the straight-through estimator), and round 2 keeps round 1's zeros."""
    workdir, _ = program_run
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    program = mnist_config.get_config("smoke_program").program.split(",")
    assert summary["program"] == list(summary["stages"]) == program
    assert [summary["stages"][s]["kind"] for s in program] == [
        "dense", "admm", "retrain", "admm", "retrain"]
    size = summary["stages"]["retrain2"]["size"]["layers"]
    assert [size[n]["bits"] for n in ("conv1", "conv2", "fc1", "fc2")] == [32, 32, 4, 1]

    one = jax.device_get(workdir_lib.load_final_state(workdir, "retrain")["params"])
    two = jax.device_get(workdir_lib.load_final_state(workdir, "retrain2")["params"])
    k = {n: np.asarray(one[n]["kernel"]) for n in one}
    k2 = {n: np.asarray(two[n]["kernel"]) for n in two}
    # Round 1: half of conv1's 2 filters, half of conv2's 50 columns, 2:4, ternary.
    assert (np.abs(k["conv1"]).reshape(-1, 2).sum(0) > 0).sum() == 1
    assert (np.abs(k["conv2"]).reshape(-1, 4).sum(1) > 0).sum() == 25
    assert group_counts(k["fc1"], 4).max() <= 2
    assert_on_levels(k["fc2"], 2)
    # Round 2: the same filter, a quarter of the columns (within round 1's), 1:4 on 4-bit
    # levels (within round 1's 2:4), half of fc2 binary.
    filters = [np.abs(w).reshape(-1, 2).sum(0) > 0 for w in (k["conv1"], k2["conv1"])]
    assert np.array_equal(*filters)
    cols = np.abs(k2["conv2"]).reshape(-1, 4).sum(1) > 0
    assert cols.sum() == projections.kept_count(50, 0.75)
    assert not np.any(cols & ~(np.abs(k["conv2"]).reshape(-1, 4).sum(1) > 0))
    assert group_counts(k2["fc1"], 4).max() <= 1
    assert not np.any((k2["fc1"] != 0) & (k["fc1"] == 0))
    assert_on_levels(k2["fc1"], 4)
    assert_on_levels(k2["fc2"], 1, nonzero=projections.kept_count(k2["fc2"].size, 0.5))


def test_model_size_counts_bits_and_the_cheaper_format_by_hand():
    rng = np.random.default_rng(0)
    sparse = rng.normal(size=(16, 8)).astype(np.float32)
    sparse[:, :6] = 0  # 32 of 128 nonzero
    ternary = np.sign(rng.normal(size=(10, 10))).astype(np.float32) * 0.5  # 100 nonzero
    params = {"a": {"kernel": sparse, "bias": np.ones(8, np.float32)},
              "b": {"kernel": ternary}, "c": {"kernel": np.ones((3, 3), np.float32)}}
    specs = {"a/kernel": {"kind": "irregular", "ratio": 0.75},
             "b/kernel": {"kind": "quantize", "bits": 2}}
    size = size_lib.model_size(params, specs)
    a, b, c = (size["layers"][k] for k in "abc")
    # a: bitmask 128 / 8 = 16 bytes + 32 float32 = 144 < dense 512.
    assert (a["format"], a["bytes"], a["bits"], a["nonzero"]) == ("bitmask", 144, 32, 32)
    # b: dense 2-bit codes 100 * 2 / 8 = 25 + 4 (scale) = 29 < bitmask 13 + 25 + 4 = 42.
    assert (b["format"], b["bytes"], b["bits"]) == ("dense", 29, 2)
    assert (c["format"], c["bytes"], c["compressed"]) == ("dense", 36, False)
    total = size["total"]
    assert total["bytes"] == 144 + 4 * 8 + 29 + 36
    assert total["dense_bytes"] == 4 * (128 + 8 + 100 + 9)
    assert total["rate_by_bytes"] == pytest.approx(total["dense_bytes"] / total["bytes"])
    assert total["rate_by_nonzeros"] == pytest.approx(245 / (32 + 8 + 100 + 9))


def test_an_old_config_json_reads_as_the_config_a_new_run_writes():
    """A workdir written before programs and augmentation resumes without a config change:
    the fields added since are filled in at the values that mean what it ran."""
    from robust_admm.experiments.validation import config_differences
    new = mnist_config.get_config("cpu_pgd_at").to_dict()
    old = json.loads(json.dumps(new))
    del old["program"], old["data"]["augment"], old["model"]["dtype"]
    for name in ("admm", "retrain"):
        for field in ("kind", "rules", "quantize_update"):
            old[name].pop(field, None)
    del old["pretrain"]["kind"]
    assert config_differences(migrate.upgrade_config_dict(old), new) == []
    assert config_differences(old, new)  # (the test would notice a no-op upgrade)
    # Written with programs, before phases had their own training attack.
    old = json.loads(json.dumps(new))
    for name in ("pretrain", "admm", "retrain"):
        del old[name]["attack_steps"], old[name]["attack_step_size"]
    assert config_differences(old, new)
    assert config_differences(migrate.upgrade_config_dict(old), new) == []


def test_a_config_json_from_before_smoothing_and_mixup_reads_with_both_off():
    from robust_admm.experiments.validation import config_differences
    new = mnist_config.get_config("cpu").to_dict()
    old = json.loads(json.dumps(new))
    del old["label_smoothing"], old["mixup_alpha"]
    assert config_differences(old, new)
    upgraded = migrate.upgrade_config_dict(old)
    assert (upgraded["label_smoothing"], upgraded["mixup_alpha"]) == (0.0, 0.0)
    assert config_differences(upgraded, new) == []
    # A config that has them keeps them.
    new["label_smoothing"], new["mixup_alpha"] = 0.1, 0.2
    assert migrate.upgrade_config_dict(dict(new))["mixup_alpha"] == 0.2


def test_a_config_json_from_before_streamed_sources_reads_as_a_new_one():
    from robust_admm.experiments.validation import config_differences
    new = mnist_config.get_config("cpu").to_dict()
    old = json.loads(json.dumps(new))
    for field in ("image_size", "check_headers", "bad_images", "max_pixels", "num_workers",
                  "num_threads", "prefetch", "crops", "channels"):
        del old["data"][field]
    assert config_differences(old, new)
    assert config_differences(migrate.upgrade_config_dict(old), new) == []


def test_a_config_json_lacking_some_data_fields_only_gets_those():
    from robust_admm.experiments.validation import config_differences
    new = mnist_config.get_config("cpu").to_dict()
    old = json.loads(json.dumps(new))
    del old["data"]["channels"]  # written after image_size, before channels
    old["data"]["image_size"] = 28  # a field it has keeps its value
    upgraded = migrate.upgrade_config_dict(old)
    assert upgraded["data"]["channels"] == 3 and upgraded["data"]["image_size"] == 28
    assert config_differences(upgraded, new) == ["data.image_size: 28 -> 0"]
