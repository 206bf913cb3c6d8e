"""End to end: the three stages on real data (the scikit-learn digits), the CLI, configs."""
import json
import os
import sys

import numpy as np
import pytest

from helpers import ROOT, run_cli, write_idx
from robust_admm.compression import projections
from robust_admm.compression import rules as rules_lib
from robust_admm.evaluation import eval_step
from robust_admm.experiments import config_base
from robust_admm.experiments import evaluate
from robust_admm.experiments import export
from robust_admm.experiments import run as run_lib
from robust_admm.experiments import validation
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.training import program

sys.path.insert(0, ROOT)
from configs import digits as digits_config  # noqa: E402
from configs import mnist as mnist_config  # noqa: E402


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """The quick start as shipped (adversarial, all stages) and a natural baseline."""
    adv_dir = str(tmp_path_factory.mktemp("adv"))
    adv = run_lib.train_and_evaluate(digits_config.get_config(), adv_dir)
    nat_cfg = digits_config.get_config()
    nat_cfg.setting, nat_cfg.stages = "natural", "pretrain"
    nat_dir = str(tmp_path_factory.mktemp("nat"))
    nat = run_lib.train_and_evaluate(nat_cfg, nat_dir)
    return adv, adv_dir, nat


def test_digits_pruned_model_is_robust_where_a_natural_one_is_not(digits_runs):
    """Measured (seed 0, eps 0.15, PGD-20): adversarial+pruned ~94% natural / ~45-50% under
    PGD; naturally trained ~98% natural / 3-9% under PGD. The thresholds leave room for
    platform noise but no broken attack, training or pruning step passes them."""
    adv, _, nat = digits_runs
    final = adv["stages"]["retrain"]
    assert final["nat_acc"] >= 0.85
    assert final["adv_acc"] >= 0.30
    assert nat["stages"]["pretrain"]["nat_acc"] >= 0.90
    assert nat["stages"]["pretrain"]["adv_acc"] <= 0.20
    assert final["adv_acc"] >= nat["stages"]["pretrain"]["adv_acc"] + 0.20


def test_digits_final_sparsity_is_exact(digits_runs):
    adv, workdir, _ = digits_runs
    cfg = digits_config.get_config()
    ratios = rules_lib.parse_ratios(cfg.prune.ratios)
    sparsity = adv["stages"]["retrain"]["sparsity"]
    params = workdir_lib.load_final_state(workdir, "retrain")["params"]
    total = nnz = 0
    for layer, ratio in ratios.items():
        w = np.asarray(params[layer]["kernel"])
        k = projections.kept_count(w.size, ratio)
        assert np.count_nonzero(w) == k, layer
        total, nnz = total + w.size, nnz + k
        assert sparsity[layer]["nonzero"] == k
    assert adv["stages"]["retrain"]["compression_rate"]["pruned"] == pytest.approx(total / nnz)
    assert adv["stages"]["pretrain"]["compression_rate"]["pruned"] == pytest.approx(1.0)


def test_digits_outputs(digits_runs):
    _, workdir, _ = digits_runs
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert os.path.isfile(os.path.join(workdir, name))
    for stage in ("pretrain", "admm", "retrain"):
        assert os.path.isdir(os.path.join(workdir, "checkpoints", stage))
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    evals = [l for l in lines if l["kind"] == "eval"]
    assert {l["stage"] for l in evals} == {"pretrain", "admm", "retrain"}
    for l in evals:
        assert {"stage", "epoch", "step", "nat_acc", "adv_acc"} <= set(l)
    trains = [l for l in lines if l["kind"] == "train"]
    for l in trains:
        assert {"loss", "lr", "rho", "img_per_s", "eta_s"} <= set(l)
    updates = [l for l in lines if l["kind"] == "admm_update"]
    cfg = digits_config.get_config()
    assert len(updates) == cfg.admm.epochs // cfg.admm.update_every_epochs
    rho = [u["rho"]["fc1/kernel"] for u in updates]
    np.testing.assert_allclose(rho[1] / rho[0], cfg.admm.rho_growth, rtol=1e-5)


