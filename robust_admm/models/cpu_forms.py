"""A JAX function's convolutions and small max-pools recomputed in the forms this project
tuned for XLA:CPU, for models it did not build (a user's Flax NNX or linen module, a pure
jnp function).

The zoo's layers choose their CPU forms as they are written (`models.conv`,
`models.layers.max_pool_2x2`). A user's model calls `lax.conv_general_dilated` and
`lax.reduce_window` directly, whose CPU kernels are several times slower on the narrow
layers of small models (benchmarks/NOTES.md, "AutoAttack on a user's model"). So
`with_cpu_forms(fn)` traces `fn` to a jaxpr and evaluates it again with three primitives
replaced:
- `conv_general_dilated` (plain NHWC x HWIO): the form `conv.choose_form` picks for its
  shape, as the zoo's `Conv` does ('native' keeps the primitive);
- `reduce_window_max` whose windows tile the input (window = stride, no padding or
  dilation, at most 16 entries): a reshape and elementwise maxima, the gradient going to
  the first maximal entry of each window in row-major order, as `reduce_window`'s own;
- `reduce_max` over axes of at most 16 entries in all (a max-pool written as a reshape
  and `max`): elementwise maxima, the gradient shared among ties, as `reduce_max`'s own.
The max-pools are exact: values and gradients are those of the primitives, bit for bit.
The convolutions differ in the order of their sums (float rounding). Primitives inside
`jax.jit`-ted sub-functions are rewritten too; those inside control flow (`scan`,
`while`, `cond`) and custom derivative rules are left as they are.

Written by hand: JAX offers jaxpr interpreters as a pattern (its "custom interpreters"
guide), not as a library with substitution rules.
"""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from robust_admm.models import conv

__all__ = ["with_cpu_forms"]

SMALL_WINDOW = 16  # most entries per output a max is rewritten for


def with_cpu_forms(fn):
    """`fn` (any function of pytrees of arrays) with its convolutions and small max-pools
    computed in the project's CPU forms (see the module docstring); equal to `fn` up to
    the rounding of the convolutions' sums. Where JAX's default backend is not the CPU it
    is `fn` itself: these forms are tuned for XLA:CPU only."""

    @functools.wraps(fn)
    def rewritten(*args):
        if jax.default_backend() != "cpu":
            return fn(*args)
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return rewritten


def _evaluate(jaxpr, consts, args) -> list:
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, value in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
        env[v] = value
    for eqn in jaxpr.eqns:
        values = [read(v) for v in eqn.invars]
        outs = None
        if eqn.primitive is jcore.primitives.jit_p:
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, values)
        elif eqn.primitive.name in _RULES:
            out = _RULES[eqn.primitive.name](*values, **eqn.params)
            outs = None if out is None else [out]
        if outs is None:
            # Older JAX returns (subfuns, params) here, newer the params alone.
            bound = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*subfuns, *values, **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, value in zip(eqn.outvars, outs):
            env[v] = value
    return [read(v) for v in jaxpr.outvars]


# ----------------------------------------------------------------------------- convolution

def _conv_rule(lhs, rhs, *, window_strides, padding, lhs_dilation, rhs_dilation,
               dimension_numbers, feature_group_count, batch_group_count, precision,
               preferred_element_type, **other):
    """The zoo's drop-in (`conv.conv_general_dilated('auto')`), which keeps the primitive
    for anything but a plain NHWC x HWIO convolution; None (the primitive as it was) for
    what the drop-in does not take (parameters it has no argument for, e.g. a sharding)."""
    if (batch_group_count != 1 or preferred_element_type is not None
            or any(v is not None for v in other.values())):
        return None
    return conv.conv_general_dilated("auto")(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision)


# ----------------------------------------------------------------------------- max-pools

def _entries(x, axes):
    """x's slices along `axes`, every index combination in row-major order, those axes
    dropped."""
    for index in itertools.product(*(range(x.shape[a]) for a in axes)):
        at = [slice(None)] * x.ndim
        for a, i in zip(axes, index):
            at[a] = i
        yield x[tuple(at)]


