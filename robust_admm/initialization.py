"""A run's initial weights: an initialisation scheme, or inherited from a pruned run.

`init.scheme` re-draws every kernel (conv and dense) with one of jax.nn.initializers'
schemes (biases stay 0, BatchNorm scales 1); 'default' keeps flax's (LeCun normal).

`init.inherit_from` (a finished run's workdir) starts from the sparse model that run
pruned, for the lottery-ticket test of the paper's width study: the model keeps the source
run's architecture (same `model.name` and `model.width`) and its masks, which stay fixed in
every phase of this run (gradients masked, pruned weights kept at 0), so it trains exactly
the pruned model's sparse structure. At the kept positions it starts from
- `init.inherit='initial'`: the source run's own initial weights (regenerated from its
  config and seed: the weights its pruned model grew from), or
- `init.inherit='trained'`: the source model's trained surviving weights (and BatchNorm
  statistics): fine-tuning rather than re-training.
"""
import jax
import jax.numpy as jnp
import numpy as np

from robust_admm import checkpoint, logs

# init.scheme -> initializer of a kernel (fan-in over all but the last axis, fan-out the last).
SCHEMES = {
    "default": None,
    "xavier_uniform": jax.nn.initializers.glorot_uniform,
    "xavier_normal": jax.nn.initializers.glorot_normal,
    "kaiming_uniform": jax.nn.initializers.he_uniform,
    "kaiming_normal": jax.nn.initializers.he_normal,
    "lecun_uniform": jax.nn.initializers.lecun_uniform,
    "orthogonal": jax.nn.initializers.orthogonal,
}
INHERIT = ("initial", "trained")
_SCHEME_SALT = 7919  # folded into the run key: the scheme's draws differ from flax's


def check(init_cfg):
    """Refuses an unknown scheme or inheritance mode, naming the allowed ones."""
    if init_cfg.scheme not in SCHEMES:
        raise ValueError(f"init.scheme={init_cfg.scheme!r}; allowed: {', '.join(SCHEMES)}")
    if init_cfg.inherit not in INHERIT:
        raise ValueError(f"init.inherit={init_cfg.inherit!r}; allowed: {', '.join(INHERIT)}")


def initial_variables(config, model, input_shape):
    """(params, batch_stats) a run of `config` starts from, before any inheritance."""
    check(config.init)
    key = jax.random.PRNGKey(config.seed)
    variables = model.init(jax.random.fold_in(key, 12345), jnp.zeros(input_shape, jnp.float32))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    make = SCHEMES[config.init.scheme]
    if make is None:
        return params, batch_stats
    init = make()
    base = jax.random.fold_in(key, _SCHEME_SALT)
    flat, tree = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(flat):
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        out.append(init(jax.random.fold_in(base, i), leaf.shape, leaf.dtype) if is_kernel
                   else leaf)
    return jax.tree_util.tree_unflatten(tree, out), batch_stats


def inherited(config, model, input_shape, params_like):
    """(params, batch_stats, masks) inherited from `init.inherit_from`; errors name what
    differs between the two runs."""
    from robust_admm.eval import finished_stage, load_config  # reads a finished run
    source = config.init.inherit_from
    src = load_config(source)
    for section, name in (("data", "name"), ("model", "name"), ("model", "width")):
        a, b, field = src[section][name], config[section][name], f"{section}.{name}"
        if a != b:
            raise ValueError(f"init.inherit_from={source!r} ran {field}={a!r}, this run "
                             f"{field}={b!r}: an inherited model keeps the source's "
                             f"architecture; set {field}={a!r}")
    stage = finished_stage(source, config.init.inherit_stage or None, src)
    state = checkpoint.load_final_state(source, stage)
    masks = jax.tree_util.tree_map(lambda m: np.asarray(m, bool), state["masks"])
    if jax.tree_util.tree_structure(masks) != jax.tree_util.tree_structure(params_like):
        raise ValueError(f"init.inherit_from={source!r}: its stage {stage!r} holds parameters "
                         f"of another structure than this run's model")
    if config.init.inherit == "initial":
        weights, batch_stats = initial_variables(src, model, input_shape)
    else:
        weights, batch_stats = state["params"], state.get("batch_stats") or {}
    params = jax.tree_util.tree_map(lambda w, m: jnp.asarray(w) * m, weights, masks)
    kept = sum(int(m.sum()) for m in jax.tree_util.tree_leaves(masks))
    total = sum(m.size for m in jax.tree_util.tree_leaves(masks))
    logs.log(f"inherited from {source} (stage {stage!r}): the {config.init.inherit} weights "
             f"at its {kept:,} kept positions of {total:,}; the masks stay fixed")
    batch_stats = jax.tree_util.tree_map(jnp.asarray, batch_stats)
    return params, batch_stats, jax.tree_util.tree_map(jnp.asarray, masks)