def test_cli_smoke_on_idx_files_then_a_stage_subset(tmp_path):
    data_dir = str(tmp_path / "idx")
    write_idx(data_dir, np.random.default_rng(0))
    files = ["--config.data.source=files", f"--config.data.dir={data_dir}"]
    workdir = str(tmp_path / "run")
    # A phase's own training attack (:smoke's is PGD-3 at step 0.1) replaces attack.*'s.
    files += ["--config.admm.attack_steps=2", "--config.retrain.attack_step_size=0.07"]
    r = run_cli(workdir, *files, "--config.admm.rho=0.01")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compression (pruned)" in r.stdout and "img/s" in r.stdout and "ETA" in r.stdout
    for line in ("[pretrain] training attack: PGD-3 (eps 0.3, step 0.1)",
                 "[admm] training attack: PGD-2 (eps 0.3, step 0.1)",
                 "[retrain] training attack: PGD-3 (eps 0.3, step 0.07)"):
        assert line in r.stdout
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["admm"]["rho"] == 0.01
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary["stages"]) == {"pretrain", "admm", "retrain"}
    # The speed of each phase: the median of the rates its train records logged, over all
    # of its steps, its first (compiling) step timed apart, within the run's wall time.
    cfg = mnist_config.get_config("smoke")
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    for name, phase in summary["stages"].items():
        total = cfg[name].epochs * (cfg.data.train_examples // cfg.batch_size)
        trains = [l for l in records if l.get("stage") == name and l["kind"] == "train"]
        assert [l["step"] for l in trains] == list(range(cfg.log_every_steps, total + 1,
                                                          cfg.log_every_steps)), name
        assert phase["speed"]["steps"] == total
        assert phase["speed"]["img_per_s"] == np.median([l["img_per_s"] for l in trains])
        assert phase["speed"]["first_step_s"] > 0
    [done] = [l for l in records if l["kind"] == "done"]
    assert sum(p["speed"]["first_step_s"] for p in summary["stages"].values()) \
        < done["wall_time_s"]
    # A projection of the phase's time, logged at its second interval.
    assert "[admm] projected: " in r.stdout
    # Rerun only the last stage from the admm checkpoint in the same workdir.
    r = run_cli(workdir, *files, "--config.admm.rho=0.01", "--config.stages=retrain")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded the result of stage 'admm'" in r.stdout


def test_cli_refuses_a_stage_subset_without_the_previous_checkpoint(tmp_path):
    data_dir = str(tmp_path / "idx")
    write_idx(data_dir, np.random.default_rng(1), 32, 16)
    r = run_cli(str(tmp_path / "empty"), "--config.data.source=files",
                f"--config.data.dir={data_dir}", "--config.stages=admm,retrain")
    assert r.returncode != 0
    assert "needs the result of stage 'pretrain'" in r.stderr and "Traceback" not in r.stderr


def test_cli_refuses_an_unknown_config_field(tmp_path):
    r = run_cli(str(tmp_path / "w"), "--config.admm.rhoo=0.1")
    assert r.returncode != 0 and "rhoo" in r.stderr


def test_the_base_config_is_refused_until_a_dataset_config_fills_it():
    """The base config names no dataset, model, radius or rules: validation names each
    unset field, and a compressing phase without rules is named too."""
    cfg = config_base.base_config()
    with pytest.raises(ValueError) as e:
        validation.validate_config(cfg, device_count=1)
    for field in validation.DATASET_FIELDS:
        assert field in str(e.value)
    cfg.data.name, cfg.model.name = "mnist", "lenet_adv"
    cfg.attack.epsilon = cfg.eval.epsilon = 0.3
    cfg.attack.step_size = cfg.eval.step_size = 0.01
    with pytest.raises(ValueError, match="phase 'admm' .admm. has no compression rules"):
        validation.validate_config(cfg, device_count=1)
    cfg.admm.rules = "fc*=irregular:0.9"
    assert [p.rules for p in validation.validate_config(cfg, device_count=1)[0]] == [
        "", "fc*=irregular:0.9", "fc*=irregular:0.9"]


def test_presets_and_unknown_presets():
    for preset in ("paper", *mnist_config.CPU_VARIANTS, "natural", "progressive", "smoke",
                   "smoke_program"):
        cfg = mnist_config.get_config(preset)
        validation.validate_config(cfg, device_count=1)
        assert cfg.attack.epsilon == cfg.eval.epsilon == 0.3
        # Every phase's rules resolve on the preset's model (N:M divisibility, patterns).
        shapes = rules_lib._kernel_shapes(cfg.model.name, 10, cfg.model.width, (1, 28, 28, 1))
        for phase in program.parse_program(cfg):
            if phase.compresses:
                assert rules_lib.resolve_rules(phase.rules, shapes, cfg.model, 10, (1, 28, 28, 1))
    assert mnist_config.get_config("paper").attack.num_steps == 40
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        mnist_config.get_config("fast")
    with pytest.raises(ValueError, match="unknown preset"):
        digits_config.get_config("fast")


def test_eval_command_evaluates_a_finished_run_again_and_exports_it(digits_runs, tmp_path):
    """`robust_admm.eval` on the quick start's run: the natural accuracy equals the run's
    own, the attacks order by strength, the curve and its PNG are written, no masking
    warning fires on this model, and the export rebuilds the same logits."""

    adv, workdir, _ = digits_runs
    out = evaluate.evaluate_workdir(workdir, attacks="fgsm,pgd20,apgd-ce",
                                    epsilons="0.05,0.15", export=str(tmp_path / "model"))
    assert out["stage"] == "retrain"
    assert out["natural_acc"] == adv["stages"]["retrain"]["nat_acc"]
    assert adv["stages"]["retrain"]["adv_attack"].startswith("PGD-20 (L-inf eps 0.15")
    acc = {k: v["robust_acc"] for k, v in out["attacks"].items()}
    assert acc["apgd-ce"] <= acc["pgd20"] + 0.01 and acc["pgd20"] <= acc["fgsm"] + 0.01
    assert out["epsilon"] == 0.15 and out["check_eps_1"]["attacks"]["pgd20"]["robust_acc"] < 0.02
    assert out["warnings"] == []
    with open(os.path.join(workdir, "eval", "retrain.json"), encoding="utf-8") as f:
        assert json.load(f)["attacks"]["apgd-ce"]["robust_acc"] == acc["apgd-ce"]
    with open(os.path.join(workdir, "eval", "retrain_epsilons.json"), encoding="utf-8") as f:
        curve = json.load(f)["curve"]
    assert [c["epsilon"] for c in curve] == [0.0, 0.05, 0.15]
    with open(os.path.join(workdir, "eval", "retrain_epsilons.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out["compression_rate"] == pytest.approx(
        adv["stages"]["retrain"]["compression_rate"]["all"])
    model, variables = export.rebuild(str(tmp_path / "model.npz"), str(tmp_path / "model.json"))
    state = workdir_lib.load_final_state(workdir, "retrain")
    x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.apply(variables, x)),
                                  np.asarray(model.apply({"params": state["params"]}, x)))


