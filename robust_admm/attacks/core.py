"""The attack protocol and its two drivers.

An attack is three pure functions over a carried state (a pytree):

    state = attack.init(logits_fn, x, y, key, restart, scale)
    state = attack.step(logits_fn, state, x, y)      # `attack.num_steps` times
    x_adv = attack.finish(logits_fn, state, x, y)

The state holds whatever the attack needs (momentum, step sizes, best point and loss,
counters), so one loop runs every attack: `run` traces it whole (the steps in one
`lax.fori_loop`, for GPU/TPU and inside a compiled train step), and `HostRunner` calls
compiled parts from the host without waiting for their results (XLA:CPU runs rolled
loop bodies 3-4x slower than the same code outside a loop; benchmarks/NOTES.md).

`attack.restarts` independent runs (restart r gets `fold_in(key, r)` or what the attack
makes of r, e.g. APGD-T's target class) are combined per example by `keep_fooled`: the
first run that fools the model wins, as AutoAttack runs each restart only on the points
still robust. Pixels live in [0, 1]; `scale` multiplies epsilon and step sizes (an
epsilon ramp in training) and may be traced.
"""
import abc
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]


# ----------------------------------------------------------------------------- losses
# Per-example losses the attacks maximise: (logits, labels[, target]) -> (batch,).

def ce_loss(logits, y):
    """Cross-entropy of the true label."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def margin_loss(logits, y):
    """Carlini-Wagner margin: best wrong logit minus the true logit."""
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    wrong = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return wrong.max(axis=1) - true


def dlr_loss(logits, y):
    """Difference of logits ratio (Croce & Hein 2020), untargeted: shift- and
    scale-invariant, so it does not saturate where cross-entropy does."""
    srt = jnp.sort(logits, axis=1)
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    top_is_true = jnp.argmax(logits, axis=1) == y
    other = jnp.where(top_is_true, srt[:, -2], srt[:, -1])
    return -(true - other) / (srt[:, -1] - srt[:, -3] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Targeted DLR: -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2), z_(i) the i-th largest."""
    srt = jnp.sort(logits, axis=1)
    take = lambda idx: jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]
    return -(take(y) - take(target)) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


LOSSES = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}


def loss_fn(name: str) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"attack loss={name!r} is not known; allowed: {tuple(LOSSES)}")
    return LOSSES[name]


def loss_and_grad(logits_fn: LogitsFn, loss: Callable, x_adv, *loss_args):
    """Per-example losses, their input gradients (of the sum: the examples are
    independent) and the logits, in one forward and one backward pass."""
    def total(xa):
        logits = logits_fn(xa)
        per_example = loss(logits, *loss_args)
        return per_example.sum(), (per_example, logits)

    grad, (per_example, logits) = jax.grad(total, has_aux=True)(x_adv)
    return per_example, grad, logits


# ----------------------------------------------------------------------------- geometry

def project_linf(x_adv, x, epsilon):
    """Projection onto the L-inf ball of radius epsilon around x, then onto [0, 1]."""
    return jnp.clip(jnp.clip(x_adv, x - epsilon, x + epsilon), 0.0, 1.0)


# ----------------------------------------------------------------------------- norms
# The threat models: 'linf' (max |delta_i| <= eps) and 'l2' (||delta||_2 <= eps).

NORMS = ("linf", "l2")


def check_norm(attack_name: str, norm: str, allowed=NORMS):
    if norm not in allowed:
        raise ValueError(f"{attack_name}: norm={norm!r} is not allowed; allowed: "
                         f"{', '.join(allowed)}")


def l2_norm(v):
    """Per-example Euclidean norm: (batch, ...) -> (batch,)."""
    return jnp.sqrt((v.reshape(v.shape[0], -1) ** 2).sum(axis=1))


def l2_normalize(v):
    """v / ||v||_2 per example (+1e-12, as AutoAttack's reference)."""
    return v / (per_example(l2_norm(v), v) + 1e-12)


def project_l2(x_adv, x, epsilon):
    """x + (x_adv - x) shrunk to L2 norm <= epsilon, then clipped to [0, 1] (AutoAttack's
    APGD-L2 step: not the exact projection onto the ball and the box together)."""
    d = x_adv - x
    return jnp.clip(x + l2_normalize(d) * jnp.minimum(epsilon, per_example(l2_norm(d), d)),
                    0.0, 1.0)


def project(x_adv, x, epsilon, norm: str):
    return project_linf(x_adv, x, epsilon) if norm == "linf" else project_l2(x_adv, x, epsilon)


def ascent_direction(grad, norm: str):
    """The steepest-ascent unit step of the norm: sign(grad) (L-inf), grad / ||grad|| (L2)."""
    return jnp.sign(grad) if norm == "linf" else l2_normalize(grad)


def l2_start(key, x, epsilon):
    """A start on the L2 sphere of radius epsilon around x, direction Gaussian, clipped to
    [0, 1] (AutoAttack's APGD-L2 start)."""
    return jnp.clip(x + epsilon * l2_normalize(jax.random.normal(key, x.shape, x.dtype)),
                    0.0, 1.0)


