"""FGSM and PGD (Madry et al.), L-inf or L2, on the attack protocol."""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from robust_admm.attacks import core


@dataclasses.dataclass(frozen=True)
class Pgd(core.Attack):
    """PGD: a random start in the eps-ball (restart r draws with `fold_in(key, r)`), then
    `num_steps` ascent steps on `loss` ('ce', 'margin' or 'dlr'), each projected back onto
    the ball and [0, 1]. L-inf: uniform start, signed-gradient steps. L2: a start on the
    eps-sphere in a Gaussian direction, steps along grad / ||grad||_2. Restarts keep, per
    example, the first that fools the model.

    `loss` is a name of `core.LOSSES` or a function `(logits, y, clean_logits) ->
    (batch,)` (TRADES's KL to the clean prediction: the clean logits are computed once
    at init and held fixed); with `loss_reads_clean=False`, a function `(logits, y) ->
    (batch,)` as the named ones, and no clean pass (`y` may then be any pytree the function
    reads, e.g. mixup's labels). `start_std > 0` replaces the uniform start by x +
    start_std * N(0, 1), unclipped, as TRADES's code starts (0.001)."""

    epsilon: float
    step_size: float
    num_steps: int
    random_start: bool = True
    loss: str | Callable = "ce"
    restarts: int = 1
    unroll: int = 1  # `lax.fori_loop` unroll factor (speed only)
    norm: str = "linf"  # 'linf' | 'l2'
    start_std: float = 0.0
    loss_reads_clean: bool = True  # a callable `loss` is given the clean logits

    def __post_init__(self):
        if not callable(self.loss):
            core.loss_fn(self.loss)
        if not self.start_std >= 0:
            raise ValueError(f"PGD: start_std={self.start_std!r} (allowed: >= 0)")
        core.check_norm("PGD", self.norm)
        core.check_arguments("PGD", epsilon=self.epsilon, step_size=self.step_size,
                             num_steps=self.num_steps, restarts=self.restarts)

    @property
    def is_identity(self) -> bool:
        return self.num_steps == 0 or self.epsilon == 0

    def init(self, logits_fn, x, y, key, restart: int = 0, scale=1.0):
        eps, alpha = self.epsilon * scale, self.step_size * scale
        x_adv = x
        if self.random_start and self.start_std > 0:
            x_adv = x + self.start_std * jax.random.normal(jax.random.fold_in(key, restart),
                                                           x.shape, x.dtype)
        elif self.random_start and self.norm == "l2":
            x_adv = core.l2_start(jax.random.fold_in(key, restart), x, eps)
        elif self.random_start:
            noise = jax.random.uniform(jax.random.fold_in(key, restart), x.shape, x.dtype,
                                       -1.0, 1.0) * eps
            x_adv = core.project_linf(x + noise, x, eps)
        state = {"x_adv": x_adv, "eps": jnp.asarray(eps, x.dtype),
                 "alpha": jnp.asarray(alpha, x.dtype)}
        if self._reads_clean:
            state["clean_logits"] = jax.lax.stop_gradient(logits_fn(x))
        return state

    @property
    def _reads_clean(self) -> bool:
        return callable(self.loss) and self.loss_reads_clean

    def step(self, logits_fn, state, x, y):
        loss = self.loss if callable(self.loss) else core.loss_fn(self.loss)
        args = (y, state["clean_logits"]) if self._reads_clean else (y,)
        _, grad, _ = core.loss_and_grad(logits_fn, loss, state["x_adv"], *args)
        x_adv = state["x_adv"] + state["alpha"] * core.ascent_direction(grad, self.norm)
        return dict(state, x_adv=core.project(x_adv, x, state["eps"], self.norm))

    def finish(self, logits_fn, state, x, y):
        return state["x_adv"]

    def __call__(self, logits_fn, x, y, key, scale=1.0):
        """The whole attack in one compiled loop; returns stop_gradient(x_adv)."""
        return core.run(self, logits_fn, x, y, key, scale)


def fgsm(logits_fn, x, y, key=None, *, epsilon: float, loss: str = "ce"):
    """One signed-gradient step of size epsilon from x (Goodfellow et al.)."""
    return Pgd(epsilon, epsilon, 1, random_start=False, loss=loss)(logits_fn, x, y, key)


def pgd(logits_fn, x, y, key, *, epsilon: float, step_size: float, num_steps: int,
        random_start: bool = True, loss: str = "ce", unroll: int = 1):
    """L-inf PGD in one `lax.fori_loop`; see `Pgd`. Returns stop_gradient(x_adv)."""
    return Pgd(epsilon, step_size, num_steps, random_start, loss, 1, unroll)(
        logits_fn, x, y, key)


def pgd_restarts(logits_fn, x, y, key, *, restarts: int = 1, **pgd_kwargs):
    """PGD with `restarts` random starts; per example the first start that fools the
    model (else the last). For evaluation, where the worst case matters."""
    return Pgd(restarts=restarts, **pgd_kwargs)(logits_fn, x, y, key)