def test_eval_command_refuses_bad_input(digits_runs, tmp_path):

    _, workdir, _ = digits_runs
    with pytest.raises(ValueError, match="--stage='final'"):
        evaluate.evaluate_workdir(workdir, stage="final")
    with pytest.raises(ValueError, match="'pgd' is not known"):
        evaluate.evaluate_workdir(workdir, attacks="pgd")
    with pytest.raises(ValueError, match="--epsilons='0.1,x'"):
        evaluate.evaluate_workdir(workdir, epsilons="0.1,x")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate.evaluate_workdir(str(tmp_path))


def test_eval_command_measures_l2_robustness(digits_runs):

    _, workdir, _ = digits_runs
    out = evaluate.evaluate_workdir(workdir, attacks="fgsm,pgd20,apgd-ce", norm="l2",
                                    epsilon=1.0, n=64, checks=False)
    acc = {k: v["robust_acc"] for k, v in out["attacks"].items()}
    assert out["norm"] == "l2" and all(v["norm"] == "l2" for v in out["attacks"].values())
    assert acc["apgd-ce"] <= acc["pgd20"] + 0.01 <= acc["fgsm"] + 0.02
    assert acc["apgd-ce"] < out["natural_acc"]
    with pytest.raises(ValueError, match="digits has no standard L2 radius here; give "
                                         "--epsilon"):
        evaluate.evaluate_workdir(workdir, norm="l2")
    with pytest.raises(ValueError, match="--norm='l1'; allowed: linf, l2"):
        evaluate.evaluate_workdir(workdir, norm="l1")


def test_the_evaluation_attack_comes_from_eval_fields_only():
    cfg = mnist_config.get_config("smoke")
    cfg.attack.update(epsilon=0.1, step_size=0.02, num_steps=7, random_start=True, loss="ce")
    cfg.eval.update(epsilon=0.25, step_size=0.05, num_steps=9, random_start=False,
                    loss="margin", restarts=2)
    a = eval_step.make_eval_attack(cfg)
    assert (a.epsilon, a.step_size, a.num_steps, a.random_start, a.loss, a.restarts) == \
        (0.25, 0.05, 9, False, "margin", 2)
    assert eval_step.eval_attack_label(cfg) == \
        "PGD-9 (L-inf eps 0.25, step 0.05, 2 restart(s), no random start)"
