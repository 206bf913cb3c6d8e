"""The loop that runs one phase of a program: compiled steps, ADMM updates at interval
ends, evaluations, logs with img/s and ETA, the non-finite policy, checkpoints (resumed
bit for bit) and SIGTERM. Where checkpoints and metrics go is given to it (`Run`)."""
import contextlib
import dataclasses
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robust_admm.compression import admm as admm_lib
from robust_admm.compression import size, transforms
from robust_admm.evaluation.eval_step import (EvaluationInterrupted, attack_schedule,
                                              eval_attack_label, evaluate)
from robust_admm.runtime import checkpoint, logs, parallel
from robust_admm.training import legacy, optim
from robust_admm.training.attack import make_attack
from robust_admm.training.program import Phase
from robust_admm.training.state import TrainState
from robust_admm.training.step import make_train_step

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, as a process killed by it


class Preempted(SystemExit):
    """SIGTERM arrived: a checkpoint was saved; the run exits with a non-zero status."""


@dataclasses.dataclass
class Run:
    """What every stage needs: built once per run."""
    config: object
    checkpoint_dirs: dict  # phase name -> the folder of its checkpoints
    model: object
    mesh: object  # jax.sharding.Mesh with one `data` axis over all devices
    train: object  # data.feed.DeviceFeed | StreamFeed: what each step is given
    test: object  # data.feed.DeviceTest | StreamTest: the evaluation's batches
    program: list  # every phase of the program (program.Phase), in order
    specs: dict  # phase name -> {leaf path: projection spec}
    eval_step: object
    writer: logs.MetricsWriter
    key: jax.Array
    preempted: list  # set to [signal number] by the SIGTERM handler
    # The natural-only evaluation (make_eval_step without an attack) of the evaluations
    # before a phase's end where eval.adversarial resolves to 'phase_end' (None: the
    # natural counts of `eval_step`, which attacks too).
    natural_eval_step: object = None


def data_seed(seed: int, phase_index: int) -> int:
    """The seed of a phase's streamed record order and crops: apart for each (run seed,
    phase), as the on-device feed's key is fold_in(run key, phase)."""
    return int(np.random.SeedSequence([seed, phase_index]).generate_state(1)[0])


def compression(params, specs) -> dict:
    """Compression rates (dense size / nonzeros) over all weights and the compressed leaves."""
    return {"all": size.compression_rate(params),
            "pruned": size.compression_rate(params, rules=specs) if specs else 1.0}


def initial_state(run: Run, phase: Phase, steps_per_epoch: int, params, batch_stats, masks):
    """(state, tx, schedule) a phase starts from, given the previous phase's result: its
    transformation (`phase_transformation`) initialised on it; an admm phase starts its Z,
    U (within the masks so far), a retrain phase projects onto its rules."""
    specs = run.specs[phase.name]
    if phase.kind == "admm" and run.config.prune.masked_progressive:
        masks = admm_lib.freeze_zeros(params, masks, specs)
    tx, schedule = phase_transformation(run.config, phase, steps_per_epoch, specs, masks)
    opt_state = tx.init(params)
    if phase.kind == "retrain":  # the projection `retrain_phase`'s init made
        params = transforms.project(params, specs, is_compressible=_resolved(specs),
                                    masks=masks)
        masks = transforms.retrain_masks(opt_state)
    # The state's masks and the transformation's are the same values in buffers of their
    # own: the step donates the state, and one buffer may be donated only once.
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=opt_state, masks=jax.tree_util.tree_map(jnp.copy, masks),
                       key=jax.random.fold_in(run.key, phase.index))
    return parallel.replicate(state, run.mesh), tx, schedule


def _resolved(specs):
    """The leaves the run's rules resolved to (`specs`), as the transformations' predicate."""
    return lambda path, leaf: path in specs


