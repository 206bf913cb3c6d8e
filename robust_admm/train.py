"""Command line and stage orchestration: pretrain -> admm -> retrain.

    python -m robust_admm.train --config configs/mnist.py:cpu --workdir runs/mnist \
        [--config.admm.rho=0.01 ...]

Writes into the workdir: config.json, metrics.jsonl, checkpoints/<stage>, summary.json.
"""
import dataclasses
import fnmatch
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from robust_admm import admm as admm_lib
from robust_admm import attacks, checkpoint, data, optim, projections, report
from robust_admm.config_base import STAGES
from robust_admm.models import get_model
from robust_admm.step import TrainState, make_attack, make_eval_step, make_train_step


# ----------------------------------------------------------------------------- config

def parse_stages(stages: str) -> list:
    """'pretrain,admm,retrain' -> list, checked to be a non-empty ordered subset."""
    names = [s.strip() for s in str(stages).split(",") if s.strip()]
    if not names:
        raise ValueError(f"stages={stages!r} is empty; allowed: a comma-separated, ordered "
                         f"subset of {','.join(STAGES)}")
    for s in names:
        if s not in STAGES:
            raise ValueError(f"stages={stages!r}: unknown stage {s!r}; allowed: {STAGES}")
    order = [STAGES.index(s) for s in names]
    if order != sorted(set(order)) or order != list(range(order[0], order[0] + len(order))):
        raise ValueError(f"stages={stages!r} must be consecutive and in the order "
                         f"{','.join(STAGES)} (each stage starts from the previous one)")
    return names


def parse_ratios(text: str) -> dict:
    """'conv1=0.8,fc*=0.9' -> {'conv1': 0.8, 'fc*': 0.9}."""
    out = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"prune.ratios={text!r}: item {item!r} is not 'layer=ratio'") from None
    if not out:
        raise ValueError(f"prune.ratios={text!r} names no layer; e.g. 'conv1=0.5,fc*=0.9'")
    return out


def prune_rules(config, input_shape, num_classes: int) -> dict:
    """{pattern: spec} from config.prune: explicit ratios, or 'prune to width w''."""
    p = config.prune
    if p.to_width:
        if not 0 < p.to_width < config.model.width:
            raise ValueError(f"prune.to_width={p.to_width} must be in (0, model.width="
                             f"{config.model.width})")
        shapes = {}
        for w in (config.model.width, p.to_width):
            m = get_model(config.model.name, num_classes, w)
            shapes[w] = jax.eval_shape(m.init, jax.random.PRNGKey(0),
                                       jnp.zeros(input_shape, jnp.float32))["params"]
        layers = [s.strip() for s in p.to_width_layers.split(",") if s.strip()]
        ratios = projections.ratios_to_match(shapes[config.model.width], shapes[p.to_width],
                                             layers)
    else:
        ratios = parse_ratios(p.ratios)
    return {k: {"kind": p.kind, "ratio": r} for k, r in ratios.items()}


# ----------------------------------------------------------------------------- eval

def evaluate(eval_step, params, batch_stats, test, batch_size: int, key) -> dict:
    """Natural and adversarial accuracy over the (padded, on-device) test set."""
    images, labels, valid = test
    nat = adv = 0
    for i, start in enumerate(range(0, labels.shape[0], batch_size)):
        sl = slice(start, start + batch_size)
        n, a = eval_step(params, batch_stats, images[sl], labels[sl], valid[sl],
                         jax.random.fold_in(key, i))
        nat, adv = nat + n, adv + a
    total = int(valid.sum())
    return {"nat_acc": int(nat) / total, "adv_acc": int(adv) / total, "eval_examples": total}


def pad_to_multiple(images, labels, multiple: int):
    """Test split padded to a whole number of eval batches, with a validity mask."""
    n = labels.shape[0]
    pad = (-n) % multiple
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return jax.device_put(images), jax.device_put(labels), jax.device_put(valid)


# ----------------------------------------------------------------------------- stages

@dataclasses.dataclass
class Run:
    """What every stage needs: built once per run."""
    config: object
    workdir: str
    model: object
    train: tuple  # (images uint8, labels int32) on the device
    test: tuple  # (images, labels, valid) on the device, padded
    specs: dict  # leaf path -> projection spec
    eval_step: object
    writer: report.MetricsWriter
    key: jax.Array


