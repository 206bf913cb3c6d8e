"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), L-inf
and L2.

FAB looks for the adversarial point of minimal norm: each step linearises the
decision boundary between the true class y and a target class t at the current iterate,
projects both the iterate and the clean point onto that hyperplane (within [0, 1]), and
moves to a convex combination of the two projections, overshot by `eta`. An iterate that
fools the model is recorded if it is the closest so far and then pulled back towards x by
`beta`. The attack succeeds on a point when the closest adversarial found lies within
epsilon.

Follows AutoAttack's reference (`fab_base.py` attack_single_run / perturb, targeted
branch; `fab_pt.py` get_diff_logits_grads_batch_targeted; `fab_projections.py`
projection_linf, projection_l2) step for step, as the standard version runs it (n_iter=100,
alpha_max=0.1, eta=1.05, beta=0.9, 9 target classes, one run each):
- the target of run r is the clean logits' (r % n_target_classes + 2)-th largest class;
- per step: f = z_t - z_y and its input gradient g (one forward and one backward pass);
  the hyperplane {z : g.z = g.x1 - f}; d1, d2 = projection_linf of x1 and of x onto it;
  alpha = clip(|d1|_inf / (|d1|_inf + |d2|_inf), 0, alpha_max) (norms floored at 1e-8);
  x1 <- clip((x1 + eta d1)(1 - alpha) + (x + eta d2) alpha, 0, 1);
- success is untargeted (argmax != y, as the reference); a fooling iterate is kept when
  its norm is below the best so far, and every fooling iterate is shrunk:
  x1 <- x + beta (x1 - x);
- only points the model classifies correctly at x are attacked; the result of a run is the
  closest adversarial where its norm is <= epsilon (the reference's perturb drops those
  with norm > epsilon), else x itself: always inside the eps-ball and [0, 1].
- no random start on a target's first run; runs r >= n_target_classes (the reference's
  restarts within a target class, `use_rand_start=(counter > 0)`) start at
  x + eps/2 * u / |u|, clipped to [0, 1]: L-inf u uniform in [-1, 1]^d, L2 u normal.
- L2 (`norm='l2'`): the same steps with projection_l2, the L2 norm of d1 and d2 in
  alpha, and the L2 norm of the closest adversarial.

Deliberate differences, none changing a result in exact arithmetic:
- fixed shapes: every point of the batch is iterated and masked (the reference gathers
  the correctly classified points and the fooling iterates); per-example branches of the
  projection are `jnp.where`s over all rows, its Newton steps a loop until every row is
  solved. Every run costs the whole batch it is given; per step, one forward + backward,
  one forward and the projection of 2 x batch rows.
- the projection finds lam by Newton's method instead of sorting the p_i (same lam to
  rounding; see `projection_linf`).
