"""Command line and orchestration of a run's program of phases (robust_admm/recipe.py);
the default: pretrain -> admm -> retrain.

    python -m robust_admm.train --config configs/mnist.py:cpu --workdir runs/mnist \
        [--config.admm.rho=0.01 ...]

Writes into the workdir: config.json, metrics.jsonl, checkpoints/<stage>/<step>,
summary.json. Rerunning the same command in the same workdir resumes where it stopped.
"""
import contextlib
import dataclasses
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from robust_admm import admm as admm_lib
from robust_admm import (attacks, checkpoint, data, host_memory, initialization, logs, optim,
                         parallel, projections, recipe)
from robust_admm.models import get_model
from robust_admm.recipe import Phase
from robust_admm.step import TrainState, make_attack, make_eval_step, make_train_step
from robust_admm.validation import config_differences, validate_config

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a process killed by it


class Preempted(SystemExit):
    """SIGTERM arrived: a checkpoint was saved; the run exits with a non-zero status."""


# ----------------------------------------------------------------------------- config

def phase_specs(config, program, params, num_classes: int, input_shape) -> dict:
    """{phase name: {leaf path: projection spec}} for every phase of the program."""
    out = {}
    for phase in program:
        out[phase.name] = {}
        if not phase.compresses:
            continue
        try:
            out[phase.name] = recipe.resolve_rules(phase.rules, params, config.model,
                                                   num_classes, input_shape)
        except ValueError as e:
            where = ("prune.kind / prune.ratios / prune.to_width" if phase.rules_from == "prune"
                     else f"{phase.rules_from}.rules")
            raise ValueError(f"phase {phase.name!r}: rules {phase.rules!r} (from {where}): "
                             f"{e}") from None
    return out


