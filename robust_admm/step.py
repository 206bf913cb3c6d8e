"""The train state and the compiled steps.

One jit-compiled `train_step` does, for one batch: pick the batch from the on-device
dataset (a permutation per epoch, derived from the state's key, so the data position is
just the step), PGD inner maximisation, the adversarial loss plus the ADMM penalty,
gradients, gradient masking, the optax update and re-masking of the weights.

BatchNorm during the attack: the attack's forward passes use the batch statistics of the
perturbed batch without updating the running averages; only the training forward pass
updates them.
"""
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from jax.sharding import Mesh

from robust_admm import admm as admm_lib
from robust_admm import attacks, parallel


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


def make_attack(attack_cfg, setting: str, warmup_steps: int = 0):
    """`(logits_fn, x, y, key, step) -> x_adv` for the training setting ('natural' =
    identity). With `warmup_steps` > 0, epsilon and the step size ramp linearly from 0 to
    their configured values over the first `warmup_steps` steps of the stage: adversarial
    training from scratch at full epsilon can sit at chance level for a long time."""
    if setting == "natural":
        return lambda logits_fn, x, y, key, step: x
    if setting != "adversarial":
        raise ValueError(f"setting={setting!r}; allowed: 'adversarial', 'natural'")

    def attack(logits_fn, x, y, key, step):
        scale = 1.0
        if warmup_steps > 0:
            scale = jnp.minimum(1.0, (step + 1) / warmup_steps)
        return attacks.pgd(
            logits_fn, x, y, key,
            epsilon=attack_cfg.epsilon * scale,
            step_size=attack_cfg.step_size * scale,
            num_steps=attack_cfg.num_steps,
            random_start=attack_cfg.random_start,
            loss=attack_cfg.loss,
            unroll=attack_cfg.unroll,
        )

    return attack


def batch_indices(key, step, num_examples: int, batch_size: int):
    """Indices of batch `step`: epoch e uses permutation(fold_in(key, e)), batches in order,
    the last partial batch dropped. Pure in (key, step), so resuming needs only the step."""
    steps_per_epoch = num_examples // batch_size
    epoch, i = step // steps_per_epoch, step % steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
    return jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)


def make_train_step(model, tx: optax.GradientTransformation, attack, batch_size: int,
                    schedule: Callable | None = None, mesh: Mesh | None = None):
    """Builds the jit-compiled `train_step(state, images_u8, labels) -> (state, metrics)`.

    `images_u8`/`labels` are the whole training split on the device (replicated); the state
    is donated. With a `mesh`, the batch is split along its `data` axis and the state stays
    replicated: XLA inserts the gradient all-reduce, and BatchNorm statistics are global.
    """
    data_key_tag, attack_key_tag = 0, 1
    shard = _batch_constraint(mesh)

    def train_step(state: TrainState, images_u8, labels):
        key = jax.random.fold_in(state.key, data_key_tag)
        idx = batch_indices(key, state.step, labels.shape[0], batch_size)
        x = shard(to_pixels(images_u8[idx]))
        y = shard(labels[idx])
        attack_key = jax.random.fold_in(jax.random.fold_in(state.key, attack_key_tag),
                                        state.step)
        x_adv = attack(attack_logits_fn(model, state.params, state.batch_stats),
                       x, y, attack_key, state.step)

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

    if mesh is None:
        return jax.jit(train_step, donate_argnums=(0,))
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=parallel.replicated(mesh))


def _batch_constraint(mesh: Mesh | None):
    """x -> x constrained to be split along the mesh's `data` axis (identity without one)."""
    if mesh is None:
        return lambda x: x
    return lambda x: jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))


def make_eval_step(model, eval_attack, mesh: Mesh | None = None):
    """Jit-compiled `eval_step(params, batch_stats, images_u8, labels, valid, key)` ->
    (natural correct, adversarial correct) counts over the valid entries of one batch.
    Evaluation uses the running BatchNorm averages (train=False) for the attack too."""

    shard = _batch_constraint(mesh)

    def eval_step(params, batch_stats, images_u8, labels, valid, key):
        x, labels, valid = shard(to_pixels(images_u8)), shard(labels), shard(valid)
        logits_fn = lambda xa: apply_model(model, params, batch_stats, xa, train=False)[0]
        nat = (logits_fn(x).argmax(-1) == labels) & valid
        x_adv = eval_attack(logits_fn, x, labels, key)
        adv = (logits_fn(x_adv).argmax(-1) == labels) & valid
        return nat.sum(), adv.sum()

    if mesh is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, out_shardings=parallel.replicated(mesh))
