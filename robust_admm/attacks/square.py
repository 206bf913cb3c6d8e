"""Square attack (Andriushchenko et al., ECCV 2020), L-inf and L2: score-based random
search.

Follows AutoAttack's `square.py` (`attack_single_run` for Linf, `p_selection`,
`margin_and_loss`, `perturb`) as its standard version runs it: p_init = 0.8, 5,000
queries, one restart, margin loss, untargeted, `resc_schedule=False`. Exactly as there:
- start: vertical stripes, clip(x + eps * sign, 0, 1) with one random sign per example,
  channel and column (constant down the rows); one query.
- iteration i (i = 0..num_steps-1, one query per example): a square of side
  s(i) = min(max(round(sqrt(p(i) * h * w)), 1), min(h, w)), p(i) the published schedule
  (p_init at i <= 10, halving after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000);
  its corner (r, c) drawn uniformly from [0, h - s) x [0, w - s) (the reference's
  `random_int` never reaches h - s; 0 when s = h) and one random sign per channel. The
  window AND the signs are drawn once per iteration and shared by the whole batch, as in
  the reference. The candidate is P(x_best + 2 eps * sign * window) (P: the eps-ball,
  then [0, 1]), i.e. the window set to the vertex x +- eps.
- acceptance per example: loss_min takes the candidate's loss where it is strictly
  lower; x_best and margin_min take the candidate where the loss is lower or the
  candidate is misclassified (margin <= 0). margin = z_y - max_{k != y} z_k; the loss is
  the margin ('margin', the default) or -CE ('ce').
- only points with margin_min > 0 are searched: the others are frozen (their state does
  not change), as the reference's `idx_to_fool`; its early exits change nothing else.
- points misclassified at x are not attacked: they keep x and spend no query, as
  `perturb`, which runs `attack_single_run` only on the points classified correctly.
- `num_steps` is the reference's `n_queries`: it runs that many iterations after the
  start, so an example spends at most num_steps + 1 queries (plus the clean check).

Deliberate differences (fixed shapes, JAX randomness):
- every example is evaluated at every step; frozen ones are masked out with jnp.where.
- random numbers come from `jax.random` (restart r from `fold_in(key, r)`, iteration i
  from `fold_in(step_key, i)`), not torch's stream: same distributions, other draws.
- `finish` returns x_best for every example; the reference's `perturb` returns x for the
  points it did not fool. Both are classified correctly there (margin_min > 0), so robust
  accuracy is the same; x_best is the lowest-margin point found, more useful downstream.
- AutoAttack's L-inf version does not re-draw a window whose new signs equal the current
  ones (the original Square repository does): nor do we, so such a step is a wasted query
  in both.

L2 (`norm='l2'`), the reference's L2 branch: the start tiles the image with side-h//5
squares, each the `eta` pattern (two halves of nested squares of opposite sign, unit
norm, randomly transposed) times a random sign per example and channel, scaled to norm
eps; each step moves the energy of a second window into the first and renews the first
with a new pattern (`l2_candidate`); the side is at least 3 and odd. Acceptance,
freezing and query counts as in L-inf. The patterns are computed from iota arithmetic
(fixed shapes for a traced side).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from robust_admm.attacks import core

# The published schedule: p = p_init / 2**k for an iteration index in the k-th interval.
P_BOUNDARIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(it: int, p_init: float = 0.8, n_queries: int = 5000,
                rescale: bool = False) -> float:
    """Fraction of the image the square covers at iteration `it` (the reference's
    `p_selection`; `rescale` maps `it` onto a 10,000-query budget first)."""
    if rescale:
        it = int(it / n_queries * 10000)
    halvings = sum(it > b for b in P_BOUNDARIES)
    return p_init / 2 ** halvings


@functools.lru_cache(maxsize=64)
def square_sides(num_steps: int, h: int, w: int, c: int, p_init: float = 0.8,
                 rescale: bool = False, norm: str = "linf") -> np.ndarray:
    """Side of the square at each iteration 0..num_steps-1 (int32, read-only), computed
    with the reference's float expression and Python's round (half to even); L2: at
    least 3 and odd (then capped by the image)."""
    n_features = c * h * w
    sides = np.empty(max(num_steps, 1), np.int32)
    for i in range(len(sides)):
        p = p_selection(i, p_init, num_steps, rescale)
        s = max(int(round(math.sqrt(p * n_features / c))), 1 if norm == "linf" else 3)
        if norm == "l2" and s % 2 == 0:
            s += 1
        sides[i] = min(s, min(h, w))
    sides.flags.writeable = False
    return sides


def typed_key(key):
    """A scalar typed PRNG key from a raw (2,) uint32 key or a typed one: the state's
    arrays must be scalars or batch-first."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def stripes_start(key, x, eps):
    """The reference's start: clip(x + eps * sign, 0, 1), one sign per example, column
    and channel (NHWC: shape (batch, 1, w, c), constant down the rows)."""
    b, _, w, c = x.shape
    signs = jax.random.rademacher(key, (b, 1, w, c), x.dtype)
    return jnp.clip(x + eps * signs, 0.0, 1.0)


