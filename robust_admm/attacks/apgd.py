"""APGD (Croce & Hein, ICML 2020): step-size-free PGD with momentum, L-inf or L2.

Follows the paper and its reference implementation (AutoAttack's `autopgd_base.py`):
- start: x + eps * t / max|t|, t uniform in [-1, 1]^d (restart r draws with
  `fold_in(key, r)`), clipped to [0, 1]; step size 2 * eps per example. L2: x + eps *
  t / ||t||_2, t Gaussian, clipped; steps along grad / ||grad||_2 and P the reference's
  L2 shrink then clip (`core.project_l2`).
- step k: z = P(x_k + eta * sign(grad)); x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k -
  x_{k-1})) with momentum a = 0.75 (1 on the first step).
- checkpoints at the published fractions (the first after 22% of the iterations, then
  intervals shrinking by 3% down to 6%): the step size halves for an example if its loss
  rose in at most 75% of the steps since the last checkpoint, or if it was not halved at
  the last checkpoint and its best loss has not improved since; a halved example restarts
  from its best point (and that point's gradient).
- best-point tracking: the highest-loss point (for the checkpoints), and the last
  iterate that fooled the model (the result; the start where none did).

`ApgdCe` maximises cross-entropy (or untargeted DLR); `ApgdT` the targeted DLR loss with
run r aimed at the clean logits' (r % n_target_classes + 2)-th largest class, as
AutoAttack's APGD-T (9 target classes, one run of 100 iterations each). As in the reference, the
oscillation count at the first checkpoint reaches one entry before the history
(compared with 0): kept, so that results match it.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from robust_admm.attacks import core

MOMENTUM = 0.75
RHO = 0.75  # oscillation threshold: fraction of steps that must raise the loss


def checkpoint_schedule(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(is_checkpoint[i], window[i]) for iterations i = 0..num_steps-1: whether the step
    size is checked after iteration i, and over how many past steps."""
    first = max(int(0.22 * num_steps), 1)
    smallest = max(int(0.06 * num_steps), 1)
    decrease = max(int(0.03 * num_steps), 1)
    is_check = np.zeros(num_steps, bool)
    window = np.zeros(num_steps, np.int32)
    k, counter = first, 0
    for i in range(num_steps):
        counter += 1
        if counter == k:
            is_check[i], window[i] = True, k
            k, counter = max(k - decrease, smallest), 0
    return is_check, window


