"""A run's initial weights: `init.scheme` re-draws every kernel (conv and dense) with one
of jax.nn.initializers' schemes (biases stay 0, BatchNorm scales 1); 'default' keeps
flax's (LeCun normal). Starting from another run's pruned model (`init.inherit_from`) is
`experiments/inherit.py`'s business: it reads that run's workdir."""
import jax
import jax.numpy as jnp

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
