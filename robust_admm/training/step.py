"""The compiled adversarial train step.

The `train_step` does, for one batch: take the batch (picked from the split on the
device by a permutation per epoch derived from the state's key, so the data position is
just the step; or given, streamed from the host), PGD inner maximisation, the
adversarial loss, gradients, gradient masking, the optax update (which, in an ADMM phase,
adds the ADMM penalty's gradient and updates Z and U at interval ends:
`compression.transforms.admm_phase`; in a retrain phase keeps the sets: `retrain_phase`)
and re-masking of the weights. On GPU and TPU that is one compiled program with the PGD
loop as a `lax.fori_loop`; on CPU, where XLA runs rolled loop bodies slower, the PGD
steps are separate compiled calls dispatched from the host without waiting for their
results (`runtime.compiler.resolve_pgd_loop`). Both forms are tested to give the same
results.

BatchNorm during the attack: the attack's forward passes use the batch statistics of the
perturbed batch without updating the running averages; only the training forward pass
updates them.

Dropout (models with a `dropout_rate`, `models.uses_dropout`): only the training forward
pass drops units, with the key fold_in(fold_in(state key, DROPOUT_KEY_TAG), step) (the
adversarial pass; a clean pass of TRADES or MART draws its own masks with fold_in of that
key and 1). The attack sees the deterministic network, as evaluation does. Models without
dropout get no key: their programs are those of a step without dropout.
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from robust_admm import attacks
from robust_admm.compression import admm as admm_lib
from robust_admm.compression import transforms
from robust_admm.data.batching import DATA_KEY_TAG, batch_indices, to_pixels
from robust_admm.models import apply_model, uses_dropout
from robust_admm.runtime import parallel
from robust_admm.runtime.compiler import CompiledStep, jit_with_options, resolve_pgd_loop
from robust_admm.training import augment, objectives
from robust_admm.training.attack import TrainAttack
from robust_admm.training.state import TrainState

FEEDS = ("device", "stream")  # where the step's batch comes from (make_train_step)
# The training pass's dropout key is fold_in(state key, DROPOUT_KEY_TAG) folded with the
# step (the other tags: data 0, attack 1, augment 2, 3 kept for mixup).
DROPOUT_KEY_TAG = 4


def attack_logits_fn(model, params, batch_stats) -> Callable:
    """Logits as the attack sees them: batch statistics, running averages untouched."""
    return lambda x: apply_model(model, params, batch_stats, x, train=True)[0]


def make_train_step(model, tx: optax.GradientTransformation, attack: TrainAttack,
                    batch_size: int, schedule: Callable | None = None,
                    mesh: Mesh | None = None, pgd_loop: str = "auto",
                    cpu_convolutions: str = "auto", objective: str = "pgd_at",
                    beta: float = 6.0, constraints: admm_lib.Specs | None = None,
                    quantize_update: str = "project",
                    augmentation: str = "none", feed: str = "device",
                    label_smoothing: float = 0.0, mixup_alpha: float = 0.0) -> CompiledStep:
    """Builds `train_step(state, data) -> (state, metrics)`; the state is donated.

    What `data` is depends on `feed` (one of FEEDS):
    - 'device': `(images_u8, labels[, order])`, the whole training split on the devices
      (replicated); the step gathers its `batch_size` examples by (state key, step)
      (`data.batching.batch_indices`), from `order`, the epoch's order of the examples,
      where the feed gives it (`data.feed.DeviceFeed`, once per epoch), else drawing
      that order itself (the same batches, at the cost of a sort of the split per step).
    - 'stream': one global batch `{"image": uint8 (batch_size, H, W, C), "label": int32,
      "valid": bool}` split along the mesh (`data.feed`); the losses and the accuracy are
      means over its valid examples (a skipped image is invalid), and the metrics count
      the invalid ones (`skipped`). With a `mesh`, the batch is split along its `data` axis and the state stays
    replicated: XLA inserts the gradient all-reduce, and BatchNorm statistics are global.
    `pgd_loop` ('auto', 'fori', 'host'; see `runtime.compiler.resolve_pgd_loop`) and
    `cpu_convolutions` (see `runtime.compiler`) only change speed. `objective`
    (`training.objectives`)
    is the loss at the attack's point; TRADES and MART also take a clean forward pass
    (BatchNorm statistics updated by the clean pass, then by the adversarial one).
    After each update the masks are applied, and `constraints` (a retrain phase's specs)
    keep quantized leaves on their levels: projected after each update ('project') or
    latent weights with the model, attack included, run on their levels ('ste'); see
    `admm.keep_constraints` and `admm.straight_through`. `augmentation`
    (`training.augment`) transforms each batch with a key of (state key, step).

    `label_smoothing` (eps in [0, 1)): the objective's cross-entropy terms against smoothed
    targets (`objectives.smoothed_targets`); the attack keeps the hard labels.
    `mixup_alpha` > 0: after augmentation the batch becomes lam * x + (1 - lam) * x[perm],
    (lam, perm) = `augment.mixup_draw(fold_in(fold_in(state key, 3), step), alpha, ...)`,
    partners drawn among the valid examples of a streamed batch; the attack starts from
    the mixed batch and ascends its loss mixed the same way (`TrainAttack.mixed`), the
    training loss is lam * L(y) + (1 - lam) * L(y[perm]) (`objectives.mixed`), and
    train_acc counts the label of the larger weight. At 0 (both) the step is traced as
    without them.
    """
    constraints = constraints or {}
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing={label_smoothing!r}; allowed: 0 <= it < 1")
    if not mixup_alpha >= 0:
        raise ValueError(f"mixup_alpha={mixup_alpha!r}; allowed: >= 0 (0: no mixup)")
    mixup = mixup_alpha > 0
    if mixup:
        attack = attack.mixed()
    if feed not in FEEDS:
        raise ValueError(f"feed={feed!r}; allowed: {FEEDS}")
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
    dropout = uses_dropout(model)
    attack_key_tag, augment_key_tag, mixup_key_tag = 1, 2, 3  # and DATA_KEY_TAG = 0
    shard = parallel.batch_constraint(mesh)
    adv = attack.attack
    jit = jit_with_options(cpu_convolutions)
    state_out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}

    def take(state: TrainState, data):
        """(images uint8, labels, valid or None) of this step's batch."""
        if feed == "stream":
            return data["image"], data["label"], data["valid"]
        images_u8, labels, *order = data
        key = jax.random.fold_in(state.key, DATA_KEY_TAG)
        idx = batch_indices(key, state.step, labels.shape[0], batch_size,
                            order[0] if order else None)
        return images_u8[idx], labels[idx], None

    def begin(state: TrainState, data, q):
        """The batch (x, y, valid) and the attack's initial state (None without an
        attack); `q` as `levels` gives it."""
        images, labels, valid = take(state, data)
        if augmentation != "none":
            images = augment.augment(augmentation, images, jax.random.fold_in(
                jax.random.fold_in(state.key, augment_key_tag), state.step))
        x = shard(to_pixels(images))
        y = shard(labels)
        valid = None if valid is None else shard(valid)
        if mixup:
            lam, perm = augment.mixup_draw(jax.random.fold_in(
                jax.random.fold_in(state.key, mixup_key_tag), state.step), mixup_alpha,
                y.shape[0], valid)
            x = shard(augment.mixup(x, lam, perm))
            y = objectives.MixedLabels(y, shard(y[perm]), lam)
        batch = (x, y, valid)
        if attack.num_steps == 0:
            return batch, None
        attack_key = jax.random.fold_in(jax.random.fold_in(state.key, attack_key_tag),
                                        state.step)
        logits_fn = attack_logits_fn(model, runs_on(state, q), state.batch_stats)
        return batch, shard_state(adv.init(logits_fn, x, y, attack_key, 0,
                                           attack.scale(state.step)))

    def objective_loss(clean_logits, logits, y, weights):
        """The objective's batch loss (the public loss function: a mean over the batch,
        or over its valid examples); under mixup, mixed over `y`'s two labels."""
        def loss(labels):
            return obj.batch_loss(clean_logits, logits, labels, beta=beta,
                                  label_smoothing=label_smoothing, where=weights)
        return objectives.mixed(loss, y) if mixup else loss(y)

    def attack_step(params, batch_stats, attack_state, x, y):
        return adv.step(attack_logits_fn(model, params, batch_stats), attack_state, x, y)

    def update(state: TrainState, attack_state, batch, q):
        """The attack's result, the training pass on it and the optimizer update."""
        x, y, valid = batch
        weights = None if valid is None else valid.astype(jnp.float32)
        mean = jnp.mean if valid is None else objectives.weighted_mean(weights)
        x_adv = x if attack_state is None else adv.finish(
            attack_logits_fn(model, runs_on(state, q), state.batch_stats), attack_state, x, y)
        x_adv = jax.lax.stop_gradient(x_adv)

        key = clean_key = None
        if dropout:
            key = jax.random.fold_in(jax.random.fold_in(state.key, DROPOUT_KEY_TAG),
                                     state.step)
            clean_key = jax.random.fold_in(key, 1)

        def loss_fn(params):
            if q is not None:
                params = admm_lib.straight_through(params, q)
            stats = state.batch_stats
            if two_passes:
                clean_logits, stats = apply_model(model, params, stats, x, True, clean_key)
            logits, new_stats = apply_model(model, params, stats, x_adv, True, key)
            ce = objective_loss(clean_logits if two_passes else logits, logits, y, weights)
            return ce, (ce, logits, new_stats)

        grads, (ce, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, state.masks)
        grad_norm = optax.tree.norm(grads)
        # The ADMM penalty and its gradient belong to `tx` (`transforms.admm_phase`, which
        # adds rho (W - Z + U) to these gradients); its value is a metric here.
        admm_state = transforms.admm_state(state.opt_state)
        pen = (jnp.zeros((), jnp.float32) if admm_state is None
               else admm_lib.penalty(state.params, admm_state))
        # `tx` is wrapped in optax.apply_if_finite, which drops non-finite updates; the
        # BatchNorm statistics of such a step are dropped here too.
        finite = jnp.isfinite(ce + pen) & jnp.isfinite(grad_norm)
        new_stats = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_stats,
                                           state.batch_stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Exactly on the sets (`transforms.keep_on_sets`: `retrain_phase`'s updates may
        # leave a far-moving weight an ulp off its level) and the masks kept.
        params = admm_lib.keep_constraints(params, state.masks, constraints, quantize_update)
        metrics = {
            "loss": ce + pen,
            "ce": ce,
            "admm_penalty": pen,
            "train_acc": mean(logits.argmax(-1) == (y.major() if mixup else y)),
            "grad_norm": grad_norm,
            "nonfinite": (~finite).astype(jnp.int32),
        }
        if valid is not None:
            metrics["skipped"] = (~valid).sum()
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                                  opt_state=opt_state)
        return new_state, metrics

    def shard_state(tree):
        return jax.tree_util.tree_map(lambda a: shard(a) if a.ndim else a, tree)

    if resolve_pgd_loop(pgd_loop) == "fori" or attack.num_steps == 0:
        def train_step(state: TrainState, data):
            q = levels(state)
            batch, attack_state = begin(state, data, q)
            if attack.num_steps:
                attack_state = attacks.run_steps(
                    adv, attack_logits_fn(model, runs_on(state, q), state.batch_stats),
                    attack_state, *batch[:2])
            return update(state, attack_state, batch, q)

        step = jit(train_step, donate_argnums=(0,), **state_out)
        return CompiledStep(step, [step])

    begin_c = jit(begin)
    attack_step_c = jit(attack_step, donate_argnums=(2,))
    update_c = jit(update, donate_argnums=(0,), **state_out)
    levels_c = jit(levels)

    def host_train_step(state: TrainState, data):
        q = levels_c(state) if ste else None
        batch, attack_state = begin_c(state, data, q)
        for _ in range(attack.num_steps):
            attack_state = attack_step_c(runs_on(state, q), state.batch_stats, attack_state,
                                         *batch[:2])
        return update_c(state, attack_state, batch, q)

    return CompiledStep(host_train_step, [begin_c, attack_step_c, update_c]
                        + ([levels_c] if ste else []))