@dataclasses.dataclass(frozen=True)
class Apgd(core.Attack):
    """APGD on a per-example loss; subclasses say which loss and its extra argument."""

    keeps_best = True

    epsilon: float
    num_steps: int = 100
    restarts: int = 1
    norm: str = "linf"  # 'linf' | 'l2'

    def __post_init__(self):
        core.check_arguments("APGD", epsilon=self.epsilon, num_steps=self.num_steps,
                             restarts=self.restarts)
        core.check_norm("APGD", self.norm)

    @property
    def is_identity(self) -> bool:
        return self.num_steps == 0 or self.epsilon == 0

    def loss(self, logits, y, target):
        raise NotImplementedError

    def target(self, logits_fn, x, y, restart: int):
        """The loss's extra per-example argument (a target class), or y."""
        return y

    def _loss_and_grad(self, logits_fn, x_adv, y, target):
        return core.loss_and_grad(logits_fn, lambda lg, yy, t: self.loss(lg, yy, t),
                                  x_adv, y, target)

    def init(self, logits_fn, x, y, key, restart: int = 0, scale=1.0):
        eps = jnp.asarray(self.epsilon * scale, x.dtype)
        if self.norm == "l2":
            x_adv = core.l2_start(jax.random.fold_in(key, restart), x, eps)
        else:
            t = jax.random.uniform(jax.random.fold_in(key, restart), x.shape, x.dtype,
                                   -1.0, 1.0)
            t_max = jnp.abs(t.reshape(t.shape[0], -1)).max(axis=1)
            x_adv = jnp.clip(x + eps * t / (core.per_example(t_max, t) + 1e-12), 0.0, 1.0)
        target = self.target(logits_fn, x, y, restart)
        loss, grad, logits = self._loss_and_grad(logits_fn, x_adv, y, target)
        batch = x.shape[0]
        return {
            "i": jnp.zeros((), jnp.int32),
            "eps": eps,
            "target": target,
            "x_adv": x_adv,
            "x_prev": x_adv,
            "grad": grad,
            "step_size": jnp.full((batch,), 2.0, x.dtype) * eps,
            "x_best": x_adv,
            "grad_best": grad,
            "loss_best": loss,
            "x_fooled": x_adv,
            "fooled": logits.argmax(-1) != y,
            # Losses of every iteration, batch-first; read as a ring so the reference's
            # look one entry before the first (a zero) is reproduced.
            "loss_steps": jnp.zeros((batch, max(self.num_steps, 1)), x.dtype),
            "loss_best_last_check": loss,
            "reduced_last_check": jnp.ones((batch,), bool),
        }

    def step(self, logits_fn, s, x, y):
        i, eps, n = s["i"], s["eps"], self.num_steps
        pe = lambda v: core.per_example(v, x)
        # The gradient step with momentum.
        a = jnp.where(i > 0, MOMENTUM, 1.0).astype(x.dtype)
        direction = core.ascent_direction(s["grad"], self.norm)
        z = core.project(s["x_adv"] + pe(s["step_size"]) * direction, x, eps, self.norm)
        x_adv = core.project(
            s["x_adv"] + (z - s["x_adv"]) * a + (s["x_adv"] - s["x_prev"]) * (1 - a), x, eps,
            self.norm)
        x_prev = s["x_adv"]
        loss, grad, logits = self._loss_and_grad(logits_fn, x_adv, y, s["target"])
        # Best points.
        fooled_now = logits.argmax(-1) != y
        x_fooled = jnp.where(pe(fooled_now), x_adv, s["x_fooled"])
        improved = loss > s["loss_best"]
        x_best = jnp.where(pe(improved), x_adv, s["x_best"])
        grad_best = jnp.where(pe(improved), grad, s["grad_best"])
        loss_best = jnp.where(improved, loss, s["loss_best"])
        loss_steps = s["loss_steps"].at[:, i].set(loss)
        # The step-size check, where this iteration is a checkpoint.
        is_check_np, window_np = checkpoint_schedule(n)
        is_check = jnp.asarray(is_check_np)[i]
        k = jnp.asarray(window_np)[i]
        back = jnp.arange(n)  # c: compare loss[i - c] > loss[i - c - 1], c < k
        cur = jnp.take(loss_steps, (i - back) % n, axis=1)
        prev = jnp.take(loss_steps, (i - back - 1) % n, axis=1)
        rises = ((cur > prev) & (back < k)).sum(axis=1)
        oscillating = rises <= k * RHO
        no_improvement = ~s["reduced_last_check"] & (s["loss_best_last_check"] >= loss_best)
        reduce = is_check & (oscillating | no_improvement)
        step_size = jnp.where(reduce, s["step_size"] / 2.0, s["step_size"])
        x_adv = jnp.where(pe(reduce), x_best, x_adv)
        grad = jnp.where(pe(reduce), grad_best, grad)
        return dict(
            s, i=i + 1, x_adv=x_adv, x_prev=x_prev, grad=grad, step_size=step_size,
            x_best=x_best, grad_best=grad_best, loss_best=loss_best, x_fooled=x_fooled,
            fooled=s["fooled"] | fooled_now, loss_steps=loss_steps,
            loss_best_last_check=jnp.where(is_check, loss_best, s["loss_best_last_check"]),
            reduced_last_check=jnp.where(is_check, reduce, s["reduced_last_check"]))

    def finish(self, logits_fn, s, x, y):
        return s["x_fooled"]


@dataclasses.dataclass(frozen=True)
class ApgdCe(Apgd):
    """APGD-CE (AutoAttack's first attack); `loss='dlr'` gives APGD-DLR."""

    loss_name: str = "ce"

    def __post_init__(self):
        super().__post_init__()
        if self.loss_name not in ("ce", "dlr"):
            raise ValueError(f"APGD loss={self.loss_name!r}; allowed: 'ce', 'dlr'")

    def loss(self, logits, y, target):
        return core.loss_fn(self.loss_name)(logits, y)


@dataclasses.dataclass(frozen=True)
class ApgdT(Apgd):
    """APGD-T: targeted DLR. `restarts` counts every run: a multiple of
    `n_target_classes`, the runs cycling through the target classes."""

    n_target_classes: int = 9
    restarts: int = 9

    def __post_init__(self):
        super().__post_init__()
        if self.n_target_classes < 1 or self.restarts % self.n_target_classes:
            raise ValueError(
                f"APGD-T: n_target_classes={self.n_target_classes} must be >= 1 and divide "
                f"restarts={self.restarts} (the runs cycle through the target classes)")

    def target(self, logits_fn, x, y, restart: int):
        logits = logits_fn(x)
        if self.n_target_classes + 1 > logits.shape[-1]:
            raise ValueError(f"APGD-T: n_target_classes={self.n_target_classes} needs more "
                             f"than {logits.shape[-1]} classes")
        rank = restart % self.n_target_classes + 2  # the rank-th largest clean logit
        return jnp.argsort(logits, axis=1)[:, -rank]

    def loss(self, logits, y, target):
        return core.dlr_targeted_loss(logits, y, target)
