"""Adversarial attacks as pure functions: `attack(logits_fn, x, y, key) -> x_adv`.

Pixels live in [0, 1]; `epsilon` and `step_size` are in that scale. The PGD loop is a
`lax.fori_loop` inside whatever jit-compiled program calls it, and the result is wrapped
in `stop_gradient` so the outer (training) gradient never flows through the attack.
"""
from typing import Callable

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


def pgd(
    logits_fn: LogitsFn,
    x: jnp.ndarray,
    y: jnp.ndarray,
    key: jax.Array | None,
    *,
    epsilon: float,
    step_size: float,
    num_steps: int,
    random_start: bool = True,
    loss: str = "ce",
    unroll: int = 1,
) -> jnp.ndarray:
    """L-inf PGD (Madry et al.): optional uniform random start in the eps-ball, then
    `num_steps` steps x <- Proj(x + step_size * sign(grad)). Returns stop_gradient(x_adv).

    `epsilon` and `step_size` may be traced scalars (an epsilon ramp during training).
    `unroll` is passed to `lax.fori_loop`: XLA:CPU runs rolled loop bodies slower than
    straight-line code, and a partial unroll trades compile time for speed.
    """
    if loss not in LOSSES:
        raise ValueError(f"attack loss={loss!r} is not known; allowed: {LOSSES}")
    static = all(isinstance(v, (int, float)) for v in (epsilon, step_size))
    if num_steps < 0 or (static and (epsilon < 0 or step_size < 0)):
        raise ValueError(
            f"PGD needs epsilon >= 0, step_size >= 0, num_steps >= 0; got "
            f"epsilon={epsilon}, step_size={step_size}, num_steps={num_steps}"
        )
    x = jax.lax.stop_gradient(x)
    if num_steps == 0 or (static and epsilon == 0):
        return x
    grad_fn = jax.grad(lambda xa: _loss_sum(logits_fn(xa), y, loss))
    x_adv = x
    if random_start:
        noise = jax.random.uniform(key, x.shape, x.dtype, -epsilon, epsilon)
        x_adv = _project(x + noise, x, epsilon)

    def body(_, xa):
        return _project(xa + step_size * jnp.sign(grad_fn(xa)), x, epsilon)

    x_adv = jax.lax.fori_loop(0, num_steps, body, x_adv, unroll=max(1, min(unroll, num_steps)))
    return jax.lax.stop_gradient(x_adv)


def pgd_restarts(logits_fn: LogitsFn, x, y, key, *, restarts: int = 1, **pgd_kwargs):
    """PGD with `restarts` random starts; keeps, per example, the first start that fools
    the model (else the last). Used for evaluation, where the worst case matters."""
    if restarts < 1:
        raise ValueError(f"restarts={restarts} must be >= 1")
    best = pgd(logits_fn, x, y, jax.random.fold_in(key, 0), **pgd_kwargs)
    for r in range(1, restarts):
        fooled = logits_fn(best).argmax(-1) != y
        cand = pgd(logits_fn, x, y, jax.random.fold_in(key, r), **pgd_kwargs)
        best = jnp.where(fooled[:, None, None, None], best, cand)
    return best
