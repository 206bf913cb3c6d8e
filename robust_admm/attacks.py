"""Adversarial attacks as pure functions: `attack(logits_fn, x, y, key) -> x_adv`.

Pixels live in [0, 1]; `epsilon` and `step_size` are in that scale. `Pgd` holds the
attack's parts (start, step, pick among restarts); called whole, its loop is a
`lax.fori_loop` inside whatever jit-compiled program calls it, and the result is wrapped
in `stop_gradient` so the outer (training) gradient never flows through the attack. The
train and eval steps may instead drive `Pgd.step` from the host (XLA:CPU; see step.py).
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]

LOSSES = ("ce", "margin")


def _loss_sum(logits: jnp.ndarray, y: jnp.ndarray, loss: str) -> jnp.ndarray:
    """Summed attack loss: each example's input gradient is independent of the others."""
    if loss == "ce":
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    # Carlini-Wagner margin: best wrong logit minus the true logit.
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    wrong = jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return (wrong.max(axis=1) - true).sum()


def _project(x_adv: jnp.ndarray, x: jnp.ndarray, epsilon: float) -> jnp.ndarray:
    """Projection onto the L-inf ball of radius epsilon around x, then onto [0, 1]."""
    return jnp.clip(jnp.clip(x_adv, x - epsilon, x + epsilon), 0.0, 1.0)


def fgsm(logits_fn: LogitsFn, x, y, key=None, *, epsilon: float, loss: str = "ce"):
    """One signed-gradient step of size epsilon (Goodfellow et al.)."""
    del key
    return pgd(logits_fn, x, y, None, epsilon=epsilon, step_size=epsilon, num_steps=1,
               random_start=False, loss=loss)


@dataclasses.dataclass(frozen=True)
class Pgd:
    """L-inf PGD (Madry et al.) as its parts: `start` (uniform random start in the
    eps-ball), `step` (x <- Proj(x + step_size * sign(grad))) and `pick` (restarts keep,
    per example, the first start that fools the model). `__call__` runs them in one
    `lax.fori_loop` inside whatever program calls it; a caller may instead drive `step`
    from the host, one compiled call per step (XLA:CPU runs rolled loop bodies 3-4x
    slower than the same code outside a loop; see benchmarks/NOTES.md).

    Every part takes `scale`, a (possibly traced) factor on epsilon and the step size,
    for an epsilon ramp during training.
    """

    epsilon: float
    step_size: float
    num_steps: int
    random_start: bool = True
    loss: str = "ce"
    restarts: int = 1
    unroll: int = 1  # `lax.fori_loop` unroll factor (speed only)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"attack loss={self.loss!r} is not known; allowed: {LOSSES}")
        if self.restarts < 1:
            raise ValueError(f"restarts={self.restarts} must be >= 1")
        if self.num_steps < 0 or self.epsilon < 0 or self.step_size < 0:
            raise ValueError(
                f"PGD needs epsilon >= 0, step_size >= 0, num_steps >= 0; got "
                f"epsilon={self.epsilon}, step_size={self.step_size}, "
                f"num_steps={self.num_steps}")

    @property
    def is_identity(self) -> bool:
        return self.num_steps == 0 or self.epsilon == 0

    def start(self, x, key, restart: int = 0, scale=1.0):
        """The starting point of restart `restart`."""
        if not self.random_start:
            return x
        eps = self.epsilon * scale
        noise = jax.random.uniform(jax.random.fold_in(key, restart), x.shape, x.dtype,
                                   -1.0, 1.0) * eps
        return _project(x + noise, x, eps)

    def step(self, logits_fn: LogitsFn, x_adv, x, y, scale=1.0):
        """One signed-gradient ascent step on the summed loss, projected back."""
        grad = jax.grad(lambda xa: _loss_sum(logits_fn(xa), y, self.loss))(x_adv)
        eps = self.epsilon * scale
        return _project(x_adv + self.step_size * scale * jnp.sign(grad), x, eps)

    @staticmethod
    def pick(logits_fn: LogitsFn, best, candidate, y):
        """Keeps `best` where it already fools the model, else takes `candidate`."""
        fooled = logits_fn(best).argmax(-1) != y
        return jnp.where(fooled[:, None, None, None], best, candidate)

    def loop(self, step_fn: Callable, x_adv):
        """`num_steps` applications of `step_fn` in one `lax.fori_loop`."""
        unroll = max(1, min(self.unroll, self.num_steps))
        return jax.lax.fori_loop(0, self.num_steps, lambda _, xa: step_fn(xa), x_adv,
                                 unroll=unroll)

    def best_of_restarts(self, start_fn: Callable, steps_fn: Callable, pick_fn: Callable):
        """Runs each restart (`steps_fn(start_fn(r))`) and keeps, per example, the first
        that fools the model (`pick_fn(best, candidate)`). The parts may be traced code or
        compiled calls made from the host; the order of operations is the same."""
        best = None
        for r in range(self.restarts):
            x_adv = steps_fn(start_fn(r))
            best = x_adv if best is None else pick_fn(best, x_adv)
        return best

    def __call__(self, logits_fn: LogitsFn, x, y, key, scale=1.0):
        """The whole attack in one compiled loop; returns stop_gradient(x_adv)."""
        x = jax.lax.stop_gradient(x)
        if self.is_identity:
            return x
        best = self.best_of_restarts(
            lambda r: self.start(x, key, r, scale),
            lambda xa: self.loop(lambda z: self.step(logits_fn, z, x, y, scale), xa),
            lambda b, c: self.pick(logits_fn, b, c, y))
        return jax.lax.stop_gradient(best)


def pgd(logits_fn: LogitsFn, x: jnp.ndarray, y: jnp.ndarray, key: jax.Array | None, *,
        epsilon: float, step_size: float, num_steps: int, random_start: bool = True,
        loss: str = "ce", unroll: int = 1) -> jnp.ndarray:
    """L-inf PGD in one `lax.fori_loop`; see `Pgd`. Returns stop_gradient(x_adv)."""
    return Pgd(epsilon, step_size, num_steps, random_start, loss, 1, unroll)(
        logits_fn, x, y, key)


def pgd_restarts(logits_fn: LogitsFn, x, y, key, *, restarts: int = 1, **pgd_kwargs):
    """PGD with `restarts` random starts; keeps, per example, the first start that fools
    the model (else the last). Used for evaluation, where the worst case matters."""
    return Pgd(restarts=restarts, **pgd_kwargs)(logits_fn, x, y, key)