def check_workdir_config(workdir: str, config, allow_change: bool):
    """Refuses a workdir that holds a run with a different config (unless allowed)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        old = recipe.upgrade_config_dict(json.load(f))
    diffs = config_differences(old, json.loads(config.to_json()))
    if diffs and not allow_change:
        raise ValueError(
            f"{workdir} holds a run with a different config:\n  " + "\n  ".join(diffs)
            + "\nUse another --workdir, or pass --allow_config_change to continue anyway.")


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


def eval_attack_label(config) -> str:
    """What measured `adv_acc`, in words (every robust accuracy names its attack)."""
    e = config.eval
    return (f"PGD-{e.num_steps} (L-inf eps {e.epsilon:g}, step {e.step_size:g}, "
            f"{e.restarts} restart(s), {'random' if e.random_start else 'no random'} start)")


def make_eval_attack(config) -> attacks.Pgd:
    """The PGD of the evaluation during training: `eval.*` only (and the speed-only unroll)."""
    e = config.eval
    return attacks.Pgd(epsilon=e.epsilon, step_size=e.step_size, num_steps=e.num_steps,
                       random_start=e.random_start, loss=e.loss, restarts=e.restarts,
                       unroll=config.attack.unroll)


def pad_to_multiple(images, labels, multiple: int, mesh):
    """Test split padded to a whole number of eval batches, with a validity mask,
    replicated on the mesh."""
    n = labels.shape[0]
    pad = (-n) % multiple
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    return parallel.replicate((images, labels, valid), mesh)


# ----------------------------------------------------------------------------- stages

@dataclasses.dataclass
class Run:
    """What every stage needs: built once per run."""
    config: object
    workdir: str
    model: object
    mesh: object  # jax.sharding.Mesh with one `data` axis over all devices
    train: tuple  # (images uint8, labels int32) on the devices, replicated
    test: tuple  # (images, labels, valid) on the device, padded
    program: list  # every phase of the program (recipe.Phase), in order
    specs: dict  # phase name -> {leaf path: projection spec}
    eval_step: object
    writer: logs.MetricsWriter
    key: jax.Array
    preempted: list  # set to [signal number] by the SIGTERM handler


def compression(params, specs) -> dict:
    """Compression rates (dense size / nonzeros) over all weights and the compressed leaves."""
    return {"all": projections.compression_rate(params),
            "pruned": projections.compression_rate(params, rules=specs) if specs else 1.0}


def initial_state(run: Run, phase: Phase, tx, params, batch_stats, masks) -> TrainState:
    """The state a phase starts from, given the previous phase's result: an admm phase
    starts its Z, U (within the masks so far), a retrain phase projects onto its rules."""
    admm_state = admm_lib.empty()
    specs = run.specs[phase.name]
    if phase.kind == "admm":
        if run.config.prune.masked_progressive:
            masks = admm_lib.freeze_zeros(params, masks, specs)
        admm_state = admm_lib.init(params, specs, run.config[phase.name].rho, masks)
    elif phase.kind == "retrain":
        params, masks = admm_lib.hard_project(params, specs, masks)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), masks=masks, admm=admm_state,
                       key=jax.random.fold_in(run.key, phase.index))
    return parallel.replicate(state, run.mesh)


def stage_optimizer(cfg, phase: Phase, steps_per_epoch: int):
    """(tx, schedule) of a phase; non-finite updates are never applied (the policy on
    how long to go on is enforced by the loop, so the wrapper never gives up)."""
    pcfg = cfg[phase.name]
    period = pcfg.update_every_epochs if phase.kind == "admm" else None
    schedule = optim.make_schedule(pcfg, steps_per_epoch, period)
    tx = optax.apply_if_finite(optim.make_optimizer(pcfg, schedule),
                               max_consecutive_errors=2**30)
    return tx, schedule


def nonfinite_streaks(flags, carried: int = 0) -> tuple[int, int]:
    """(longest, trailing) run of true `flags`, the first run extended by `carried` (the
    streak the previous window ended with). Read from every step's flag because optax's
    own counter resets on the first finite step, hiding a streak that ended between logs."""
    longest, run_ = 0, carried
    for bad in flags:
        run_ = run_ + 1 if bad else 0
        longest = max(longest, run_)
    return longest, run_


def check_nonfinite(stage: str, history: list, streak: int, cfg, last_ckpt) -> int:
    """Enforces `cfg` (config.nonfinite) on the steps since the last log line, given the
    non-finite streak the previous window ended with; returns the one this window ends with."""
    flags = [bool(h["nonfinite"]) for h in history]
    longest, trailing = nonfinite_streaks(flags, streak)
    if not any(flags):
        return trailing
    bad = [int(h["step"]) for h, f in zip(history, flags) if f]
    where = (f"last good checkpoint: {last_ckpt}" if last_ckpt else
             "no checkpoint of this stage yet")
    if cfg.policy == "stop" or longest >= cfg.max_consecutive:
        raise FloatingPointError(
            f"[{stage}] non-finite loss or gradients at step {bad[0]} (of {len(history)} "
            f"steps since the last log, {len(bad)} were non-finite, at most {longest} in a "
            f"row; nonfinite.max_consecutive={cfg.max_consecutive}); the update was not "
            f"applied and the run stops ({where}). Lower the learning rate or check the "
            f"data; nonfinite.policy='skip' goes on past isolated bad steps.")
    logs.log(f"[{stage}] WARNING: skipped {len(bad)} non-finite steps (first {bad[0]})")
    return trailing


def run_stage(run: Run, phase: Phase, params, batch_stats, masks):
    """Trains one phase, resuming from its newest checkpoint if there is one.

    Returns (state, result, speed): the final evaluation, and the training speed of this
    process's part of the phase (None when the phase was already complete)."""
    cfg = run.config
    stage = phase.name
    scfg = cfg[stage]
    specs = run.specs[stage]
    n_train = run.train[1].shape[0]
    spe = n_train // cfg.batch_size
    if spe == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {n_train} training examples")
    total = scfg.epochs * spe
    tx, schedule = stage_optimizer(cfg, phase, spe)
    state = initial_state(run, phase, tx, params, batch_stats, masks)
    mngr = checkpoint.manager(run.workdir, stage, cfg.checkpoint.keep)
    eval_key = jax.random.fold_in(run.key, 100 + phase.index)
    try:
        restored = checkpoint.restore_latest(mngr, state)
        last_ckpt = None
        if restored is not None:
            state, meta, last_ckpt = restored
            if meta.get("complete"):
                logs.log(f"[{stage}] already complete in {mngr.directory}")
                return state, meta["result"], None
            logs.log(f"[{stage}] resuming from step {last_ckpt} of {total}")
        # The records after the restored step are written again below; with no checkpoint
        # (a stage killed before its first one finished) that is all of the stage's.
        run.writer.truncate_after(stage, last_ckpt or 0,
                                  [p.name for p in run.program[phase.index + 1:]])
        warmup = int(round(cfg.attack.warmup_epochs * spe)) if phase.index == 0 else 0
        attack = make_attack(cfg.attack, cfg.setting, warmup, cfg.objective, scfg)
        logs.log(f"[{stage}] training attack: {attack.describe()}")
        train_step = make_train_step(
            run.model, tx, attack, cfg.batch_size, schedule, run.mesh, cfg.attack.loop, cfg.cpu_convolutions,
            cfg.objective, cfg.objective_beta,
            constraints=specs if phase.kind == "retrain" else None,
            quantize_update=scfg.get("quantize_update", "project"),
            augmentation=cfg.data.augment)
        # The model a phase evaluates and ends with: its latent weights on their levels
        # under the straight-through estimator, else the weights themselves.
        ste = (phase.kind == "retrain" and scfg.quantize_update == "ste"
               and admm_lib.quantized_specs(specs))
        on_levels = jax.jit(lambda p, m: admm_lib.onto_levels(p, m, specs)) if ste else (
            lambda p, m: p)
        admm_update = None
        if phase.kind == "admm":
            admm_update = jax.jit(lambda p, s, m: admm_lib.update(
                p, s, specs, scfg.rho_growth, scfg.rho_max, m))

        start = int(state.step)
        progress = logs.Progress(total, cfg.batch_size, start)
        logs.log(f"[{stage}] {scfg.epochs} epochs x {spe} steps, batch {cfg.batch_size}")
        history, result = [], None
        streak = int(state.opt_state.notfinite_count)  # non-finite steps in a row so far
        for step in range(start + 1, total + 1):
            epoch = -(-step // spe)
            state, metrics = train_step(state, *run.train)
            history.append(dict(metrics, step=step))
            if step == start + 1:  # compiled: time the rest apart (one sync per phase)
                jax.block_until_ready(state.step)
                progress.compiled(step)
            if step % cfg.log_every_steps == 0 or step == total:
                history = jax.device_get(history)
                streak = check_nonfinite(stage, history, streak, cfg.nonfinite, last_ckpt)
                m = logs.mean_metrics(history)
                m.pop("step")
                history = []
                speed = progress.update(step)
                run.writer.write(stage=stage, epoch=epoch, step=step, kind="train", **m, **speed,
                                 rho={k: float(v) for k, v in state.admm.rho.items()})
                logs.log(
                    f"[{stage}] epoch {epoch}/{scfg.epochs} step {step}/{total} "
                    f"loss {m['loss']:.4f} acc {m['train_acc']:.3f} lr {m.get('lr', 0):.2e} "
                    f"{speed['img_per_s']:.0f} img/s ETA {logs.fmt_duration(speed['eta_s'])}")
                # At the second interval: the first runs slower while buffers and caches
                # warm up (up to 2x on LeNet-5; benchmarks/NOTES.md).
                if len(progress.rates) == 2 and step < total:
                    logs.log(f"[{stage}] projected: {logs.fmt_duration(speed['eta_s'])} "
                             f"for the {total - step} steps left at "
                             f"{speed['img_per_s']:.0f} img/s (first step, compiling: "
                             f"{progress.compile_s:.1f} s), evaluations not counted")
            if step % spe == 0:  # end of an epoch
                if admm_update is not None and epoch % scfg.update_every_epochs == 0:
                    state = admm_step(run, stage, admm_update, state, epoch, step)
                if epoch % cfg.eval.every_epochs == 0 or epoch == scfg.epochs:
                    result = evaluate(run.eval_step, on_levels(state.params, state.masks),
                                      state.batch_stats, run.test,
                                      cfg.eval.batch_size, jax.random.fold_in(eval_key, epoch))
                    run.writer.write(stage=stage, epoch=epoch, step=step, kind="eval", **result,
                                     adv_attack=eval_attack_label(cfg))
                    logs.log(f"[{stage}] epoch {epoch}: natural {100 * result['nat_acc']:.2f}%"
                             f"  PGD-{cfg.eval.num_steps} {100 * result['adv_acc']:.2f}%")
            if run.preempted and step < total:
                checkpoint.save(mngr, step, state, {"stage": stage, "complete": False})
                mngr.wait_until_finished()
                logs.log(f"[{stage}] SIGTERM: saved a checkpoint at step {step} in "
                         f"{mngr.directory}; rerun the same command to resume")
                raise Preempted(PREEMPTED_EXIT_CODE)
            if step % cfg.checkpoint.every_steps == 0 and step < total:
                checkpoint.save(mngr, step, state, {"stage": stage, "complete": False})
                last_ckpt = step
        if result is None:  # a stage with 0 epochs
            result = evaluate(run.eval_step, on_levels(state.params, state.masks),
                              state.batch_stats, run.test,
                              cfg.eval.batch_size, jax.random.fold_in(eval_key, scfg.epochs))
        state = state.replace(params=on_levels(state.params, state.masks))
        checkpoint.save(mngr, total, state, {"stage": stage, "complete": True, "result": result})
        mngr.wait_until_finished()
        timing = {"img_per_s": progress.median_img_per_s(), "steps": total - start,
                  "first_step_s": progress.compile_s}
        return state, result, timing
    finally:
        mngr.close()


def admm_step(run: Run, stage: str, admm_update, state, epoch: int, step: int):
    """The Z- and U-updates at the end of an ADMM interval, with residuals logged."""
    new_admm, res = admm_update(state.params, state.admm, state.masks)
    res = {k: float(v) for k, v in jax.device_get(res).items()}
    run.writer.write(stage=stage, epoch=epoch, step=step, kind="admm_update", **res,
                     rho={k: float(v) for k, v in new_admm.rho.items()})
    worst = max((v for k, v in res.items() if k.startswith("primal")), default=0.0)
    logs.log(f"[{stage}] ADMM update at epoch {epoch}: max ||W-Z||/||W|| = {worst:.4f}")
    return state.replace(admm=new_admm)


def stage_summary(run: Run, phase: Phase, state, result) -> dict:
    host = jax.device_get(state.params)
    specs = run.specs[phase.name]
    return {
        "kind": phase.kind,
        "rules": phase.rules,
        "nat_acc": result["nat_acc"],
        "adv_acc": result["adv_acc"],
        "adv_attack": eval_attack_label(run.config),
        "compression_rate": compression(host, specs),
        "sparsity": projections.sparsity_report(host, jax.device_get(state.masks)),
        # Stored at the bit widths of the phase's rules once they hold (retrain).
        "size": projections.model_size(host, specs if phase.kind == "retrain" else {}),
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


@contextlib.contextmanager
def sigterm_flag():
    """Yields a list that holds the signal number once SIGTERM arrives (main thread only)."""
    flag = []
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.append(signum))
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def previous_stage_result(workdir: str, stage: str, prev: str, like):
    """(params, batch_stats, masks) of the finished phase `prev`, the one before `stage`."""
    mngr = checkpoint.manager(workdir, prev)
    try:
        restored = None
        if mngr.all_steps():
            restored = checkpoint.restore_latest(mngr, like)
    finally:
        mngr.close()
    if restored is None or not restored[1].get("complete"):
        raise FileNotFoundError(
            f"stage {stage!r} needs the result of stage {prev!r}, but "
            f"{checkpoint.stage_dir(workdir, prev)} holds no finished {prev!r} stage: run "
            f"{prev!r} in this workdir first (e.g. --config.stages={prev},{stage})")
    logs.log(f"loaded the result of stage {prev!r} from {checkpoint.stage_dir(workdir, prev)}")
    state = restored[0]
    return state.params, state.batch_stats, state.masks


def train_and_evaluate(config, workdir: str, allow_config_change: bool = False) -> dict:
    """Runs the configured stages in `workdir`; returns the summary (also summary.json)."""
    program, phases = validate_config(config)
    mesh = parallel.make_mesh()
    os.makedirs(workdir, exist_ok=True)
    check_workdir_config(workdir, config, allow_config_change)
    t_start = time.time()
    ds, train, test = load_data(config)
    logs.log(data.describe(ds))
    logs.write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

    model = get_model(config.model.name, ds.num_classes, config.model.width,
                      config.model.dtype)
    input_shape = (1,) + train.images.shape[1:]
    key = jax.random.PRNGKey(config.seed)
    params, batch_stats = initialization.initial_variables(config, model, input_shape)
    specs = phase_specs(config, program, params, ds.num_classes, input_shape)

    eval_attack = make_eval_attack(config)
    masks = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, bool), params)
    if config.init.inherit_from and phases[0].index == 0:
        params, batch_stats, masks = initialization.inherited(config, model, input_shape,
                                                              params)
    summary_path = os.path.join(workdir, "summary.json")
    summary = {"stages": {}}
    if os.path.exists(summary_path):  # keep the results of phases run earlier
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
    summary["program"] = [p.name for p in program]

    with sigterm_flag() as preempted:
        run = Run(config=config, workdir=workdir, model=model, mesh=mesh,
                  train=parallel.replicate((train.images, train.labels), mesh),
                  test=pad_to_multiple(test.images, test.labels, config.eval.batch_size, mesh),
                  program=program, specs=specs,
                  eval_step=make_eval_step(model, eval_attack, mesh, config.attack.loop,
                                           config.cpu_convolutions),
                  writer=logs.MetricsWriter(workdir), key=key, preempted=preempted)
        if phases[0].index > 0:
            prev = program[phases[0].index - 1]
            like = initial_state(run, prev, stage_optimizer(config, prev, 1)[0], params,
                                 batch_stats, masks)
            params, batch_stats, masks = previous_stage_result(workdir, phases[0].name,
                                                               prev.name, like)
        for phase in phases:
            state, result, speed = run_stage(run, phase, params, batch_stats, masks)
            params, batch_stats, masks = state.params, state.batch_stats, state.masks
            earlier = summary["stages"].get(phase.name, {}).get("speed")
            summary["stages"][phase.name] = dict(stage_summary(run, phase, state, result),
                                                 speed=speed or earlier)
            # In program order, whatever order earlier runs wrote them in.
            summary["stages"] = {p.name: summary["stages"][p.name] for p in program
                                 if p.name in summary["stages"]}
            logs.write_json(summary_path, summary)
    stages = [p.name for p in phases]
    run.writer.write(kind="done", stages=stages, wall_time_s=time.time() - t_start)
    logs.log(logs.summary_table(summary))
    logs.log(f"done in {logs.fmt_duration(time.time() - t_start)}; outputs in {workdir}")
    return summary


