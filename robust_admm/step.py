"""The train state and the compiled steps.

The `train_step` does, for one batch: pick the batch from the on-device dataset (a
permutation per epoch, derived from the state's key, so the data position is just the
step), PGD inner maximisation, the adversarial loss plus the ADMM penalty, gradients,
gradient masking, the optax update and re-masking of the weights. On GPU and TPU that is
one compiled program with the PGD loop as a `lax.fori_loop`; on CPU, where XLA runs
rolled loop bodies 3-4x slower, the PGD steps are separate compiled calls dispatched from
the host without waiting for their results (`resolve_pgd_loop`). Both forms are tested
to give the same results.

BatchNorm during the attack: the attack's forward passes use the batch statistics of the
perturbed batch without updating the running averages; only the training forward pass
updates them.
"""
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from robust_admm import admm as admm_lib
from robust_admm import attacks, augment, compiler, objectives, parallel


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: steps taken in the current stage
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    opt_state: Any
    masks: Any  # bool tree with the params' structure; False = pruned, stays zero
    admm: admm_lib.AdmmState  # empty outside the admm stage
    key: jnp.ndarray  # the run's PRNG key; per-step keys are fold_in(key, step)


def to_pixels(images_u8: jnp.ndarray) -> jnp.ndarray:
    """uint8 NHWC -> float32 in [0, 1]."""
    return images_u8.astype(jnp.float32) / 255.0