def _elementwise_max(x, axes):
    entries = list(_entries(x, axes))
    return functools.reduce(jnp.maximum, entries[1:], entries[0])


def _expand(v, axes):
    """v (x without `axes`) broadcastable against x."""
    for a in sorted(axes):
        v = jnp.expand_dims(v, a)
    return v


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_shared(x, axes):
    """max over `axes`; gradient ind * (g / count) among the entries equal to the max, the
    order of operations of `reduce_max`'s own rule."""
    return _elementwise_max(x, axes)


def _max_shared_fwd(x, axes):
    m = _elementwise_max(x, axes)
    is_max = x == _expand(m, axes)
    # The count as a sum of slices, not a reduction (XLA:CPU hands reductions to a
    # library where this one runs slowly; models.layers, the same choice).
    count = functools.reduce(jnp.add, (e.astype(x.dtype) for e in _entries(is_max, axes)))
    return m, (is_max, count)


def _max_shared_bwd(axes, residuals, g):
    is_max, count = residuals
    return (is_max.astype(g.dtype) * _expand(g / count, axes),)


_max_shared.defvjp(_max_shared_fwd, _max_shared_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_first(x, axes):
    """max over `axes`; gradient to the first entry equal to the max in row-major order
    of `axes` (`reduce_window`'s select-and-scatter with a >= comparison)."""
    return _elementwise_max(x, axes)


def _max_first_fwd(x, axes):
    m = _elementwise_max(x, axes)
    taken = jnp.zeros(m.shape, bool)
    chosen = []
    for e in _entries(x, axes):
        pick = (e == m) & ~taken
        chosen.append(pick)
        taken = taken | pick
    sizes = [x.shape[a] for a in axes]
    rest = [a for a in range(x.ndim) if a not in axes]
    stacked = jnp.stack(chosen, axis=-1).reshape(m.shape + tuple(sizes))
    # Back to x's layout: the window axes return to their places.
    order = [None] * x.ndim
    for i, a in enumerate(rest):
        order[a] = i
    for i, a in enumerate(axes):
        order[a] = len(rest) + i
    return m, jnp.transpose(stacked, order)


def _max_first_bwd(axes, chosen, g):
    return (jnp.where(chosen, _expand(g, axes), jnp.zeros((), g.dtype)),)


_max_first.defvjp(_max_first_fwd, _max_first_bwd)


def _reduce_max_rule(operand, *, axes, **unused):
    axes = tuple(sorted(axes))
    size = math.prod(operand.shape[a] for a in axes)
    if not 2 <= size <= SMALL_WINDOW or not jnp.issubdtype(operand.dtype, jnp.floating):
        return None
    return _max_shared(operand, axes)


def _reduce_window_max_rule(operand, *, window_dimensions, window_strides, padding,
                            base_dilation, window_dilation):
    tiles = (tuple(window_dimensions) == tuple(window_strides)
             and all(p == (0, 0) for p in map(tuple, padding))
             and all(d == 1 for d in base_dilation) and all(d == 1 for d in window_dilation)
             and all(n % w == 0 for n, w in zip(operand.shape, window_dimensions)))
    size = math.prod(window_dimensions)
    if not tiles or not 2 <= size <= SMALL_WINDOW \
            or not jnp.issubdtype(operand.dtype, jnp.floating):
        return None
    split, axes = [], []
    for n, w in zip(operand.shape, window_dimensions):
        split.append(n // w)
        if w > 1:
            split.append(w)
            axes.append(len(split) - 1)
    windows = operand.reshape(split)
    out = _max_first(windows, tuple(axes))
    return out.reshape([n // w for n, w in zip(operand.shape, window_dimensions)])


_RULES = {
    "conv_general_dilated": _conv_rule,
    "reduce_window_max": _reduce_window_max_rule,
    "reduce_max": _reduce_max_rule,
}
