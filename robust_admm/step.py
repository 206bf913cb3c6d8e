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
from robust_admm import attacks, compiler, parallel


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
    """The training attack: a `Pgd` (None in the natural setting) whose epsilon and step
    size ramp linearly from 0 to their configured values over the first `warmup_steps`
    steps of the stage (adversarial training from scratch at full epsilon can sit at
    chance level for a long time)."""

    pgd: attacks.Pgd | None
    warmup_steps: int = 0

    def scale(self, step):
        if self.warmup_steps <= 0:
            return jnp.float32(1.0)
        return jnp.minimum(1.0, (step + 1) / self.warmup_steps).astype(jnp.float32)

    @property
    def num_steps(self) -> int:
        return 0 if self.pgd is None or self.pgd.is_identity else self.pgd.num_steps


def make_attack(attack_cfg, setting: str, warmup_steps: int = 0) -> TrainAttack:
    """The training attack for the setting ('natural' = no attack)."""
    if setting == "natural":
        return TrainAttack(None)
    if setting != "adversarial":
        raise ValueError(f"setting={setting!r}; allowed: 'adversarial', 'natural'")
    return TrainAttack(attacks.Pgd(
        epsilon=attack_cfg.epsilon, step_size=attack_cfg.step_size,
        num_steps=attack_cfg.num_steps, random_start=attack_cfg.random_start,
        loss=attack_cfg.loss, unroll=attack_cfg.unroll), warmup_steps)


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
                    cpu_convolutions: str = "auto") -> CompiledStep:
    """Builds `train_step(state, images_u8, labels) -> (state, metrics)`.

    `images_u8`/`labels` are the whole training split on the device (replicated); the state
    is donated. With a `mesh`, the batch is split along its `data` axis and the state stays
    replicated: XLA inserts the gradient all-reduce, and BatchNorm statistics are global.
    `pgd_loop` ('auto', 'fori', 'host'; see `resolve_pgd_loop`) and `cpu_convolutions`
    (see `robust_admm.compiler`) only change speed.
    """
    data_key_tag, attack_key_tag = 0, 1
    shard = _batch_constraint(mesh)
    pgd = attack.pgd
    jit = _jit_with_options(cpu_convolutions)
    state_out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}

    def begin(state: TrainState, images_u8, labels):
        """The batch, the attack's start and its epsilon scale."""
        key = jax.random.fold_in(state.key, data_key_tag)
        idx = batch_indices(key, state.step, labels.shape[0], batch_size)
        x = shard(to_pixels(images_u8[idx]))
        y = shard(labels[idx])
        if attack.num_steps == 0:
            return x, y, x, jnp.float32(1.0)
        attack_key = jax.random.fold_in(jax.random.fold_in(state.key, attack_key_tag),
                                        state.step)
        scale = attack.scale(state.step)
        return x, y, shard(pgd.start(x, attack_key, 0, scale)), scale

    def pgd_step(params, batch_stats, x_adv, x, y, scale):
        return pgd.step(attack_logits_fn(model, params, batch_stats), x_adv, x, y, scale)

    def update(state: TrainState, x_adv, y):
        """The training pass on the adversarial batch and the optimizer update."""
        x_adv = jax.lax.stop_gradient(x_adv)

        def loss_fn(params):
            logits, new_stats = apply_model(model, params, state.batch_stats, x_adv, True)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
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
        params = jax.tree_util.tree_map(lambda p, m: p * m, params, state.masks)
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

    if resolve_pgd_loop(pgd_loop) == "fori" or attack.num_steps == 0:
        def train_step(state: TrainState, images_u8, labels):
            x, y, x_adv, scale = begin(state, images_u8, labels)
            if attack.num_steps:
                x_adv = pgd.loop(lambda xa: pgd_step(state.params, state.batch_stats, xa,
                                                     x, y, scale), x_adv)
            return update(state, x_adv, y)

        step = jit(train_step, donate_argnums=(0,), **state_out)
        return CompiledStep(step, [step])

    begin_c = jit(begin)
    pgd_step_c = jit(pgd_step, donate_argnums=(2,))
    update_c = jit(update, donate_argnums=(0,), **state_out)

    def host_train_step(state: TrainState, images_u8, labels):
        x, y, x_adv, scale = begin_c(state, images_u8, labels)
        for _ in range(attack.num_steps):
            x_adv = pgd_step_c(state.params, state.batch_stats, x_adv, x, y, scale)
        return update_c(state, x_adv, y)

    return CompiledStep(host_train_step, [begin_c, pgd_step_c, update_c])