def apply_model(model, params, batch_stats, x, train: bool):
    """Logits and the updated batch statistics (unchanged when there are none)."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, new["batch_stats"]
        return model.apply(variables, x, train=False), batch_stats
    return model.apply(variables, x, train=train), batch_stats


def attack_logits_fn(model, params, batch_stats) -> Callable:
    """Logits as the attack sees them: batch statistics, running averages untouched."""
    return lambda x: apply_model(model, params, batch_stats, x, train=True)[0]


PGD_LOOPS = ("auto", "fori", "host")


def resolve_pgd_loop(loop: str, backend: str | None = None) -> str:
    """'fori' (the whole PGD loop inside the compiled step) or 'host' (one compiled call
    per PGD step, dispatched asynchronously: no host sync). 'auto' is 'host' on CPU, where
    XLA runs rolled loop bodies 3-4x slower, and 'fori' on GPU and TPU."""
    if loop not in PGD_LOOPS:
        raise ValueError(f"attack.loop={loop!r}; allowed: {PGD_LOOPS}")
    if loop != "auto":
        return loop
    return "host" if (backend or jax.default_backend()) == "cpu" else "fori"


@dataclasses.dataclass(frozen=True)
class TrainAttack:
    """The training attack: any attack of `robust_admm.attacks` (None in the natural
    setting; one run, no restarts) whose epsilon and step sizes ramp linearly from 0 to
    their configured values over the first `warmup_steps` steps of the stage (adversarial
    training from scratch at full epsilon can sit at chance level for a long time)."""

    attack: attacks.Attack | None
    warmup_steps: int = 0

    def __post_init__(self):
        if self.attack is not None and self.attack.restarts != 1:
            raise ValueError(f"a training attack runs once: restarts={self.attack.restarts}")

    def scale(self, step):
        if self.warmup_steps <= 0:
            return jnp.float32(1.0)
        return jnp.minimum(1.0, (step + 1) / self.warmup_steps).astype(jnp.float32)

    @property
    def num_steps(self) -> int:
        return 0 if self.attack is None or self.attack.is_identity else self.attack.num_steps

    def describe(self) -> str:
        """In words, for the log: 'PGD-10 (eps 0.3, step 0.05)' or 'none'."""
        a = self.attack
        if a is None:
            return "none"
        return f"PGD-{a.num_steps} (eps {a.epsilon:g}, step {a.step_size:g})"


def make_attack(attack_cfg, setting: str, warmup_steps: int = 0,
                objective: str = "pgd_at", phase_cfg=None) -> TrainAttack:
    """The training attack for the setting ('natural' = no attack) and the objective
    (TRADES's attack ascends the KL to the clean prediction from a small Gaussian start);
    a phase's `attack_steps` / `attack_step_size`, where set, replace `attack_cfg`'s."""
    if setting not in ("adversarial", "natural"):
        raise ValueError(f"setting={setting!r}; allowed: 'adversarial', 'natural'")
    if setting == "natural" or objective == "natural":
        return TrainAttack(None)
    obj = objectives.get(objective)
    num_steps, step_size = attack_cfg.num_steps, attack_cfg.step_size
    if phase_cfg is not None:
        if phase_cfg.get("attack_steps") is not None:
            num_steps = phase_cfg.attack_steps
        if phase_cfg.get("attack_step_size") is not None:
            step_size = phase_cfg.attack_step_size
    return TrainAttack(attacks.Pgd(
        epsilon=attack_cfg.epsilon, step_size=step_size,
        num_steps=num_steps, random_start=attack_cfg.random_start,
        loss=obj.attack_loss or attack_cfg.loss, unroll=attack_cfg.unroll,
        start_std=obj.attack_start_std), warmup_steps)


def batch_indices(key, step, num_examples: int, batch_size: int):
    """Indices of batch `step`: epoch e uses permutation(fold_in(key, e)), batches in order,
    the last partial batch dropped. Pure in (key, step), so resuming needs only the step."""
    steps_per_epoch = num_examples // batch_size
    epoch, i = step // steps_per_epoch, step % steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)


class CompiledStep:
    """A step made of compiled parts: one part ('fori') or, with the host-driven PGD loop,
    a few parts called in sequence without waiting for results. `compilations()` counts
    the programs compiled so far (one per part once warm: nothing recompiles)."""

    def __init__(self, fn: Callable, parts: Sequence):
        self._fn, self.parts = fn, tuple(parts)

    def __call__(self, *args):
        return self._fn(*args)

    def compilations(self) -> int:
        return sum(p._cache_size() for p in self.parts)


def make_train_step(model, tx: optax.GradientTransformation, attack: TrainAttack,
                    batch_size: int, schedule: Callable | None = None,
                    mesh: Mesh | None = None, pgd_loop: str = "auto",
                    cpu_convolutions: str = "auto", objective: str = "pgd_at",
                    beta: float = 6.0, constraints: admm_lib.Specs | None = None,
                    quantize_update: str = "project",
                    augmentation: str = "none") -> CompiledStep:
    """Builds `train_step(state, images_u8, labels) -> (state, metrics)`.

    `images_u8`/`labels` are the whole training split on the device (replicated); the state
    is donated. With a `mesh`, the batch is split along its `data` axis and the state stays
    replicated: XLA inserts the gradient all-reduce, and BatchNorm statistics are global.
    `pgd_loop` ('auto', 'fori', 'host'; see `resolve_pgd_loop`) and `cpu_convolutions`
    (see `robust_admm.compiler`) only change speed. `objective` (`robust_admm.objectives`)
    is the loss at the attack's point; TRADES and MART also take a clean forward pass
    (BatchNorm statistics updated by the clean pass, then by the adversarial one).
    After each update the masks are applied, and `constraints` (a retrain phase's specs)
    keep quantized leaves on their levels: projected after each update ('project') or
    latent weights with the model, attack included, run on their levels ('ste'); see
    `admm.keep_constraints` and `admm.straight_through`. `augmentation`
    (`robust_admm.augment`) transforms each batch with a key of (state key, step).
    """
    constraints = constraints or {}
    if augmentation not in augment.AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation!r}; allowed: {augment.AUGMENTATIONS}")
    if quantize_update not in admm_lib.QUANTIZE_UPDATES:
        raise ValueError(f"quantize_update={quantize_update!r}; allowed: "
                         f"{admm_lib.QUANTIZE_UPDATES}")
    ste = quantize_update == "ste" and bool(admm_lib.quantized_specs(constraints))

    def levels(state: TrainState):
        """Under STE the weights the model runs on, computed once per step (one projection
        of each quantized leaf); None otherwise (the model runs on `state.params`)."""
        return admm_lib.onto_levels(state.params, state.masks, constraints) if ste else None

    def runs_on(state: TrainState, q):
        return state.params if q is None else q

    obj = objectives.get(objective)
    two_passes = obj.needs_clean and attack.attack is not None
    data_key_tag, attack_key_tag, augment_key_tag = 0, 1, 2
    shard = _batch_constraint(mesh)
    adv = attack.attack
    jit = _jit_with_options(cpu_convolutions)
    state_out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}

    def begin(state: TrainState, images_u8, labels, q):
        """The batch and the attack's initial state (None without an attack); `q` as
        `levels` gives it."""
        key = jax.random.fold_in(state.key, data_key_tag)
        idx = batch_indices(key, state.step, labels.shape[0], batch_size)
        images = images_u8[idx]
        if augmentation != "none":
            images = augment.augment(augmentation, images, jax.random.fold_in(
                jax.random.fold_in(state.key, augment_key_tag), state.step))
        x = shard(to_pixels(images))
        y = shard(labels[idx])
        if attack.num_steps == 0:
            return x, y, None
        attack_key = jax.random.fold_in(jax.random.fold_in(state.key, attack_key_tag),
                                        state.step)
        logits_fn = attack_logits_fn(model, runs_on(state, q), state.batch_stats)
        return x, y, shard_state(adv.init(logits_fn, x, y, attack_key, 0,
                                          attack.scale(state.step)))

    def attack_step(params, batch_stats, attack_state, x, y):
        return adv.step(attack_logits_fn(model, params, batch_stats), attack_state, x, y)

    def update(state: TrainState, attack_state, x, y, q):
        """The attack's result, the training pass on it and the optimizer update."""
        x_adv = x if attack_state is None else adv.finish(
            attack_logits_fn(model, runs_on(state, q), state.batch_stats), attack_state, x, y)
        x_adv = jax.lax.stop_gradient(x_adv)

        def loss_fn(params):
            if q is not None:
                params = admm_lib.straight_through(params, q)
            stats = state.batch_stats
            if two_passes:
                clean_logits, stats = apply_model(model, params, stats, x, True)
            logits, new_stats = apply_model(model, params, stats, x_adv, True)
            ce = obj.loss(clean_logits if two_passes else logits, logits, y, beta)
            pen = admm_lib.penalty(params, state.admm)
            return ce + pen, (ce, pen, logits, new_stats)

        grads, (ce, pen, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, state.masks)
        grad_norm = optax.tree.norm(grads)
        # `tx` is wrapped in optax.apply_if_finite, which drops non-finite updates; the
        # BatchNorm statistics of such a step are dropped here too.
        finite = jnp.isfinite(ce + pen) & jnp.isfinite(grad_norm)
        new_stats = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_stats,
                                           state.batch_stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params = admm_lib.keep_constraints(params, state.masks, constraints, quantize_update)
        metrics = {
            "loss": ce + pen,
            "ce": ce,
            "admm_penalty": pen,
            "train_acc": (logits.argmax(-1) == y).mean(),
            "grad_norm": grad_norm,
            "nonfinite": (~finite).astype(jnp.int32),
        }
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    def shard_state(tree):
        return jax.tree_util.tree_map(lambda a: shard(a) if a.ndim else a, tree)

    if resolve_pgd_loop(pgd_loop) == "fori" or attack.num_steps == 0:
        def train_step(state: TrainState, images_u8, labels):
            q = levels(state)
            x, y, attack_state = begin(state, images_u8, labels, q)
            if attack.num_steps:
                attack_state = attacks.run_steps(
                    adv, attack_logits_fn(model, runs_on(state, q), state.batch_stats),
                    attack_state, x, y)
            return update(state, attack_state, x, y, q)

        step = jit(train_step, donate_argnums=(0,), **state_out)
        return CompiledStep(step, [step])

    begin_c = jit(begin)
    attack_step_c = jit(attack_step, donate_argnums=(2,))
    update_c = jit(update, donate_argnums=(0,), **state_out)
    levels_c = jit(levels)

    def host_train_step(state: TrainState, images_u8, labels):
        q = levels_c(state) if ste else None
        x, y, attack_state = begin_c(state, images_u8, labels, q)
        for _ in range(attack.num_steps):
            attack_state = attack_step_c(runs_on(state, q), state.batch_stats, attack_state,
                                         x, y)
        return update_c(state, attack_state, x, y, q)

    return CompiledStep(host_train_step, [begin_c, attack_step_c, update_c]
                        + ([levels_c] if ste else []))


def _jit_with_options(cpu_convolutions: str) -> Callable:
    """`jax.jit` with this backend's compiler options (see `robust_admm.compiler`)."""
    return functools.partial(jax.jit,
                             compiler_options=compiler.compiler_options(cpu_convolutions))


def _batch_constraint(mesh: Mesh | None):
    """x -> x constrained to be split along the mesh's `data` axis (identity without one)."""
    if mesh is None:
        return lambda x: x
    return lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))


