"""ADMM compression in any training loop: optax gradient transformations over any params
pytree (Flax linen's `variables["params"]`, Flax NNX's `nnx.state(model, nnx.Param)`, a
dict of arrays), built on the functions the `train` CLI runs (`admm`, `projections`).

    tx = admm_phase(optax.adam(1e-3), rules, update_every=100, rho=1e-3)
    ...  # train: updates, state = tx.update(grads, state, params)
    params = project(params, rules)
    tx = retrain_phase(optax.adam(1e-3), rules)
    ...  # train on the sets

Rules are a rules text (`'conv*=filter:0.5,fc1=irregular:0.9+quantize:4'`, the config's
grammar), a list of `Rule` or a dict ``{pattern: spec}``; a pattern globs the leaf paths
(`conv1/kernel`) or their module paths (`conv1`) of the compressible leaves, by default
those named `kernel` with at least 2 dims (`rules.is_kernel`; give `is_compressible(path,
leaf) -> bool` to choose others). Rules are matched when a transformation is initialised,
so a pattern that matches no leaf fails there, naming it and the candidate leaf paths.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from robust_admm.compression import admm as admm_lib
from robust_admm.compression import size as size_lib
from robust_admm.compression.projections import is_int
from robust_admm.compression.rules import (Predicate, Rules, as_pattern_specs, leaf_path,
                                           match_rules)


def resolve(params, rules: Rules, *, is_compressible: Predicate | None = None) -> dict:
    """``{leaf path: spec}``: which leaf of `params` goes to which set (only shapes are
    read; runs under `jax.jit`). Errors name the rule: a malformed set, a pattern that
    matches no compressible leaf (with the candidate leaf paths), a leaf two patterns
    match, a set the leaf's shape does not allow."""
    return match_rules(params, as_pattern_specs(rules), is_compressible)


def project(params, rules: Rules, *, is_compressible: Predicate | None = None, masks=None):
    """`params` with every leaf a rule matches replaced by its exact Euclidean projection
    onto the rule's set (the k largest weights / units kept, ties to the lower index;
    levels alpha * q with the best scale), other leaves unchanged: what the CLI's retrain
    phase starts from. `masks` (bools with params' structure): support to stay within,
    e.g. an earlier phase's."""
    specs = resolve(params, rules, is_compressible=is_compressible)
    return _hard_project(_frozen(specs))(params, masks)[0]


def _frozen(specs) -> tuple:
    """`specs` as a hashable key: ((path, ((name, value), ...)), ...)."""
    return tuple((p, tuple(sorted(s.items()))) for p, s in sorted(specs.items()))


# The projections compiled as one program per set of specs (run op by op they compile
# dozens of small programs, quantization's search most), shared by `project` and
# `retrain_phase`'s init.
@functools.lru_cache(maxsize=64)
def _hard_project(frozen_specs: tuple):
    specs = {p: dict(s) for p, s in frozen_specs}
    return jax.jit(lambda params, masks: admm_lib.hard_project(params, specs, masks))


@functools.lru_cache(maxsize=64)
def _admm_init(frozen_specs: tuple, rho: float):
    specs = {p: dict(s) for p, s in frozen_specs}
    return jax.jit(lambda params, masks: admm_lib.init(params, specs, rho, masks))


def size_report(params, rules: Rules | None = None, *,
                is_compressible: Predicate | None = None) -> dict:
    """What `params` take to store: ``{"leaves": {leaf path: {size, nonzero, bits, format,
    bytes, dense_bytes, compressed}}, "total": {size, nonzero, bytes, dense_bytes,
    rate_by_nonzeros, rate_by_bytes}}``. Nonzeros are counted from the values; a leaf a
    rule matches is stored at its rule's bits (32 without quantization) in the smaller of
    'dense' (every entry's code) and 'bitmask' (1 bit per entry + the nonzeros' codes), a
    quantized one with its float32 scale; every other leaf as float32 (see
    `size.model_size`). Eager (numpy): call it outside `jax.jit`."""
    specs = {} if rules is None else resolve(params, rules, is_compressible=is_compressible)
    return size_lib.leaf_sizes(jax.device_get(params), specs)