def _jit_with_options(cpu_convolutions: str) -> Callable:
    """`jax.jit` with this backend's compiler options (see `robust_admm.compiler`)."""
    return functools.partial(jax.jit,
                             compiler_options=compiler.compiler_options(cpu_convolutions))


def _batch_constraint(mesh: Mesh | None):
    """x -> x constrained to be split along the mesh's `data` axis (identity without one)."""
    if mesh is None:
        return lambda x: x
    return lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))


def make_eval_step(model, eval_attack: attacks.Pgd, mesh: Mesh | None = None,
                   pgd_loop: str = "auto", cpu_convolutions: str = "auto") -> CompiledStep:
    """`eval_step(params, batch_stats, images_u8, labels, valid, key)` -> (natural correct,
    adversarial correct) counts over the valid entries of one batch. Evaluation uses the
    running BatchNorm averages (train=False) for the attack too; no weight gradients."""
    shard = _batch_constraint(mesh)
    jit = _jit_with_options(cpu_convolutions)
    out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
    logits_fn = lambda params, batch_stats: (
        lambda xa: apply_model(model, params, batch_stats, xa, train=False)[0])

    def count(params, batch_stats, x, y, valid):
        return ((logits_fn(params, batch_stats)(x).argmax(-1) == y) & valid).sum()

    def prepare(images_u8, labels, valid):
        return shard(to_pixels(images_u8)), shard(labels), shard(valid)

    if resolve_pgd_loop(pgd_loop) == "fori" or eval_attack.is_identity:
        def eval_step(params, batch_stats, images_u8, labels, valid, key):
            x, y, valid = prepare(images_u8, labels, valid)
            x_adv = eval_attack(logits_fn(params, batch_stats), x, y, key)
            return count(params, batch_stats, x, y, valid), count(
                params, batch_stats, x_adv, y, valid)

        step = jit(eval_step, **out)
        return CompiledStep(step, [step])

    def begin(params, batch_stats, images_u8, labels, valid):
        x, y, valid = prepare(images_u8, labels, valid)
        return x, y, valid, count(params, batch_stats, x, y, valid)

    begin_c = jit(begin)  # the batch stays split along the mesh
    start_c = jit(lambda x, key, r: shard(eval_attack.start(x, key, r)),
                  static_argnums=(2,))
    step_c = jit(lambda params, batch_stats, xa, x, y: eval_attack.step(
        logits_fn(params, batch_stats), xa, x, y), donate_argnums=(2,))
    pick_c = jit(lambda params, batch_stats, best, cand, y: eval_attack.pick(
        logits_fn(params, batch_stats), best, cand, y), donate_argnums=(2,))
    count_c = jit(count, **out)

    def host_eval_step(params, batch_stats, images_u8, labels, valid, key):
        x, y, valid, nat = begin_c(params, batch_stats, images_u8, labels, valid)

        def steps(x_adv):
            for _ in range(eval_attack.num_steps):
                x_adv = step_c(params, batch_stats, x_adv, x, y)
            return x_adv

        best = eval_attack.best_of_restarts(
            lambda r: start_c(x, key, r), steps,
            lambda b, c: pick_c(params, batch_stats, b, c, y))
        return nat, count_c(params, batch_stats, best, y, valid)

    return CompiledStep(host_eval_step, [begin_c, start_c, step_c, pick_c, count_c])
