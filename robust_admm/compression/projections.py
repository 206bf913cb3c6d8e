"""Compression sets as exact Euclidean projections, per leaf and over parameter pytrees.

ADMM alternates a gradient step on the weights W with a projection Z = P_S(W + U)
onto the compression set S.  This module provides those projections (and the
boolean masks that say which entries S keeps) for:

* ``irregular`` -- at most k nonzero entries (keep the k of largest magnitude);
* ``filter``    -- k output channels ``w[..., j]`` (largest L2 norm);
* ``column``    -- k rows of ``w.reshape(-1, out)`` (largest L2 norm);
* ``channel``   -- k input channels ``w[..., i, :]`` (axis -2, largest L2 norm);
* ``nm``        -- N:M sparsity along the input-channel axis (axis -2);
* ``quantize``  -- ``alpha * q`` with q on b-bit symmetric integer levels and the
  per-layer scale alpha chosen jointly, optionally restricted to a sparsity mask.

Conventions (Flax): conv kernels are ``(kh, kw, in, out)``, dense kernels
``(in, out)``.  The number of kept units is ``kept_count(n, ratio)`` everywhere.
Ties are broken deterministically: among equal scores the lower (row-major) index
is kept.  The support projections are exact: keeping the k units of largest
energy minimises the removed energy, which is the squared projection distance.

Everything on arrays is pure ``jax.numpy`` and jit-able (kinds, ratios and shapes
are static Python values; only the weights are traced).  Which leaves a rule applies to
is `compression/rules.py`'s business; what a compressed model takes to store,
`compression/size.py`'s.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KINDS",
    "SPARSITY_KINDS",
    "UNIT_KINDS",
    "check_spec",
    "kept_count",
    "project_leaf",
    "quantize_leaf",
]

# The vocabulary of compression sets, defined here only. UNIT_KINDS take a ratio (the
# fraction of units removed): weights, output channels, rows of the (-1, out) view, input
# channels.
UNIT_KINDS = ("irregular", "filter", "column", "channel")
SPARSITY_KINDS = UNIT_KINDS + ("nm",)
KINDS = SPARSITY_KINDS + ("quantize",)
QUANT_METHODS = ("auto", "exact", "grid")
MAX_BITS = 16
# "auto" quantization uses the exact breakpoint sweep while n * levels is at most
# this many events (one sort of that many floats), the grid search above it.
EXACT_QUANT_EVENTS = 1 << 18

_REQUIRED = {
    "irregular": ("ratio",),
    "filter": ("ratio",),
    "column": ("ratio",),
    "channel": ("ratio",),
    "nm": ("n", "m"),
    "quantize": ("bits",),
}
_OPTIONAL = {"quantize": ("sparsity", "ratio", "n", "m", "method")}


# --------------------------------------------------------------------------------------
# Validation (Python level, before any tracing)
# --------------------------------------------------------------------------------------


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_ratio(ratio, where: str = "") -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio):
        raise ValueError(f"{where}ratio={ratio!r} is not allowed: ratio must be a real number in [0, 1)")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{where}ratio={ratio!r} is out of range: ratio must be in [0, 1)")
    return float(ratio)


def kept_count(n: int, ratio: float) -> int:
    """Number of units kept when pruning a fraction ``ratio`` of ``n`` units.

    Defined as ``floor((1 - ratio) * n + 0.5)`` (round half up), clipped to [0, n].
    Every projection and report in the library uses this one formula.
    """
    ratio = _check_ratio(ratio)
    if not is_int(n) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer")
    return min(max(int(math.floor((1.0 - ratio) * int(n) + 0.5)), 0), int(n))


def check_spec(kind, params: Mapping[str, Any], shape=None, where: str = "") -> dict:
    """Validate ``kind`` and its parameters (and the leaf shape if given); return a
    normalised parameter dict.  Raises ValueError naming the bad value."""
    if kind not in KINDS:
        raise ValueError(f"{where}unknown kind {kind!r}; allowed kinds: {', '.join(KINDS)}")
    params = dict(params)
    allowed = _REQUIRED[kind] + _OPTIONAL.get(kind, ())
    extra = sorted(set(params) - set(allowed))
    if extra:
        raise ValueError(
            f"{where}unexpected parameter(s) {extra} for kind {kind!r}; allowed: {list(allowed)}"
        )
    missing = [p for p in _REQUIRED[kind] if p not in params]
    if missing:
        raise ValueError(f"{where}kind {kind!r} needs parameter(s) {missing}")

    out: dict = {}
    if kind == "quantize":
        bits = params["bits"]
        if not is_int(bits) or not 1 <= bits <= MAX_BITS:
            raise ValueError(
                f"{where}bits={bits!r} is not allowed: bits must be an integer in [1, {MAX_BITS}] "
                "(1 = binary {-1,+1}, 2 = ternary {-1,0,1})"
            )
        method = params.get("method", "auto")
        if method not in QUANT_METHODS:
            raise ValueError(f"{where}method={method!r} is not allowed; allowed: {list(QUANT_METHODS)}")
        out.update(bits=int(bits), method=method)
        sparsity = params.get("sparsity")
        if sparsity is None:
            if "ratio" in params:
                sparsity = "irregular"
            elif "n" in params or "m" in params:
                sparsity = "nm"
        if sparsity is not None:
            if sparsity not in SPARSITY_KINDS:
                raise ValueError(
                    f"{where}sparsity={sparsity!r} is not allowed; allowed: {list(SPARSITY_KINDS)}"
                )
            sub = {p: params[p] for p in ("ratio", "n", "m") if p in params}
            out["sparsity"] = sparsity
            out.update(check_spec(sparsity, sub, shape, where))
        return out

    if kind == "nm":
        n, m = params["n"], params["m"]
        if not is_int(m) or m < 1:
            raise ValueError(f"{where}m={m!r} is not allowed: m must be an integer >= 1")
        if not is_int(n) or not 0 <= n <= m:
            raise ValueError(f"{where}n={n!r} is not allowed: n must be an integer in [0, m={m}]")
        out.update(n=int(n), m=int(m))
    else:
        out["ratio"] = _check_ratio(params["ratio"], where)

    if shape is not None and kind != "irregular":
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(
                f"{where}kind {kind!r} needs a kernel with at least 2 dims (in, out); got shape {shape}"
            )
        if kind == "nm" and shape[-2] % out["m"] != 0:
            raise ValueError(
                f"{where}N:M sparsity with m={out['m']} needs the input-channel axis (axis -2) "
                f"to be divisible by m; leaf shape {shape} has length {shape[-2]} there"
            )
    return out


# --------------------------------------------------------------------------------------
# Support projections
# --------------------------------------------------------------------------------------


def _topk_mask(scores: jax.Array, k: int) -> jax.Array:
    """Bool mask of the k largest entries of a 1-D array (static k); ties: lower index."""
    n = scores.shape[0]
    if k >= n:
        return jnp.ones((n,), bool)
    if k <= 0:
        return jnp.zeros((n,), bool)
    # lax.top_k is documented to put the lower index first among equal values.
    if k <= n - k:
        _, idx = jax.lax.top_k(scores, k)
        return jnp.zeros((n,), bool).at[idx].set(True)
    # Cheaper to drop the n - k smallest: top_k of the negated, reversed scores picks
    # the smallest, and among ties the highest original index -- the same kept set.
    _, idx = jax.lax.top_k(-scores[::-1], n - k)
    return jnp.ones((n,), bool).at[n - 1 - idx].set(False)


def _energy(w: jax.Array, axes) -> jax.Array:
    return jnp.sum(jnp.square(w.astype(jnp.promote_types(w.dtype, jnp.float32))), axis=axes)


def _nm_mask(w: jax.Array, n: int, m: int) -> jax.Array:
    """N:M mask along axis -2: in each group of m consecutive entries keep the n largest
    magnitudes.  Rank of entry i in its group = #{j: a_j > a_i} + #{j < i: a_j == a_i},
    computed with m elementwise passes (exact, lower index wins ties)."""
    shape = w.shape
    if n >= m:
        return jnp.ones(shape, bool)
    if n <= 0:
        return jnp.zeros(shape, bool)
    a = jnp.abs(w).reshape(shape[:-2] + (shape[-2] // m, m, shape[-1]))
    pos = jnp.arange(m).reshape((m, 1))
    rank = jnp.zeros(a.shape, jnp.int32)
    for j in range(m):
        aj = a[..., j : j + 1, :]
        rank = rank + ((aj > a) | ((aj == a) & (j < pos))).astype(jnp.int32)
    return (rank < n).reshape(shape)


def _sparsity_mask(w: jax.Array, kind: str, p: Mapping[str, Any]) -> jax.Array:
    shape = w.shape
    if kind == "nm":
        return _nm_mask(w, p["n"], p["m"])
    ratio = p["ratio"]
    if kind == "irregular":
        k = kept_count(w.size, ratio)
        return _topk_mask(jnp.abs(w).reshape(-1), k).reshape(shape)
    if kind == "filter":
        unit = _topk_mask(_energy(w, tuple(range(w.ndim - 1))), kept_count(shape[-1], ratio))
        return jnp.broadcast_to(unit, shape)
    if kind == "column":
        rows = _energy(w.reshape(-1, shape[-1]), 1)
        unit = _topk_mask(rows, kept_count(rows.shape[0], ratio))
        return jnp.broadcast_to(unit[:, None], (rows.shape[0], shape[-1])).reshape(shape)
    if kind == "channel":
        axes = tuple(range(w.ndim - 2)) + (w.ndim - 1,)
        unit = _topk_mask(_energy(w, axes), kept_count(shape[-2], ratio))
        return jnp.broadcast_to(unit[:, None], shape)
    raise ValueError(f"unknown sparsity kind {kind!r}; allowed: {list(SPARSITY_KINDS)}")


# --------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _quant_error(a: jax.Array, alpha: jax.Array, L: int) -> tuple[jax.Array, jax.Array]:
    """Direct (cancellation-free) error sum (a - alpha q)^2 with q the nearest level."""
    safe = jnp.where(alpha > 0, alpha, 1.0)
    q = jnp.where(alpha > 0, jnp.clip(jnp.round(a / safe), 0, L), 0.0)
    return jnp.sum(jnp.square(a - alpha * q)), q


def _lloyd_polish(a: jax.Array, alphas: jax.Array, L: int, steps: int) -> jax.Array:
    """Refine candidate scales by alternating minimisation (q = nearest level,
    alpha = <a,q>/<q,q>), which never increases the error; return the best scale."""

    def one(alpha):
        def step(_, al):
            _, q = _quant_error(a, al, L)
            qq = jnp.sum(q * q)
            return jnp.where(qq > 0, jnp.sum(a * q) / jnp.where(qq > 0, qq, 1.0), al)

        alpha = jax.lax.fori_loop(0, steps, step, alpha)
        return _quant_error(a, alpha, L)[0], alpha

    errs, alphas = jax.lax.map(one, alphas)
    return alphas[jnp.argmin(errs)]


def _alpha_exact(a: jax.Array, L: int, n_cand: int = 8) -> jax.Array:
    """Candidate scales from the exact sweep over all breakpoints alpha = a_i / (j + 1/2).

    Between consecutive breakpoints q(alpha) is constant, so the error is a quadratic
    whose minimiser is <a,q>/<q,q> clamped to the segment; running sums over the
    breakpoints sorted in decreasing order give <a,q> and <q,q> for every segment.
    The optimum is one of these clamped minimisers; the few best segments (by this
    cancellation-prone float32 formula) are returned for direct re-scoring.  For
    ternary (L = 1) this is the classic sort of |w|: segment c keeps the c largest.
    """
    if L == 1:
        d_a = -jnp.sort(-a)  # descending
        hi = 2.0 * d_a
        d_b = jnp.ones_like(a)
    else:
        j = jnp.arange(L, dtype=a.dtype)
        bp = (a[:, None] / (j + 0.5)[None, :]).reshape(-1)
        d_a = jnp.broadcast_to(a[:, None], (a.shape[0], L)).reshape(-1)
        d_b = jnp.broadcast_to((2.0 * j + 1.0)[None, :], (a.shape[0], L)).reshape(-1)
        neg_bp, d_a, d_b = jax.lax.sort((-bp, d_a, d_b), num_keys=1)
        hi = -neg_bp
    lo = jnp.concatenate([hi[1:], jnp.zeros((1,), a.dtype)])
    A = jnp.cumsum(d_a)
    B = jnp.cumsum(d_b)
    alpha = jnp.clip(A / B, lo, hi)
    approx = -2.0 * alpha * A + alpha * alpha * B  # error minus the constant sum(a^2)
    _, idx = jax.lax.top_k(-approx, min(n_cand, approx.shape[0]))
    return alpha[idx]


def _alpha_grid(
    a: jax.Array, L: int, n_grid: int = 512, n_fine: int = 256, n_cand: int = 8, n_bins: int = 8192
) -> jax.Array:
    """Candidate scales from a grid search, without sorting.

    |w| is binned into a histogram (count, sum, sum of squares per bin), so the error
    of any scale costs O(L) prefix-sum lookups; elements are only misassigned inside
    the bin holding a rounding threshold, where both levels cost almost the same.  A
    log-spaced grid is scored, refined on a fine linear grid around the best 4, and the
    best few scales are returned for direct re-scoring.
    """
    amax = jnp.max(a)
    inv = jnp.where(amax > 0, n_bins / jnp.where(amax > 0, amax, 1.0), 0.0)
    idx = jnp.clip((a * inv).astype(jnp.int32), 0, n_bins - 1)
    cnt = jnp.zeros((n_bins,), jnp.int32).at[idx].add(1)
    zero = jnp.zeros((n_bins,), a.dtype)
    p0 = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(cnt)])
    p1 = jnp.concatenate([zero[:1], jnp.cumsum(zero.at[idx].add(a))])
    p2 = jnp.concatenate([zero[:1], jnp.cumsum(zero.at[idx].add(a * a))])
    half = jnp.arange(L, dtype=a.dtype) + 0.5
    lev = jnp.arange(L + 1, dtype=a.dtype)[None, :]

    def score(alphas):
        edge = jnp.clip(jnp.round(alphas[:, None] * half[None, :] * inv), 0, n_bins)
        edge = edge.astype(jnp.int32)
        g = alphas.shape[0]
        bounds = jnp.concatenate(
            [jnp.zeros((g, 1), jnp.int32), edge, jnp.full((g, 1), n_bins, jnp.int32)], axis=1
        )
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        al = alphas[:, None]
        count = (p0[hi] - p0[lo]).astype(a.dtype)
        err = (p2[hi] - p2[lo]) - 2.0 * al * lev * (p1[hi] - p1[lo]) + (al * lev) ** 2 * count
        return jnp.sum(err, axis=1)

    # The optimum satisfies alpha = <a,q>/<q,q> <= max(a); the coarse grid reaches 100x
    # below the "no clipping" scale max(a)/(L + 1/2) to allow clipped outliers.
    lo_f = 1.0 / (100.0 * (L + 0.5))
    coarse = amax * jnp.asarray(np.geomspace(lo_f, 1.0, n_grid).astype(np.float32))
    _, best = jax.lax.top_k(-score(coarse), 4)
    step = float((1.0 / lo_f) ** (1.0 / (n_grid - 1)))
    offs = jnp.asarray(np.linspace(1.0 / step, step, n_fine).astype(np.float32))
    fine = (coarse[best][:, None] * offs[None, :]).reshape(-1)
    _, best = jax.lax.top_k(-score(fine), n_cand)
    return fine[best]


def quantize_leaf(w, bits: int, mask=None, method: str = "auto") -> tuple[jax.Array, jax.Array]:
    """Closest ``alpha * q`` to ``w`` with integer levels q and one scale alpha >= 0.

    Levels: {-1, +1} for bits=1, {-(2^(b-1)-1) .. 2^(b-1)-1} for bits >= 2 (bits=2 is
    ternary).  With ``mask`` only the kept entries are quantized; the others get q=0.
    Returns ``(q, alpha)``: signed int32 levels of w's shape and a float32 scalar.

    Method: bits=1 is closed form (alpha = mean |w| over kept entries).  For bits >= 2
    the error is piecewise quadratic in alpha, and candidate scales come from

    * ``"exact"``: a sweep over all n * levels breakpoints (one sort of n * levels
      values) giving every segment's clamped minimiser -- exact in exact arithmetic;
      for ternary this is the classic sort of |w| choosing the best threshold count;
    * ``"grid"`` (heuristic, for large leaves): 512 log-spaced scales plus a fine
      linear grid around the best 4, scored on a histogram of |w| (no sort);

    then 4 Lloyd steps (q = nearest level, alpha = <|w|,q>/<q,q>; never increase the
    error) run from the 8 best candidates and the best by direct evaluation is kept.
    For bits >= 3 "exact" also adds the grid candidates, since in float32 the sweep's
    running sums lose precision once there are millions of events.  ``"auto"`` uses
    "exact" for ternary and while n * levels <= EXACT_QUANT_EVENTS, else "grid".
    """
    p = check_spec("quantize", {"bits": bits, "method": method})
    bits, method = p["bits"], p["method"]
    w = jnp.asarray(w)
    dt = jnp.promote_types(w.dtype, jnp.float32)
    a = jnp.abs(w.astype(dt)).reshape(-1)
    sign = jnp.where(w.reshape(-1) < 0, -1, 1).astype(jnp.int32)
    keep = None if mask is None else jnp.asarray(mask, bool).reshape(-1)
    if keep is not None:
        a = jnp.where(keep, a, 0.0)
    if a.shape[0] == 0:
        return jnp.zeros(w.shape, jnp.int32), jnp.zeros((), dt)

    if bits == 1:
        cnt = a.shape[0] if keep is None else jnp.sum(keep)
        alpha = jnp.sum(a) / jnp.maximum(cnt, 1)
        q = sign if keep is None else jnp.where(keep, sign, 0)
        return q.reshape(w.shape), alpha

    L = _levels(bits)
    if method == "auto":
        method = "exact" if L == 1 or a.shape[0] * L <= EXACT_QUANT_EVENTS else "grid"
    if method == "exact" and L == 1:
        cands = _alpha_exact(a, L)
    elif method == "exact":
        cands = jnp.concatenate([_alpha_exact(a, L), _alpha_grid(a, L)])
    else:
        cands = _alpha_grid(a, L)
    alpha = _lloyd_polish(a, cands, L, steps=4)
    alpha = jnp.where(jnp.max(a) > 0, alpha, 0.0)
    _, q = _quant_error(a, alpha, L)
    return (sign * q.astype(jnp.int32)).reshape(w.shape), alpha


# --------------------------------------------------------------------------------------
# Per-leaf entry point
# --------------------------------------------------------------------------------------


def project_leaf(w, kind: str, **params) -> tuple[jax.Array, jax.Array]:
    """Euclidean projection of one weight array onto the compression set ``kind``.

    Returns ``(projected, mask)`` with ``mask`` a bool array of w's shape marking the
    entries the set keeps (all True for quantization without sparsity).

    Kinds and parameters: ``irregular|filter|column|channel`` (``ratio`` in [0, 1)),
    ``nm`` (``n``, ``m``), ``quantize`` (``bits``; optional ``sparsity`` kind with its
    ``ratio`` or ``n``/``m`` -- ``ratio`` alone implies irregular -- and/or an explicit
    bool ``mask`` array; optional ``method``, see ``quantize_leaf``).  Quantization with
    sparsity takes the sparsity projection's support (intersected with ``mask``), then
    finds the best scale and levels for the kept weights; pruned weights stay 0.
    """
    w = jnp.asarray(w)
    mask_arg = params.pop("mask", None) if kind == "quantize" else None
    p = check_spec(kind, params, shape=w.shape)
    if kind != "quantize":
        mask = _sparsity_mask(w, kind, p)
        return jnp.where(mask, w, jnp.zeros_like(w)), mask

    mask = None
    if "sparsity" in p:
        mask = _sparsity_mask(w, p["sparsity"], p)
    if mask_arg is not None:
        mask_arg = jnp.asarray(mask_arg, bool)
        if mask_arg.shape != w.shape:
            raise ValueError(f"mask shape {mask_arg.shape} does not match leaf shape {w.shape}")
        mask = mask_arg if mask is None else mask & mask_arg
    q, alpha = quantize_leaf(w, p["bits"], mask=mask, method=p["method"])
    proj = (alpha * q.astype(alpha.dtype)).astype(w.dtype)
    return proj, (jnp.ones(w.shape, bool) if mask is None else mask)