- the runs are ordered run r = (restart r // n_target_classes, target r % n_target_classes)
  where the reference loops targets outside restarts: with one restart per target (the
  standard version) the order is the same.
- the projection's final masks are `jnp.where` rather than products, so a non-finite
  value in a discarded branch cannot leak (the reference would give NaN there).
- the reference's untargeted branch (all classes' gradients) is not implemented.
"""
import dataclasses

import jax
import jax.numpy as jnp

from robust_admm.attacks import core

NO_ADVERSARIAL = 1e10  # the reference's initial "best norm": no adversarial found yet
MIN_STEP_NORM = 1e-8   # floor of |d|_inf in the step-mixing weight alpha


# ----------------------------------------------------------------------------- projection

def projection_linf(points, w, b):
    """Per row, the smallest-L-inf step d with w.(points + d) = b and points + d in
    [0, 1]^D; where the box cannot reach the hyperplane, the full step to the box corner
    that gets closest to it. points, w: (N, D); b: (N,); returns d (N, D).

    The reference's algorithm: orient the hyperplane so that w.t >= b (the step lowers
    w.z); with budget lam each coordinate moves by -sign(w_i) min(lam, p_i), p_i its
    distance to the box face it moves towards, so the step must reach
    g(lam) = sum |w_i| min(lam, p_i) = w.t - b, with g piecewise linear, increasing and
    concave. The reference sorts the p_i and bisects over the pieces; sorting 2 x batch
    rows of D pixels dominated the step on CPU, so here lam is found by Newton's method
    from lam = 0 instead: on the piece at lo (the p_i <= lo capped) the tangent gives
    lam = (w.t - b - sum_capped |w_i| p_i) / sum_free |w_i|, which concavity keeps at or
    below the root; when no p_i lies in (lo, lam) it is the root, exactly as the
    reference solves it on its piece, else lo moves to lam, past at least one p_i. Rows
    iterate until all are solved (a few steps on FAB's hyperplanes; at most D + 1)."""
    t = points
    dtype = t.dtype
    sign = jnp.where((w * t).sum(1) - b >= 0, 1.0, -1.0).astype(dtype)
    w, b = w * sign[:, None], b * sign
    nonzero = w != 0
    a = (w < 0).astype(dtype)                     # 1 where the step raises the coordinate
    d_box = jnp.where(nonzero, a - t, 0.0)        # the full step to the box face
    p = jnp.where(nonzero, a - t * (2 * a - 1), 0.0)  # |d_box|
    aw = jnp.abs(w)
    awp = aw * p
    need = ((w * t).sum(1) - b)[:, None]          # what g(lam) must reach (>= 0)
    feasible = need[:, 0] < awp.sum(1)            # the box reaches the hyperplane

    def tangent(lo):
        """lam where the tangent of g at lo reaches `need`, and whether it is the root."""
        capped = p <= lo
        free = jnp.where(capped, 0.0, aw).sum(1, keepdims=True)
        lam = ((need - jnp.where(capped, awp, 0.0).sum(1, keepdims=True))
               / jnp.where(free > 0, free, 1.0))
        return lam, ~((p > lo) & (p < lam)).any(1, keepdims=True)

    def newton_step(state):
        lo, lam, solved = state
        lo = jnp.where(solved, lo, lam)
        lam_next, exact = tangent(lo)
        return lo, jnp.where(solved, lam, lam_next), solved | exact

    lo = jnp.zeros_like(need)
    lam, exact = tangent(lo)
    # Rows the box cannot bring to the hyperplane take the full step: nothing to solve.
    _, lam, _ = jax.lax.while_loop(lambda s: ~s[2].all(), newton_step,
                                   (lo, lam, exact | ~feasible[:, None]))
    lam = jnp.clip(lam, 0.0, p.max(1, keepdims=True))
    d_piece = jnp.where(a > 0, jnp.minimum(lam, d_box), jnp.maximum(-lam, d_box))
    return jnp.where(nonzero & feasible[:, None], d_piece, d_box)

NEGLIGIBLE_WEIGHT = 1e-8  # projection_l2: coordinates with |w_i| below it never move


def projection_l2(points, w, b):
    """Per row, the smallest-L2 step d with w.(points + d) = b and points + d in
    [0, 1]^D; where the box cannot reach the hyperplane, the full step to the box corner
    that gets closest to it. points, w: (N, D); b: (N,); returns d (N, D).

    The reference's `projection_l2`, the same solution: orient the hyperplane so that
    c = w.t - b >= 0; by the KKT conditions the step is d_i = clip(-alpha w_i, -t_i,
    1 - t_i) for the alpha >= 0 at which w.d = -c, where the reduction
    h(alpha) = sum |w_i| min(alpha |w_i|, p_i) (p_i: the distance to the face coordinate i
    moves towards) is piecewise linear and increasing, with a breakpoint at each
    r_i = p_i / |w_i|. The breakpoints are sorted, h is evaluated at every one, and
    alpha is solved exactly on its piece."""
    t = points
    dtype = t.dtype
    c = (w * t).sum(1) - b
    sign = jnp.where(c >= 0, 1.0, -1.0).astype(dtype)
    w, c = w * sign[:, None], c * sign
    moves = jnp.abs(w) >= NEGLIGIBLE_WEIGHT
    aw = jnp.where(moves, jnp.abs(w), 0.0)
    p = jnp.where(w > 0, t, 1.0 - t)                  # room towards the face it moves to
    d_box = jnp.where(moves, jnp.where(w > 0, -t, 1.0 - t), 0.0)  # the full step
    feasible = c <= (aw * p).sum(1)                   # the box reaches the hyperplane
    r = jnp.where(moves, p / jnp.where(moves, aw, 1.0), jnp.inf)
    order = jnp.argsort(r, axis=1)
    take = lambda v: jnp.take_along_axis(v, order, axis=1)
    rs, capped_sum, w2_sum = take(r), jnp.cumsum(take(aw * p), 1), jnp.cumsum(take(aw * aw), 1)
    w2_total = w2_sum[:, -1:]
    # h at each breakpoint rs_k: the coordinates up to k capped, the rest at rs_k |w_i|.
    h = capped_sum + jnp.where(jnp.isfinite(rs), rs, 0.0) * (w2_total - w2_sum)
    k = (h < c[:, None]).sum(1, keepdims=True)        # alpha lies on the piece before rs_k
    before = lambda v: jnp.where(k > 0, jnp.take_along_axis(v, jnp.maximum(k - 1, 0), 1), 0.0)
    free = w2_total - before(w2_sum)
    alpha = (c[:, None] - before(capped_sum)) / jnp.where(free > 0, free, 1.0)
    d_piece = jnp.where(moves, jnp.clip(-alpha * w, -t, 1.0 - t), 0.0)
    # c above h at every breakpoint: every coordinate is capped, the full step. `feasible`
    # can still hold there, when the hyperplane touches the box at its far corner and the
    # sorted cumulative sum rounds below the unsorted one (then free = 0, alpha ~ 0).
    on_a_piece = feasible & (k[:, 0] < t.shape[1])
    return jnp.where(on_a_piece[:, None], d_piece, d_box)


# ----------------------------------------------------------------------------- pieces

def target_class(logits, restart: int, n_target_classes: int):
    """Run `restart`'s target: the (restart % n_target_classes + 2)-th largest logit."""
    if n_target_classes + 1 > logits.shape[-1]:
        raise ValueError(f"FAB-T: n_target_classes={n_target_classes} needs more than "
                         f"{logits.shape[-1]} classes")
    rank = restart % n_target_classes + 2
    return jnp.argsort(logits, axis=1)[:, -rank]


def diff_logits_and_grad(logits_fn, x1, y, target):
    """f = z_target - z_y per example and its input gradient: one forward, one backward
    (of the sum; the examples are independent)."""
    def total(xa):
        logits = logits_fn(xa)
        take = lambda idx: jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]
        diff = take(target) - take(y)
        return diff.sum(), diff

    grad, diff = jax.grad(total, has_aux=True)(x1)
    return diff, grad