def per_example(v, like):
    """(batch,) -> broadcastable against `like` (batch, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def misclassified(logits_fn: LogitsFn, x, y):
    return logits_fn(x).argmax(-1) != y


def keep_fooled(logits_fn: LogitsFn, best, candidate, y):
    """Per example: `best` where it already fools the model, else `candidate`."""
    return jnp.where(per_example(misclassified(logits_fn, best, y), best), best, candidate)


# ----------------------------------------------------------------------------- protocol

_RANGES = {"epsilon": (0, ">= 0"), "step_size": (0, ">= 0"), "num_steps": (0, ">= 0"),
           "restarts": (1, ">= 1")}


def check_arguments(attack_name: str, **values):
    """Raises a ValueError naming every argument below its allowed minimum."""
    bad = [f"{k}={v!r} (allowed: {_RANGES[k][1]})" for k, v in values.items()
           if not v >= _RANGES[k][0]]
    if bad:
        raise ValueError(f"{attack_name}: " + ", ".join(bad))


class Attack(abc.ABC):
    """init / step / finish over a carried state; see the module docstring. Subclasses
    are frozen dataclasses (hashable, so their parts can be static in `jax.jit`). Every
    array of the state is either a scalar or batch-first (the host driver splits those
    along a mesh's `data` axis)."""

    num_steps: int
    restarts: int = 1
    # True if `finish` returns the best point found so far, so that a point it returns
    # fooling stays fooled whatever more steps do (APGD, FAB, Square; PGD returns its last
    # iterate). Such a run may drop its fooled points early (see robustness.py).
    keeps_best = False
    unroll = 1  # `lax.fori_loop` unroll factor of the steps (speed only)

    @abc.abstractmethod
    def init(self, logits_fn: LogitsFn, x, y, key, restart: int = 0, scale=1.0):
        """The state of run `restart` before the first step: a Python int, or a traced
        int32 scalar (`HostRunner` compiles one init for every run) that must give the
        same state."""

    @abc.abstractmethod
    def step(self, logits_fn: LogitsFn, state, x, y):
        """One iteration."""

    @abc.abstractmethod
    def finish(self, logits_fn: LogitsFn, state, x, y):
        """The adversarial batch of one run."""

    @property
    def is_identity(self) -> bool:
        """True when the attack cannot move x (no steps, or epsilon 0)."""
        return False


def run_steps(attack: Attack, logits_fn: LogitsFn, state, x, y):
    """`attack.num_steps` steps in one `lax.fori_loop` (traced)."""
    if attack.num_steps == 0:
        return state
    unroll = max(1, min(attack.unroll, attack.num_steps))
    return jax.lax.fori_loop(0, attack.num_steps,
                             lambda _, s: attack.step(logits_fn, s, x, y), state, unroll=unroll)


def best_of_restarts(restarts: int, one_run: Callable, pick: Callable):
    """Runs `one_run(r)` for each restart and combines them with `pick(best, candidate)`.
    The parts may be traced code or compiled calls from the host: same order of work."""
    best = None
    for r in range(restarts):
        candidate = one_run(r)
        best = candidate if best is None else pick(best, candidate)
    return best


def run(attack: Attack, logits_fn: LogitsFn, x, y, key, scale=1.0):
    """The whole attack, traced: restarts x (init, fori_loop of steps, finish), combined
    per example. Returns stop_gradient(x_adv)."""
    x = jax.lax.stop_gradient(x)
    if attack.is_identity:
        return x

    def one_run(r):
        state = attack.init(logits_fn, x, y, key, r, scale)
        state = run_steps(attack, logits_fn, state, x, y)
        return attack.finish(logits_fn, state, x, y)

    best = best_of_restarts(attack.restarts, one_run,
                            lambda b, c: keep_fooled(logits_fn, b, c, y))
    return jax.lax.stop_gradient(best)


class HostRunner:
    """The attack as compiled parts called from the host: init, each step, finish and the
    restart pick are separate programs, dispatched without waiting for results.

    `apply(model_args, x) -> logits` builds the attacked function from arrays that are
    passed to every part (parameters, BatchNorm statistics), so the parts compile once.
    `jit` is `jax.jit` with the caller's options; `shard` constrains a batch-shaped
    array's layout (identity without a mesh).
    """

    def __init__(self, attack: Attack, apply: Callable, jit: Callable = jax.jit,
                 shard: Callable = lambda a: a):
        self.attack = attack
        fn = lambda m: functools.partial(apply, m)
        shard_tree = lambda t: jax.tree_util.tree_map(
            lambda a: shard(a) if a.ndim and a.shape[0] else a, t)
        init = lambda m, x, y, key, r, scale: shard_tree(attack.init(fn(m), x, y, key, r, scale))
        # With several runs the run index is traced (one program for every run); a single
        # run keeps it static, its program as before.
        self.traced_restart = attack.restarts > 1
        self.init_c = jit(init) if self.traced_restart else jit(init, static_argnums=(4,))
        self.step_c = jit(lambda m, s, x, y: attack.step(fn(m), s, x, y), donate_argnums=(1,))
        self.finish_c = jit(lambda m, s, x, y: attack.finish(fn(m), s, x, y))
        self.pick_c = jit(lambda m, b, c, y: keep_fooled(fn(m), b, c, y), donate_argnums=(1,))
        self.parts = (self.init_c, self.step_c, self.finish_c, self.pick_c)

    def init(self, model_args, x, y, key, restart: int, scale=1.0):
        """The compiled init of run `restart` (a Python int)."""
        r = jnp.asarray(restart, jnp.int32) if self.traced_restart else restart
        return self.init_c(model_args, x, y, key, r, scale)

    def run_from(self, model_args, state, x, y):
        """The steps and the finish of one run, from its initial state."""
        for _ in range(self.attack.num_steps):
            state = self.step_c(model_args, state, x, y)
        return self.finish_c(model_args, state, x, y)

    def __call__(self, model_args, x, y, key, scale=1.0):
        if self.attack.is_identity:
            return x
        return best_of_restarts(
            self.attack.restarts,
            lambda r: self.run_from(model_args, self.init(model_args, x, y, key, r, scale),
                                    x, y),
            lambda b, c: self.pick_c(model_args, b, c, y))