def window_mask(top, left, side, h: int, w: int):
    """(h, w) bool mask of rows [top, top + side) x cols [left, left + side), from iota
    comparisons (fixed shape whatever the side)."""
    rows = jnp.arange(h)
    cols = jnp.arange(w)
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    return in_rows[:, None] & in_cols[None, :]


def square_delta(key, side, shape, eps, dtype):
    """The step's perturbation, shared by the batch: 2 * eps * (one sign per channel) on
    a side x side window at a uniform corner in [0, h - side) x [0, w - side), 0
    elsewhere; shape (h, w, c)."""
    h, w, c = shape
    k_top, k_left, k_sign = jax.random.split(key, 3)
    top = jax.random.randint(k_top, (), 0, jnp.maximum(h - side, 1))
    left = jax.random.randint(k_left, (), 0, jnp.maximum(w - side, 1))
    signs = jax.random.rademacher(k_sign, (c,), dtype)
    mask = window_mask(top, left, side, h, w)
    return jnp.where(mask[:, :, None], 2 * eps * signs, jnp.zeros((), dtype))


# ----------------------------------------------------------------------------- L2

def _centred_squares(rows, cols, n_rows, n_cols):
    """The reference's `eta_rectangles(n_rows, n_cols)` at (rows, cols) (arrays, any
    shape; valid where 0 <= rows < n_rows, 0 <= cols < n_cols), not yet normalised:
    nested squares about the centre (n_rows // 2, n_cols // 2), the k-th (k = 0, 1, ...)
    adding 1 / (k + 1)^2 within Chebyshev distance k, so a point at distance d holds
    sum_{k = d}^{m - 1} 1 / (k + 1)^2, m = max(n_rows // 2 + 1, n_cols // 2 + 1)."""
    d = jnp.maximum(jnp.abs(rows - n_rows // 2), jnp.abs(cols - n_cols // 2))
    m = jnp.maximum(n_rows // 2 + 1, n_cols // 2 + 1)
    # sum_{k=d}^{m-1} 1/(k+1)^2 = S(m) - S(d), S(j) = sum_{k<j} 1/(k+1)^2 (j <= MAX_SIDE).
    prefix = jnp.concatenate([jnp.zeros(1), jnp.cumsum(1.0 / jnp.arange(1, MAX_SIDE + 1) ** 2)])
    return prefix[jnp.minimum(m, MAX_SIDE)] - prefix[jnp.minimum(d, MAX_SIDE)]


MAX_SIDE = 4096  # the largest square side the L2 patterns are tabulated for


def l2_pattern(side, transpose, h: int, w: int, top=0, left=0):
    """The reference's `eta(side)` placed with its corner at (top, left) on an (h, w)
    canvas, 0 elsewhere: a side x side square of unit L2 norm, its upper side // 2 rows
    the nested squares of eta_rectangles(side // 2, side) (each half normalised), the
    lower rows their negative, the whole transposed where `transpose`. Traced sides and
    corners, fixed shapes (iota arithmetic)."""
    rows = jnp.arange(h)[:, None] - top
    cols = jnp.arange(w)[None, :] - left
    rows, cols = jnp.where(transpose, cols, rows), jnp.where(transpose, rows, cols)
    inside = (rows >= 0) & (rows < side) & (cols >= 0) & (cols < side)
    half = side // 2
    upper = inside & (rows < half)
    lower = inside & (rows >= half)
    a = jnp.where(upper, _centred_squares(rows, cols, half, side), 0.0)
    b = jnp.where(lower, _centred_squares(rows - half, cols, side - half, side), 0.0)
    unit = lambda v: v / jnp.where((v * v).sum() > 0, jnp.sqrt((v * v).sum()), 1.0)
    return unit(unit(a) - unit(b))


def l2_start(key, x, eps):
    """The reference's L2 start: the image tiled with side-s squares (s = h // 5, from
    offset (h - 5 s) // 2), each an eta(s) pattern (its own random transpose) times a
    random sign per example and channel; x_best = clip(x + eps * delta / ||delta||, 0, 1)."""
    b, h, w, c = x.shape
    s = h // 5
    offset = (h - 5 * s) // 2
    tops = [offset + s * i for i in range(h // s)]
    lefts = [offset + s * j for j in range(w // s)]
    k_t, k_s = jax.random.split(key)
    flips = jax.random.bernoulli(k_t, 0.5, (len(tops), len(lefts)))
    signs = jax.random.rademacher(k_s, (len(tops), len(lefts), b, 1, 1, c), x.dtype)
    delta = jnp.zeros_like(x)
    for i, top in enumerate(tops):
        for j, left in enumerate(lefts):
            pattern = l2_pattern(s, flips[i, j], h, w, top, left).astype(x.dtype)
            delta = delta + pattern[None, :, :, None] * signs[i, j]
    return jnp.clip(x + eps * core.l2_normalize(delta), 0.0, 1.0)


def l2_candidate(key, side, x, x_best, eps):
    """One L2 step of the reference: a side x side window W1 takes a new eta(side) pattern
    (random transpose, one random sign per example and channel) plus its old content
    (normalised), rescaled per example and channel so the budget left (eps^2 - ||delta||^2)
    / c plus the energy of W1 and a second window W2 goes into W1; W2 is zeroed; then the
    whole perturbation is scaled to norm eps and clipped to the box. Windows, transpose
    and signs' distribution as the reference (windows shared by the batch)."""
    b, h, w, c = x.shape
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
    corner = lambda k, size: jax.random.randint(k, (), 0, jnp.maximum(size - side, 1))
    top1, left1, top2, left2 = corner(k1, h), corner(k2, w), corner(k3, h), corner(k4, w)
    w1 = window_mask(top1, left1, side, h, w)[None, :, :, None]
    w2 = window_mask(top2, left2, side, h, w)[None, :, :, None]
    delta = x_best - x
    norm_of = lambda v: jnp.sqrt((v * v).sum(axis=(1, 2), keepdims=True))  # per (n, c)
    norm_w1 = norm_of(jnp.where(w1, delta, 0.0))
    norm_windows = norm_of(jnp.where(w1 | w2, delta, 0.0))
    norm_image = core.per_example(core.l2_norm(delta), x)
    pattern = l2_pattern(side, jax.random.bernoulli(k5, 0.5), h, w, top1, left1)
    signs = jax.random.rademacher(k6, (b, 1, 1, c), x.dtype)
    new = pattern[None, :, :, None].astype(x.dtype) * signs
    new = new + jnp.where(w1, delta, 0.0) / (1e-12 + norm_w1)
    scale = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
    new = new / (1e-12 + norm_of(new)) * scale
    delta = jnp.where(w1, new, jnp.where(w2, 0.0, delta))
    return jnp.clip(x + eps * core.l2_normalize(delta), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Square(core.Attack):
    """L-inf Square attack, as AutoAttack's standard version (module docstring).
    `num_steps` = the reference's `n_queries` (iterations after the start)."""

    keeps_best = True

    epsilon: float
    num_steps: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    loss: str = "margin"
    rescale_schedule: bool = False
    norm: str = "linf"  # 'linf' | 'l2' (the reference's L2 start and windows)

    def __post_init__(self):
        if self.loss not in ("margin", "ce"):
            raise ValueError(f"Square loss={self.loss!r}; allowed: 'margin', 'ce'")
        core.check_norm("Square", self.norm)
        core.check_arguments("Square", epsilon=self.epsilon, num_steps=self.num_steps,
                             restarts=self.restarts)
        if not 0 < self.p_init <= 1:
            raise ValueError(f"Square: p_init={self.p_init!r} (allowed: 0 < p_init <= 1)")

    @property
    def is_identity(self) -> bool:
        # The start alone is an attack (one query), so only epsilon 0 cannot move x.
        return self.epsilon == 0

    def margin_and_loss(self, logits, y):
        """(margin, loss), both minimised: margin z_y - max_{k != y} z_k, and the margin
        or -CE as the search's loss (the reference's untargeted `margin_and_loss`)."""
        margin = -core.margin_loss(logits, y)
        loss = margin if self.loss == "margin" else -core.ce_loss(logits, y)
        return margin, loss

    def init(self, logits_fn, x, y, key, restart: int = 0, scale=1.0):
        eps = jnp.asarray(self.epsilon * scale, x.dtype)
        k_start, k_steps = jax.random.split(jax.random.fold_in(typed_key(key), restart))
        clean_logits = logits_fn(x)
        clean_margin, clean_loss = self.margin_and_loss(clean_logits, y)
        clean_ok = clean_logits.argmax(-1) == y
        x_start = (stripes_start if self.norm == "linf" else l2_start)(k_start, x, eps)
        margin, loss = self.margin_and_loss(logits_fn(x_start), y)
        # Points misclassified at x keep x, frozen (margin <= 0), as `perturb` skips them.
        return {
            "i": jnp.zeros((), jnp.int32),
            "eps": eps,
            "key": k_steps,
            "x_best": jnp.where(core.per_example(clean_ok, x), x_start, x),
            "margin_min": jnp.where(clean_ok, margin, jnp.minimum(clean_margin, 0.0)),
            "loss_min": jnp.where(clean_ok, loss, clean_loss),
            "queries": clean_ok.astype(jnp.int32),
        }

    def step(self, logits_fn, s, x, y):
        i, eps = s["i"], s["eps"]
        _, h, w, c = x.shape
        sides = jnp.asarray(square_sides(self.num_steps, h, w, c, self.p_init,
                                         self.rescale_schedule, self.norm))
        side = sides[jnp.minimum(i, sides.shape[0] - 1)]
        key = jax.random.fold_in(s["key"], i)
        if self.norm == "linf":
            delta = square_delta(key, side, (h, w, c), eps, x.dtype)
            x_new = core.project_linf(s["x_best"] + delta, x, eps)
        else:
            x_new = l2_candidate(key, side, x, s["x_best"], eps)
        margin, loss = self.margin_and_loss(logits_fn(x_new), y)
        active = s["margin_min"] > 0
        improved = active & (loss < s["loss_min"])
        accept = improved | (active & (margin <= 0))
        return dict(
            s, i=i + 1,
            x_best=jnp.where(core.per_example(accept, x), x_new, s["x_best"]),
            margin_min=jnp.where(accept, margin, s["margin_min"]),
            loss_min=jnp.where(improved, loss, s["loss_min"]),
            queries=s["queries"] + active.astype(jnp.int32))

    def finish(self, logits_fn, state, x, y):
        return state["x_best"]

    def __call__(self, logits_fn, x, y, key, scale=1.0):
        """The whole attack in one compiled loop; returns stop_gradient(x_adv)."""
        return core.run(self, logits_fn, x, y, key, scale)