def linf_norm(v):
    """Per-example max |v|: (batch, ...) -> (batch,)."""
    return jnp.abs(v.reshape(v.shape[0], -1)).max(axis=1)


# ----------------------------------------------------------------------------- the attack

@dataclasses.dataclass(frozen=True)
class FabT(core.Attack):
    """Targeted FAB, L-inf or L2. `restarts` counts every run: a multiple of
    `n_target_classes`, the runs cycling through the target classes (AutoAttack's
    standard FAB-T: `FabT(eps)`, 9 targets, 100 iterations, one run per target)."""

    keeps_best = True

    epsilon: float
    num_steps: int = 100
    n_target_classes: int = 9
    restarts: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    norm: str = "linf"  # 'linf' | 'l2' (the projection, the step sizes, the best norm)

    def __post_init__(self):
        core.check_arguments("FAB-T", epsilon=self.epsilon, num_steps=self.num_steps,
                             restarts=self.restarts)
        core.check_norm("FAB-T", self.norm)
        if self.n_target_classes < 1 or self.restarts % self.n_target_classes:
            raise ValueError(
                f"FAB-T: n_target_classes={self.n_target_classes} must be >= 1 and divide "
                f"restarts={self.restarts} (the runs cycle through the target classes)")

    @property
    def is_identity(self) -> bool:
        return self.num_steps == 0 or self.epsilon == 0

    def init(self, logits_fn, x, y, key, restart: int = 0, scale=1.0):
        eps = jnp.asarray(self.epsilon * scale, x.dtype)
        logits = logits_fn(x)
        x1 = x
        # A later run of the same target starts at random; a traced run index (one
        # program for every run) picks between the two where such runs exist.
        static = isinstance(restart, int)
        if (restart >= self.n_target_classes if static
                else self.restarts > self.n_target_classes):
            k = jax.random.fold_in(key, restart)
            if self.norm == "linf":
                u = jax.random.uniform(k, x.shape, x.dtype, -1.0, 1.0)
            else:
                u = jax.random.normal(k, x.shape, x.dtype)
            start = jnp.clip(x + eps * u / core.per_example(self.size(u), u) * 0.5, 0.0, 1.0)
            x1 = start if static else jnp.where(restart >= self.n_target_classes, start, x)
        return {
            "eps": eps,
            "target": target_class(logits, restart, self.n_target_classes),
            "attacked": logits.argmax(-1) == y,  # the reference attacks only these
            "x1": x1,
            "x_best": x,
            "norm_best": jnp.full((x.shape[0],), NO_ADVERSARIAL, x.dtype),
        }

    def size(self, v):
        """Per-example norm of the threat model: (batch, ...) -> (batch,)."""
        return linf_norm(v) if self.norm == "linf" else core.l2_norm(v)

    def step(self, logits_fn, s, x, y):
        batch = x.shape[0]
        pe = lambda v: core.per_example(v, x)
        x1 = s["x1"]
        diff, grad = diff_logits_and_grad(logits_fn, x1, y, s["target"])
        # The linearised boundary {z : w.z = b}; project x1 and x onto it.
        w = grad.reshape(batch, -1)
        b = -diff + (w * x1.reshape(batch, -1)).sum(1)
        project = projection_linf if self.norm == "linf" else projection_l2
        d = project(jnp.concatenate([x1.reshape(batch, -1), x.reshape(batch, -1)]),
                    jnp.concatenate([w, w]), jnp.concatenate([b, b]))
        size = jnp.maximum(self.size(d), MIN_STEP_NORM)
        alpha = jnp.clip(size[:batch] / (size[:batch] + size[batch:]), 0.0, self.alpha_max)
        d1, d2 = d[:batch].reshape(x.shape), d[batch:].reshape(x.shape)
        x1 = jnp.clip((x1 + self.eta * d1) * (1 - pe(alpha)) + (x + d2 * self.eta) * pe(alpha),
                      0.0, 1.0)
        # Record the closest fooling iterate; pull every fooling iterate back towards x.
        fooled = logits_fn(x1).argmax(-1) != y
        norm = self.size(x1 - x)
        closer = fooled & (norm < s["norm_best"])
        return dict(
            s,
            x_best=jnp.where(pe(closer), x1, s["x_best"]),
            norm_best=jnp.where(closer, norm, s["norm_best"]),
            x1=jnp.where(pe(fooled), x + (x1 - x) * self.beta, x1))

    def finish(self, logits_fn, s, x, y):
        """The closest adversarial where it lies within epsilon, else x."""
        found = s["attacked"] & (s["norm_best"] <= s["eps"])
        return jnp.where(core.per_example(found, x), s["x_best"], x)

    def __call__(self, logits_fn, x, y, key, scale=1.0):
        """The whole attack in one compiled loop; returns stop_gradient(x_adv)."""
        return core.run(self, logits_fn, x, y, key, scale)