def compression(params, specs) -> dict:
    """Compression rates (dense size / nonzeros) over all weights and the pruned leaves."""
    return {"all": projections.compression_rate(params),
            "pruned": projections.compression_rate(params, rules=specs) if specs else 1.0}


def run_stage(run: Run, stage: str, params, batch_stats, masks):
    """Trains one stage from (params, batch_stats, masks); returns them and the results."""
    cfg = run.config
    scfg = cfg[stage]
    n_train = run.train[1].shape[0]
    spe = n_train // cfg.batch_size
    if spe == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {n_train} training examples")
    period = cfg.admm.update_every_epochs if stage == "admm" else None
    schedule = optim.make_schedule(scfg, spe, period)
    tx = optim.make_optimizer(scfg, schedule)

    admm_state = admm_lib.empty()
    if stage == "admm":
        if cfg.prune.masked_progressive:
            masks = admm_lib.freeze_zeros(params, masks, run.specs)
        admm_state = admm_lib.init(params, run.specs, cfg.admm.rho)
    elif stage == "retrain":
        params, masks = admm_lib.hard_project(params, run.specs)
    admm_update = jax.jit(lambda p, s: admm_lib.update(
        p, s, run.specs, cfg.admm.rho_growth, cfg.admm.rho_max))

    stage_key = jax.random.fold_in(run.key, STAGES.index(stage))  # donated with the state
    eval_key = jax.random.fold_in(run.key, 100 + STAGES.index(stage))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), masks=masks, admm=admm_state, key=stage_key)
    warmup = int(round(cfg.attack.warmup_epochs * spe)) if stage == "pretrain" else 0
    train_step = make_train_step(run.model, tx, make_attack(cfg.attack, cfg.setting, warmup),
                                 cfg.batch_size, schedule)
    total = scfg.epochs * spe
    progress = report.Progress(total, cfg.batch_size)
    report.log(f"[{stage}] {scfg.epochs} epochs x {spe} steps, batch {cfg.batch_size}")
    history, result = [], None
    step = 0
    for epoch in range(1, scfg.epochs + 1):
        for _ in range(spe):
            state, metrics = train_step(state, *run.train)
            history.append(metrics)
            step += 1
            if step % cfg.log_every_steps == 0 or step == total:
                m = report.mean_metrics(jax.device_get(history))
                history = []
                if not math.isfinite(m["loss"]):
                    raise FloatingPointError(
                        f"[{stage}] non-finite loss {m['loss']} at step {step} (epoch {epoch}); "
                        f"stopping. Lower the learning rate or check the data.")
                speed = progress.update(step)
                rho = {k: float(v) for k, v in state.admm.rho.items()}
                run.writer.write(stage=stage, epoch=epoch, step=step, kind="train", **m,
                                 **speed, rho=rho)
                report.log(
                    f"[{stage}] epoch {epoch}/{scfg.epochs} step {step}/{total} "
                    f"loss {m['loss']:.4f} acc {m['train_acc']:.3f} lr {m.get('lr', 0):.2e} "
                    f"{speed['img_per_s']:.0f} img/s ETA {report.fmt_duration(speed['eta_s'])}")
        if stage == "admm" and epoch % cfg.admm.update_every_epochs == 0:
            new_admm, res = admm_update(state.params, state.admm)
            state = state.replace(admm=new_admm)
            res = {k: float(v) for k, v in jax.device_get(res).items()}
            run.writer.write(stage=stage, epoch=epoch, step=step, kind="admm_update", **res,
                             rho={k: float(v) for k, v in new_admm.rho.items()})
            worst = max((v for k, v in res.items() if k.startswith("primal")), default=0.0)
            report.log(f"[{stage}] ADMM update at epoch {epoch}: max ||W-Z||/||W|| = {worst:.4f}")
        if epoch % cfg.eval.every_epochs == 0 or epoch == scfg.epochs:
            result = evaluate(run.eval_step, state.params, state.batch_stats, run.test,
                              cfg.eval.batch_size, jax.random.fold_in(eval_key, epoch))
            run.writer.write(stage=stage, epoch=epoch, step=step, kind="eval", **result)
            report.log(f"[{stage}] epoch {epoch}: natural {100 * result['nat_acc']:.2f}%  "
                       f"PGD-{cfg.eval.num_steps} {100 * result['adv_acc']:.2f}%")
    if result is None:  # a stage with 0 epochs still reports where it stands
        result = evaluate(run.eval_step, state.params, state.batch_stats, run.test,
                          cfg.eval.batch_size, eval_key)
    return state.params, state.batch_stats, state.masks, result