def phase_transformation(cfg, phase: Phase, steps_per_epoch: int, specs, masks):
    """(tx, schedule) of a phase: its optimizer (`optim`) under optax.apply_if_finite (the
    policy on how long to go on is enforced by the loop, so the wrapper never gives up),
    wrapped in the public compression transformations: `admm_phase` (Z/U updated after
    every update_every_epochs epochs) or `retrain_phase` (on the sets), both within
    `masks`."""
    pcfg = cfg[phase.name]
    period = pcfg.update_every_epochs if phase.kind == "admm" else None
    schedule = optim.make_schedule(pcfg, steps_per_epoch, period)
    tx = optax.apply_if_finite(optim.make_optimizer(pcfg, schedule),
                               max_consecutive_errors=2**30)
    if phase.kind == "admm":
        tx = transforms.admm_phase(
            tx, specs, update_every=steps_per_epoch * pcfg.update_every_epochs, rho=pcfg.rho,
            rho_growth=pcfg.rho_growth, rho_max=pcfg.rho_max,
            is_compressible=_resolved(specs), masks=masks)
    elif phase.kind == "retrain":
        tx = transforms.retrain_phase(tx, specs,
                                      quantize_update=pcfg.get("quantize_update", "project"),
                                      is_compressible=_resolved(specs), masks=masks)
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
    t_phase = time.perf_counter()
    cfg = run.config
    stage = phase.name
    scfg = cfg[stage]
    specs = run.specs[stage]
    n_train = run.train.num_records
    spe = n_train // cfg.batch_size
    if spe == 0:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {n_train} training examples")
    total = scfg.epochs * spe
    state, tx, schedule = initial_state(run, phase, spe, params, batch_stats, masks)
    mngr = checkpoint.manager(run.checkpoint_dirs[stage], cfg.checkpoint.keep)
    feed = None
    try:
        restored = checkpoint.restore_latest(mngr, state, older=legacy.layouts(state))
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
            augmentation=cfg.data.augment, feed=run.train.kind,
            label_smoothing=cfg.label_smoothing, mixup_alpha=cfg.mixup_alpha)
        # The model a phase evaluates and ends with: its latent weights on their levels
        # under the straight-through estimator, else the weights themselves.
        ste = (phase.kind == "retrain" and scfg.quantize_update == "ste"
               and admm_lib.quantized_specs(specs))
        on_levels = jax.jit(lambda p, m: admm_lib.onto_levels(p, m, specs)) if ste else (
            lambda p, m: p)

        start = int(state.step)
        progress = logs.Progress(total, cfg.batch_size, start)
        logs.log(f"[{stage}] {scfg.epochs} epochs x {spe} steps, batch {cfg.batch_size}")
        history, result = [], None
        evals = Evaluations(run, stage, jax.random.fold_in(run.key, 100 + phase.index))
        if restored is not None and meta.get("eval_pending") is not None:
            # Stopped by SIGTERM during the evaluation at the restored step: it runs first.
            pending = meta["eval_pending"]
            result = phase_evaluation(run, phase, mngr, state, on_levels, evals, pending,
                                      last_ckpt, final=pending == scfg.epochs,
                                      record=total > 0, saved=True)
        # Non-finite steps in a row so far.
        streak = int(transforms.find_state(state.opt_state, optax.ApplyIfFiniteState,
                                           "optax.apply_if_finite").notfinite_count)
        # The feed keeps its own copy of the key: the step donates the state's buffers.
        feed = run.train.steps(data_seed(cfg.seed, phase.index), start, total - start,
                               key=jnp.copy(state.key))
        for step in range(start + 1, total + 1):
            epoch = -(-step // spe)
            t_fetch = time.perf_counter()
            given = next(feed)
            progress.waited(time.perf_counter() - t_fetch)
            state, metrics = train_step(state, given.data)
            for where in given.bad:
                logs.log_any(f"[{stage}] step {step}: skipped an unreadable image "
                             f"(data.bad_images='skip'): {where}")
            history.append(dict(metrics, step=step))
            if step == start + 1:  # compiled: time the rest apart (one sync per phase)
                jax.block_until_ready(state.step)
                progress.compiled(step)
            if step % cfg.log_every_steps == 0 or step == total:
                history = jax.device_get(history)
                streak = check_nonfinite(stage, history, streak, cfg.nonfinite, last_ckpt)
                m = logs.mean_metrics(history)
                m.pop("step")
                if "skipped" in m:  # a count over the window, not a mean
                    m["skipped"] = int(sum(h["skipped"] for h in history))
                history = []
                speed = progress.update(step)
                admm_state = transforms.admm_state(state.opt_state)
                rho = {} if admm_state is None else jax.device_get(admm_state.rho)
                run.writer.write(stage=stage, epoch=epoch, step=step, kind="train", **m, **speed,
                                 rho={k: float(v) for k, v in rho.items()})
                logs.log(
                    f"[{stage}] epoch {epoch}/{scfg.epochs} step {step}/{total} "
                    f"loss {m['loss']:.4f} acc {m['train_acc']:.3f} lr {m.get('lr', 0):.2e} "
                    f"{speed['img_per_s']:.0f} img/s ETA {logs.fmt_duration(speed['eta_s'])}"
                    + (f" (input wait {100 * speed['input_wait_share']:.0f}%)"
                       if run.train.kind == "stream" else ""))
                # At the second interval: the first runs slower while buffers and caches
                # warm up (up to 2x on LeNet-5; benchmarks/NOTES.md).
                if len(progress.rates) == 2 and step < total:
                    logs.log(f"[{stage}] projected: {logs.fmt_duration(speed['eta_s'])} "
                             f"for the {total - step} steps left at "
                             f"{speed['img_per_s']:.0f} img/s (first step, compiling: "
                             f"{progress.compile_s:.1f} s), evaluations not counted")
            if step % spe == 0:  # end of an epoch
                if phase.kind == "admm" and epoch % scfg.update_every_epochs == 0:
                    log_admm_update(run, stage, state, epoch, step)
                if epoch % cfg.eval.every_epochs == 0 or epoch == scfg.epochs:
                    result = phase_evaluation(run, phase, mngr, state, on_levels, evals,
                                              epoch, step, final=epoch == scfg.epochs)
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
            result = phase_evaluation(run, phase, mngr, state, on_levels, evals,
                                      scfg.epochs, total, final=True, record=False,
                                      saved=last_ckpt == total)
        # Recorded before the phase is marked complete: a run killed in between reruns
        # the phase's end from its last checkpoint and writes the record again.
        shares = evals.share(total, time.perf_counter() - t_phase)
        state = state.replace(params=on_levels(state.params, state.masks))
        if last_ckpt == total:  # the one SIGTERM left during the last evaluation
            mngr.delete(total)
        checkpoint.save(mngr, total, state, {"stage": stage, "complete": True, "result": result})
        mngr.wait_until_finished()
        timing = {"img_per_s": progress.median_img_per_s(), "steps": total - start,
                  "first_step_s": progress.compile_s, **shares}
        return state, result, timing
    finally:
        if feed is not None:
            feed.close()  # stops a streamed reader (its threads, its worker processes)
        mngr.close()


def phase_evaluation(run: Run, phase: Phase, mngr, state, on_levels, evals, epoch: int,
                     step: int, final: bool, record: bool = True, saved: bool = False) -> dict:
    """The phase's evaluation at `epoch` (`Evaluations.at`). SIGTERM is honoured between
    its batches: a checkpoint at `step` (unless `saved`: the one resumed from) notes the
    evaluation as pending, so the resumed phase runs it first, and Preempted."""
    stage = phase.name
    try:
        return evals.at(on_levels(state.params, state.masks), state.batch_stats, epoch, step,
                        final, record=record, stop=lambda: bool(run.preempted))
    except EvaluationInterrupted as e:
        if not saved:
            checkpoint.save(mngr, step, state, {"stage": stage, "complete": False,
                                                "eval_pending": epoch})
            mngr.wait_until_finished()
        logs.log(f"[{stage}] SIGTERM during the evaluation of epoch {epoch} (after {e.done} "
                 f"batch(es)): saved a checkpoint at step {step} in {mngr.directory}; rerun "
                 f"the same command to resume (the evaluation runs again first)")
        raise Preempted(PREEMPTED_EXIT_CODE) from None


class Evaluations:
    """A phase's evaluations during training, and the time they take: each before the
    phase's end on `eval.n` examples, natural only where eval.adversarial resolves to
    'phase_end'; the one at the end on the whole split, under the configured attack.
    Evaluation at epoch e is keyed by fold_in(key, e), whichever examples it reads."""

    def __init__(self, run: Run, stage: str, key):
        cfg = run.config
        self.run, self.stage, self.key, self.seconds = run, stage, key, 0.0
        self.batch_size = cfg.eval.batch_size
        self.attack_before_end = attack_schedule(cfg) == "every_eval"
        self.label = eval_attack_label(cfg)
        self.subset = run.test.subset(cfg.eval.n, self.batch_size) if cfg.eval.n else run.test

    def at(self, params, batch_stats, epoch: int, step: int, final: bool,
           record: bool = True, stop=None) -> dict:
        """Evaluates, logs the accuracy line and (with `record`) writes the metrics record;
        returns the result (`adv_acc` only where the attack ran)."""
        t0 = time.perf_counter()
        attack = final or self.attack_before_end
        eval_step = self.run.eval_step if attack or self.run.natural_eval_step is None else (
            self.run.natural_eval_step)
        test = self.run.test if final else self.subset
        result = evaluate(eval_step, params, batch_stats, test.batches(self.batch_size),
                          jax.random.fold_in(self.key, epoch), stop=stop)
        if not attack:  # a natural-only evaluation reports no robust accuracy
            result = {k: v for k, v in result.items() if not k.startswith("adv_")}
        self.seconds += time.perf_counter() - t0
        named = {"adv_attack": self.label} if "adv_acc" in result else {}
        if record:
            self.run.writer.write(stage=self.stage, epoch=epoch, step=step, kind="eval",
                                  **result, **named)
            subset = not final and self.subset is not self.run.test
            logs.log(f"[{self.stage}] epoch {epoch}: {accuracy_line(result, self.label)}"
                     + (f" ({result['eval_examples']} test examples)" if subset else ""))
        return result

    def share(self, step: int, wall_s: float) -> dict:
        """Logs and records the share of the phase's wall time so far (this process's part
        of it, compiling and checkpoints included) spent evaluating; returns it."""
        out = {"eval_s": self.seconds, "wall_s": wall_s,
               "eval_share": self.seconds / wall_s if wall_s > 0 else 0.0}
        self.run.writer.write(stage=self.stage, step=step, kind="eval_time", **out)
        logs.log(f"[{self.stage}] evaluation took {self.seconds:.1f} s of {wall_s:.1f} s "
                 f"({100 * out['eval_share']:.0f}%)")
        return out


def accuracy_line(result: dict, label: str | None) -> str:
    """'natural 91.20%  PGD-20 45.10%' (and the top-5 figures where measured); the natural
    figures only where no attack ran (`label`: eval_attack_label, None for no attack)."""
    attack = label.split(" (")[0] if label else None
    line = f"natural {100 * result['nat_acc']:.2f}%"
    if attack and "adv_acc" in result:
        line += f"  {attack} {100 * result['adv_acc']:.2f}%"
    if "nat_top5" in result:
        line += f"  (top-5: natural {100 * result['nat_top5']:.2f}%"
        if attack and "adv_top5" in result:
            line += f"  {attack} {100 * result['adv_top5']:.2f}%"
        line += ")"
    return line


def log_admm_update(run: Run, stage: str, state, epoch: int, step: int):
    """Records and logs the Z- and U-update the step that ended an ADMM interval made
    (inside `admm_phase`'s update): its residuals and the new rho."""
    found = transforms.find_state(state.opt_state, transforms.AdmmOptState, "admm_phase")
    res, rho = jax.device_get((found.residuals, found.admm.rho))
    res = {k: float(v) for k, v in res.items()}
    run.writer.write(stage=stage, epoch=epoch, step=step, kind="admm_update", **res,
                     rho={k: float(v) for k, v in rho.items()})
    worst = max((v for k, v in res.items() if k.startswith("primal")), default=0.0)
    logs.log(f"[{stage}] ADMM update at epoch {epoch}: max ||W-Z||/||W|| = {worst:.4f}")


def stage_summary(run: Run, phase: Phase, state, result) -> dict:
    host = jax.device_get(state.params)
    specs = run.specs[phase.name]
    return {
        "kind": phase.kind,
        "rules": phase.rules,
        "nat_acc": result["nat_acc"],
        # Under the attack it names; neither where the evaluation ran none.
        **({"adv_acc": result["adv_acc"], "adv_attack": eval_attack_label(run.config)}
           if "adv_acc" in result else {}),
        **{k: result[k] for k in ("nat_top5", "adv_top5") if k in result},
        "compression_rate": compression(host, specs),
        "sparsity": size.sparsity_report(host, jax.device_get(state.masks)),
        # Stored at the bit widths of the phase's rules once they hold (retrain).
        "size": size.model_size(host, specs if phase.kind == "retrain" else {}),
    }


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


def previous_stage_result(run: Run, stage: str, prev: str, like):
    """(params, batch_stats, masks) of the finished phase `prev`, the one before `stage`."""
    folder = run.checkpoint_dirs[prev]
    mngr = checkpoint.manager(folder)
    try:
        restored = None
        if mngr.all_steps():
            restored = checkpoint.restore_latest(mngr, like, older=legacy.layouts(like))
    finally:
        mngr.close()
    if restored is None or not restored[1].get("complete"):
        raise FileNotFoundError(
            f"stage {stage!r} needs the result of stage {prev!r}, but {folder} holds no "
            f"finished {prev!r} stage: run {prev!r} in this workdir first "
            f"(e.g. --config.stages={prev},{stage})")
    logs.log(f"loaded the result of stage {prev!r} from {folder}")
    state = restored[0]
    return state.params, state.batch_stats, state.masks
