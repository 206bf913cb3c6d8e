"""ADMM for constrained training: state (z, u, rho) over the compressed leaves.

    minimise L(W)  subject to  W_l in S_l
    W-step: SGD on L(W) + sum_l rho_l / 2 * ||W_l - Z_l + U_l||^2     (`penalty`)
    Z-step: Z_l = Proj_{S_l}(W_l + U_l)                                 (`update`)
    U-step: U_l = (U_l + W_l - Z_l) * rho_l / rho_l';  rho_l' = growth * rho_l  (`update`)

Z, U and rho are flat dicts keyed by the `/`-joined parameter path of each compressed
leaf (`conv1/kernel`), so they checkpoint and log by name. Everything here is a pure
function over pytrees and runs under `jax.jit`.
"""
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from robust_admm.compression import projections, rules

Specs = Mapping[str, Mapping[str, Any]]  # leaf path -> {"kind": ..., **params}


@flax.struct.dataclass
class AdmmState:
    z: dict
    u: dict
    rho: dict


def empty() -> AdmmState:
    """The state of a stage that runs no ADMM (no compressed leaves)."""
    return AdmmState(z={}, u={}, rho={})


def leaves_by_path(tree) -> dict:
    """{`/`-joined path: leaf} for every leaf of `tree`."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {rules.leaf_path(kp): leaf for kp, leaf in flat}


def replace_by_path(tree, new: Mapping[str, Any]):
    """`tree` with the leaves whose path is a key of `new` replaced by its value."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: new.get(rules.leaf_path(kp), leaf), tree
    )


def project_within(w, spec: Mapping[str, Any], mask=None):
    """(projection of `w` onto the set `spec` intersected with {zero where `mask` is
    False}, its mask): weights an earlier phase pruned stay pruned. Exact, as the sets
    act entry- or unit-wise: zeroing the masked entries first, then projecting, gives the
    nearest point of the intersection (quantization fits its levels to the kept entries)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if mask is None:
        return projections.project_leaf(w, kind, **spec)
    w = jnp.where(mask, w, jnp.zeros_like(w))
    if kind == "quantize":
        return projections.project_leaf(w, kind, mask=mask, **spec)
    proj, kept = projections.project_leaf(w, kind, **spec)
    return proj, kept & mask


def init(params, specs: Specs, rho: float, masks=None) -> AdmmState:
    """Z = Proj(W), U = 0, rho = rho for every compressed leaf (projections within
    `masks` when given)."""
    if rho <= 0:
        raise ValueError(f"admm.rho={rho} must be > 0")
    w = leaves_by_path(params)
    m = {} if masks is None else leaves_by_path(masks)
    z = {p: project_within(w[p], s, m.get(p))[0] for p, s in specs.items()}
    return AdmmState(
        z=z,
        u={p: jnp.zeros_like(v) for p, v in z.items()},
        rho={p: jnp.asarray(rho, jnp.float32) for p in z},
    )


def penalty(params, state: AdmmState) -> jnp.ndarray:
    """sum_l rho_l / 2 * ||W_l - Z_l + U_l||^2 (0 when nothing is compressed)."""
    w = leaves_by_path(params)
    total = jnp.zeros((), jnp.float32)
    for p in state.z:
        total += 0.5 * state.rho[p] * jnp.sum(jnp.square(w[p] - state.z[p] + state.u[p]))
    return total


def update(params, state: AdmmState, specs: Specs, rho_growth: float = 1.0,
           rho_max: float = float("inf"), masks=None):
    """One Z- and U-step; rho grows by `rho_growth` (capped at `rho_max`); Z within `masks`.

    Returns the new state and per-leaf residuals: primal ||W - Z|| / ||W|| (how far the
    weights still are from the constraint set) and dual ||Z - Z_prev|| / ||Z||.
    """
    w = leaves_by_path(params)
    m = {} if masks is None else leaves_by_path(masks)
    z, u, rho, metrics = {}, {}, {}, {}
    for p, spec in specs.items():
        z[p] = project_within(w[p] + state.u[p], spec, m.get(p))[0]
        rho[p] = jnp.minimum(state.rho[p] * rho_growth, rho_max)
        # U is the scaled dual (Y / rho): rescale it when rho changes (Boyd et al. 3.4.1).
        u[p] = (state.u[p] + w[p] - z[p]) * (state.rho[p] / rho[p])
        eps = 1e-12
        metrics[f"primal_residual/{p}"] = jnp.linalg.norm(w[p] - z[p]) / (
            jnp.linalg.norm(w[p]) + eps)
        metrics[f"dual_residual/{p}"] = jnp.linalg.norm(z[p] - state.z[p]) / (
            jnp.linalg.norm(z[p]) + eps)
    return AdmmState(z=z, u=u, rho=rho), metrics


def hard_project(params, specs: Specs, masks=None):
    """Projects each compressed leaf of `params` onto its set (within `masks` when given);
    returns (params, masks): bool leaves, all True where nothing is pruned."""
    if masks is None:
        masks = jax.tree_util.tree_map(lambda x: jnp.ones(jnp.shape(x), bool), params)
    w, m = leaves_by_path(params), leaves_by_path(masks)
    new_w, new_m = {}, {}
    for p, spec in specs.items():
        new_w[p], new_m[p] = project_within(w[p], spec, m[p])
    return replace_by_path(params, new_w), replace_by_path(masks, new_m)


QUANTIZE_UPDATES = ("project", "ste")


def quantized_specs(specs: Specs) -> dict:
    return {p: s for p, s in specs.items() if s["kind"] == "quantize"}


def onto_levels(params, masks, specs: Specs):
    """`params` with each quantized leaf of `specs` projected onto its levels, the scale
    refit to the kept weights, the support `masks` (other leaves unchanged)."""
    quant = quantized_specs(specs)
    if not quant:
        return params
    w, m = leaves_by_path(params), leaves_by_path(masks)
    levels = {p: projections.project_leaf(w[p], "quantize", bits=s["bits"],
                                          method=s.get("method", "auto"), mask=m[p])[0]
              for p, s in quant.items()}
    return replace_by_path(params, levels)


def keep_constraints(params, masks, specs: Specs, quantize_update: str = "project"):
    """What a retrain phase applies after every update: pruned weights back to zero and,
    with quantize_update='project', quantized leaves back onto their levels. With 'ste'
    the weights stay latent (full precision) and the model runs on `straight_through`."""
    params = jax.tree_util.tree_map(lambda p, m: p * m, params, masks)
    return onto_levels(params, masks, specs) if quantize_update == "project" else params


def straight_through(params, levels):
    """The straight-through estimator: the value of `levels` (`onto_levels` of the latent
    `params`, computed once per step by the caller), the gradient passed to `params`."""
    # v + (w - w): exactly v forward (w - w is exactly 0), gradient 1 to w, none through v.
    sg = jax.lax.stop_gradient
    return jax.tree_util.tree_map(lambda w, v: sg(v) + (w - sg(w)), params, levels)


def freeze_zeros(params, masks, specs: Specs):
    """Masked-progressive ADMM: `masks` with every compressed weight that is already
    zero marked pruned, so weights removed by an earlier round stay zero."""
    w = leaves_by_path(params)
    m = leaves_by_path(masks)
    return replace_by_path(masks, {p: m[p] & (w[p] != 0) for p in specs})