def stage_summary(run: Run, params, masks, result) -> dict:
    host = jax.device_get(params)
    return {
        "nat_acc": result["nat_acc"],
        "adv_acc": result["adv_acc"],
        "compression_rate": compression(host, run.specs),
        "sparsity": projections.sparsity_report(host, jax.device_get(masks)),
    }


# ----------------------------------------------------------------------------- run

def load_data(config):
    ds = data.load_dataset(config.data.name, config.data.source, config.data.dir or None)
    train, test = ds.train, ds.test
    if config.data.train_examples:
        train = data.Split(train.images[: config.data.train_examples],
                           train.labels[: config.data.train_examples])
    if config.data.test_examples:
        test = data.Split(test.images[: config.data.test_examples],
                          test.labels[: config.data.test_examples])
    return ds, train, test


def train_and_evaluate(config, workdir: str) -> dict:
    """Runs the configured stages in `workdir`; returns the summary (also summary.json)."""
    stages = parse_stages(config.stages)
    os.makedirs(workdir, exist_ok=True)
    t_start = time.time()
    ds, train, test = load_data(config)
    report.log(data.describe(ds))
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json(indent=2))

    model = get_model(config.model.name, ds.num_classes, config.model.width)
    input_shape = (1,) + train.images.shape[1:]
    key = jax.random.PRNGKey(config.seed)
    variables = model.init(jax.random.fold_in(key, 12345), jnp.zeros(input_shape, jnp.float32))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    rules = prune_rules(config, input_shape, ds.num_classes)
    specs = projections.match_rules(params, rules)

    eval_attack = lambda fn, x, y, k: attacks.pgd_restarts(
        fn, x, y, k, restarts=config.eval.restarts, epsilon=config.attack.epsilon,
        step_size=config.eval.step_size, num_steps=config.eval.num_steps,
        random_start=config.attack.random_start, loss=config.attack.loss,
        unroll=config.attack.unroll)
    run = Run(config=config, workdir=workdir, model=model,
              train=(jax.device_put(train.images), jax.device_put(train.labels)),
              test=pad_to_multiple(test.images, test.labels, config.eval.batch_size),
              specs=specs, eval_step=make_eval_step(model, eval_attack),
              writer=report.MetricsWriter(workdir), key=key)

    masks = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, bool), params)
    first = STAGES.index(stages[0])
    if first > 0:
        prev = STAGES[first - 1]
        if not checkpoint.has_stage(workdir, prev):
            raise FileNotFoundError(
                f"stages={config.stages!r} starts with {stages[0]!r}, which needs the result "
                f"of stage {prev!r}, but {checkpoint.stage_dir(workdir, prev)} does not exist: "
                f"run {prev!r} in this workdir first")
        restored = checkpoint.load_stage(workdir, prev, {
            "params": params, "batch_stats": batch_stats, "masks": masks})
        params, batch_stats, masks = (restored["params"], restored["batch_stats"],
                                      restored["masks"])
        report.log(f"loaded the result of stage {prev!r} from {checkpoint.stage_dir(workdir, prev)}")

    summary_path = os.path.join(workdir, "summary.json")
    summary = {"stages": {}}
    if os.path.exists(summary_path):  # keep the results of stages run earlier
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    for stage in stages:
        params, batch_stats, masks, result = run_stage(run, stage, params, batch_stats, masks)
        checkpoint.save_stage(workdir, stage, {
            "params": params, "batch_stats": batch_stats, "masks": masks})
        summary["stages"][stage] = stage_summary(run, params, masks, result)
        summary["wall_time_s"] = time.time() - t_start
        with open(summary_path, "w", encoding="utf-8") as f:
            json.dump(report.to_python(summary), f, indent=2)
    report.log(report.summary_table(summary))
    report.log(f"done in {report.fmt_duration(time.time() - t_start)}; outputs in {workdir}")
    return summary


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mnist.py:cpu.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (orbax) off the console
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