# --------------------------------------------------------------------------------------
# The ADMM phase
# --------------------------------------------------------------------------------------


class AdmmOptState(NamedTuple):
    """The state of `admm_phase`: the step count and ADMM's Z, U, rho (flat dicts keyed by leaf
    path, `admm.AdmmState`), the primal and dual residuals of the last Z/U update (0 before
    the first), the masks it was given (None without) and the inner optimizer's state."""
    count: jax.Array  # int32 scalar: updates taken
    admm: admm_lib.AdmmState
    residuals: dict  # {"primal_residual/<path>": ||W - Z|| / ||W||, "dual_residual/<path>"}
    masks: Any
    inner: optax.OptState


def _check_positive(name: str, value, allow_inf: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a number > 0") from None
    if not v > 0 or (v == float("inf") and not allow_inf) or v != v:
        raise ValueError(f"{name}={value!r} must be > 0" + ("" if allow_inf else " and finite"))
    return v


def _check_inner(inner, name: str):
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        raise TypeError(f"{name}: inner={inner!r} is not an optax GradientTransformation (its "
                        f"first argument is the optimizer it wraps, e.g. optax.adam(1e-3))")
    return optax.with_extra_args_support(inner)


def admm_phase(inner: optax.GradientTransformation, rules: Rules = None, *, update_every: int,
               rho: float = 1e-3, rho_growth: float = 1.3, rho_max: float = 1.0,
               is_compressible: Predicate | None = None,
               masks=None) -> optax.GradientTransformationExtraArgs:
    """`inner` (any optax optimizer) running ADMM toward `rules`:
    ``admm_phase(optax.sgd(0.01), rules, update_every=N)``.

    Solves min L(W) s.t. W_l in S_l by `inner` on L(W) + sum_l rho_l/2 ||W_l - Z_l + U_l||^2:
    `update(grads, state, params)` adds rho_l (W_l - Z_l + U_l) to the gradient of every
    leaf a rule matches (the penalty's gradient, `admm.penalty`'s) and passes the result
    to `inner`. `init(params)` sets Z = Proj(W), U = 0, rho = `rho` (`admm.init`). After
    every `update_every`-th update, inside the compiled update (`lax.cond`), from the
    params that update leads to (params + updates), Z = Proj(W + U), U = (U + W - Z) *
    rho / rho', rho' = min(rho * `rho_growth`, `rho_max`) (`admm.update`); the next
    update's penalty uses them. The CLI's admm phase is this transformation with N =
    steps_per_epoch * update_every_epochs (Z/U updated at the end of every interval).

    `masks` (bools with params' structure, an earlier phase's support): Z stays within
    them and the gradients are multiplied by them before `inner` (pruned weights get no
    update from any optimizer whose update of a zero gradient is zero). The params must be
    the third argument of `update` (optax's convention): the penalty needs them. The
    updates are `inner`'s: chain nothing after this transformation that changes them, or
    the Z/U update sees other params than the ones applied.
    """
    if rules is None:
        raise TypeError(f"admm_phase(inner, rules, update_every=...): got inner={inner!r} and "
                        f"no rules; the optimizer it wraps comes first, e.g. admm_phase("
                        f"optax.sgd(0.01), 'fc1=irregular:0.9', update_every=100) (0.1 "
                        f"chained admm_phase(rules, ...) before the optimizer)")
    inner_tx = _check_inner(inner, "admm_phase")
    if not is_int(update_every) or update_every < 1:
        raise ValueError(f"update_every={update_every!r} must be an integer >= 1 (updates "
                         f"between Z/U updates)")
    rho = _check_positive("rho", rho)
    rho_growth = _check_positive("rho_growth", rho_growth)
    rho_max = _check_positive("rho_max", rho_max, allow_inf=True)
    pattern_specs = as_pattern_specs(rules)

    def specs_of(params):
        return match_rules(params, pattern_specs, is_compressible)

    def init(params):
        specs = specs_of(params)
        state = _admm_init(_frozen(specs), rho)(params, masks)
        residuals = {f"{k}/{p}": jnp.zeros((), jnp.float32)
                     for p in specs for k in ("primal_residual", "dual_residual")}
        return AdmmOptState(count=jnp.zeros((), jnp.int32), admm=state, residuals=residuals,
                            masks=masks, inner=inner_tx.init(params))

    def update(grads, state: AdmmOptState, params=None, **extra_args):
        if params is None:
            raise ValueError("admm_phase: update(grads, state, params) needs the params (the "
                             "penalty's gradient is rho (W - Z + U))")
        specs = specs_of(params)
        grads = add_penalty_grad(grads, params, state.admm)
        if state.masks is not None:
            grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, state.masks)
        updates, inner_state = inner_tx.update(grads, state.inner, params, **extra_args)
        count = state.count + 1
        new_admm, residuals = jax.lax.cond(
            count % int(update_every) == 0,
            lambda s: admm_lib.update(optax.apply_updates(params, updates), s.admm, specs,
                                      rho_growth, rho_max, s.masks),
            lambda s: (s.admm, s.residuals), state)
        return updates, AdmmOptState(count=count, admm=new_admm, residuals=residuals,
                                     masks=state.masks, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def find_state(opt_state, cls, what: str, required: bool = True):
    """The one state of type `cls` inside `opt_state` (a chain's, a wrapper's...); None
    when there is none and not `required`; an error for more than one."""
    found = [s for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]
    if len(found) > 1 or (required and not found):
        raise ValueError(f"opt_state holds {len(found)} {cls.__name__}s; expected exactly "
                         f"one (the state of a `{what}(...)` transformation)")
    return found[0] if found else None


def admm_state(opt_state) -> admm_lib.AdmmState | None:
    """ADMM's Z, U and rho (`admm.AdmmState`) of the `admm_phase` inside `opt_state`, None
    if there is none: e.g. for `admm.penalty(params, admm_state(opt_state))` as a metric."""
    found = find_state(opt_state, AdmmOptState, "admm_phase", required=False)
    return None if found is None else found.admm


def add_penalty_grad(grads, params, state: admm_lib.AdmmState):
    """`grads` plus the gradient of `admm.penalty` (rho (W - Z + U) on the leaves `state`
    holds), taken by `jax.grad` of that same function, as the CLI's step does."""
    w = admm_lib.leaves_by_path(params)
    pen = jax.grad(admm_lib.penalty)({p: w[p] for p in state.z}, state)
    return admm_lib.replace_by_path(grads, {
        p: g + pen[p] for p, g in admm_lib.leaves_by_path(grads).items() if p in pen})


# --------------------------------------------------------------------------------------
# Retraining on the sets
# --------------------------------------------------------------------------------------


class RetrainState(NamedTuple):
    """The state of `retrain_phase`: the support kept (bools with params' structure, True =
    kept; the projection's at init) and the inner optimizer's state."""
    masks: Any
    inner: optax.OptState


def retrain_phase(inner: optax.GradientTransformation, rules: Rules, *,
                  quantize_update: str = "project", is_compressible: Predicate | None = None,
                  masks=None) -> optax.GradientTransformationExtraArgs:
    """`inner` (any optax optimizer) with the params kept on `rules`' sets after every
    update, for fine-tuning a compressed model: what the CLI's retrain phase runs.

    `init(params)` projects `params` (`project`; within `masks` when given) and keeps the
    support as masks. `update(grads, state, params)` multiplies the gradients by the masks
    and runs `inner`; its updates take every pruned weight to exactly zero (-W there) and
    leave the kept ones' as `inner` gave them, and with `quantize_update='project'` take
    each quantized leaf onto its levels (the scale refit to the kept weights,
    `admm.keep_constraints`): target - W. An optax update cannot set params, only be added
    to them: W + (target - W) equals the target exactly where the target is within a
    factor of 2 of the weight (Sterbenz's lemma), so a weight moving far (from 0 to a
    level, or past level 2) may land an ulp off its level. For levels exact to the bit,
    follow `optax.apply_updates` with `keep_on_sets` (the CLI does); start from
    ``project(params, rules)``, as the CLI does: from unprojected weights the first step's
    gradient is taken off the sets.

    `quantize_update='ste'`: the weights stay latent (only the masks are kept) and the model
    must run on ``straight_through(params, rules, retrain_masks(opt_state))`` in the loss
    (levels forward, gradient straight through to the latent weights); the model to keep
    is that function's value outside the gradient.
    """
    inner_tx = _check_inner(inner, "retrain_phase")
    if quantize_update not in admm_lib.QUANTIZE_UPDATES:
        raise ValueError(f"quantize_update={quantize_update!r}; allowed: "
                         f"{admm_lib.QUANTIZE_UPDATES}")
    pattern_specs = as_pattern_specs(rules)

    def specs_of(params):
        return match_rules(params, pattern_specs, is_compressible)

    def init(params):
        specs = specs_of(params)
        projected, support = _hard_project(_frozen(specs))(params, masks)
        return RetrainState(masks=support, inner=inner_tx.init(projected))

    def update(grads, state: RetrainState, params=None, **extra_args):
        if params is None:
            raise ValueError("retrain_phase: update(grads, state, params) needs the params (its "
                             "updates take them onto the sets)")
        specs = specs_of(params)
        grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, state.masks)
        updates, inner_state = inner_tx.update(grads, state.inner, params, **extra_args)
        leveled = set(admm_lib.quantized_specs(specs)) if quantize_update == "project" else ()
        if leveled:
            target = admm_lib.leaves_by_path(admm_lib.keep_constraints(
                optax.apply_updates(params, updates), state.masks, specs, quantize_update))

        def to_sets(path, u, w, m):
            p = leaf_path(path)
            # Kept weights: inner's update as it is (W + u is what inner meant exactly);
            # pruned: -W (W + -W is exactly 0); on levels: the way to the target.
            return target[p] - w if p in leveled else jnp.where(m, u, -w).astype(u.dtype)

        updates = jax.tree_util.tree_map_with_path(to_sets, updates, params, state.masks)
        return updates, RetrainState(masks=state.masks, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def retrain_masks(opt_state):
    """The masks of the `retrain_phase` state inside `opt_state` (a chain's, a wrapper's...);
    an error if there is none or more than one."""
    return find_state(opt_state, RetrainState, "retrain_phase").masks


def keep_on_sets(params, rules: Rules, opt_state, *, quantize_update: str = "project",
                 is_compressible: Predicate | None = None):
    """`params` (after ``optax.apply_updates`` of a `retrain_phase`'s updates) exactly on the
    sets: pruned weights 0 and, with quantize_update='project', quantized leaves on their
    levels to the bit (`admm.keep_constraints`; the masks of the `retrain_phase` in
    `opt_state`)."""
    specs = resolve(params, rules, is_compressible=is_compressible)
    return admm_lib.keep_constraints(params, retrain_masks(opt_state), specs, quantize_update)


def straight_through(params, rules: Rules, masks, *,
                     is_compressible: Predicate | None = None):
    """The straight-through estimator of `retrain_phase(..., quantize_update='ste')`: `params`
    with each quantized leaf valued on its levels within `masks` (`admm.onto_levels`),
    its gradient passed unchanged to the latent weights (`admm.straight_through`). Outside
    a gradient it is the quantized model."""
    specs = resolve(params, rules, is_compressible=is_compressible)
    return admm_lib.straight_through(params, admm_lib.onto_levels(params, masks, specs))