FLAGS = flags.FLAGS


def define_flags():
    """The command line's flags; defined by the entry point only, so that importing this
    module (for its functions) defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mnist.py:cpu.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the summary.")
    flags.DEFINE_bool("allow_config_change", False,
                      "Continue a workdir whose config.json differs from this config.")
    flags.DEFINE_enum("host_malloc", "auto", list(host_memory.MODES),
                      "'reuse': keep freed host memory for XLA's per-call buffers (glibc; "
                      "about 10% faster CPU steps for VGG-16 and ResNet-18, the process keeps "
                      "its peak memory); 'system': the C library's defaults; 'auto': reuse "
                      "for the CIFAR models, system for the others "
                      "(see robust_admm/host_memory.py).")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (orbax) off the console
    malloc_note = host_memory.configure(  # before any thread starts
        host_memory.resolve(FLAGS.host_malloc, FLAGS.config.model.name))
    parallel.initialize_distributed()  # multi-host runs (launch.sh tpu/slurm); before any JAX use
    logs.log(malloc_note)
    logs.exit_on_error(train_and_evaluate, FLAGS.config, FLAGS.workdir,
                       FLAGS.allow_config_change, errors=(checkpoint.CheckpointError,))


if __name__ == "__main__":
    define_flags()
    app.run(main)