def make_eval_step(model, eval_attack: attacks.Attack, mesh: Mesh | None = None,
                   pgd_loop: str = "auto", cpu_convolutions: str = "auto") -> CompiledStep:
    """`eval_step(params, batch_stats, images_u8, labels, valid, key)` -> (natural correct,
    adversarial correct) counts over the valid entries of one batch, under any attack of
    `robust_admm.attacks`. Evaluation uses the running BatchNorm averages (train=False)
    for the attack too; no weight gradients."""
    shard = _batch_constraint(mesh)
    jit = _jit_with_options(cpu_convolutions)
    out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
    apply = lambda model_args, xa: apply_model(model, *model_args, xa, train=False)[0]

    def count(model_args, x, y, valid):
        return ((apply(model_args, x).argmax(-1) == y) & valid).sum()

    def prepare(images_u8, labels, valid):
        return shard(to_pixels(images_u8)), shard(labels), shard(valid)

    if resolve_pgd_loop(pgd_loop) == "fori" or eval_attack.is_identity:
        def eval_step(params, batch_stats, images_u8, labels, valid, key):
            m = (params, batch_stats)
            x, y, valid = prepare(images_u8, labels, valid)
            x_adv = attacks.run(eval_attack, functools.partial(apply, m), x, y, key)
            return count(m, x, y, valid), count(m, x_adv, y, valid)

        step = jit(eval_step, **out)
        return CompiledStep(step, [step])

    def begin(model_args, images_u8, labels, valid):
        x, y, valid = prepare(images_u8, labels, valid)
        return x, y, valid, count(model_args, x, y, valid)

    begin_c = jit(begin)  # the batch stays split along the mesh
    runner = attacks.HostRunner(eval_attack, apply, jit, shard)
    count_c = jit(count, **out)

    def host_eval_step(params, batch_stats, images_u8, labels, valid, key):
        m = (params, batch_stats)
        x, y, valid, nat = begin_c(m, images_u8, labels, valid)
        return nat, count_c(m, runner(m, x, y, key), y, valid)

    return CompiledStep(host_eval_step, [begin_c, *runner.parts, count_c])
