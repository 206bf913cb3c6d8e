"""Starting a run from the sparse model another run pruned (`init.inherit_from`, a
finished run's workdir), for the lottery-ticket test of the paper's width study: the model
keeps the source run's architecture (same `model.name` and `model.width`) and its masks,
which stay fixed in every phase of this run (gradients masked, pruned weights kept at 0),
so it trains exactly the pruned model's sparse structure. At the kept positions it starts
from
- `init.inherit='initial'`: the source run's own initial weights (regenerated from its
  config and seed: the weights its pruned model grew from), or
- `init.inherit='trained'`: the source model's trained surviving weights (and BatchNorm
  statistics): fine-tuning rather than re-training.
"""
import jax
import jax.numpy as jnp
import numpy as np

from robust_admm.experiments import workdir as workdir_lib
from robust_admm.models.external import parse_kwargs
from robust_admm.runtime import logs
from robust_admm.training.initialization import initial_variables


def inherited(config, model, input_shape, params_like):
    """(params, batch_stats, masks) inherited from `init.inherit_from`; errors name what
    differs between the two runs."""
    source = config.init.inherit_from
    src = workdir_lib.read_config(source)
    for section, name in (("data", "name"), ("model", "name"), ("model", "width"),
                          ("model", "kwargs")):
        a, b, field = src[section][name], config[section][name], f"{section}.{name}"
        # A user's model's constructor arguments are compared as the objects they parse
        # to, so that only the JSON's spelling may differ.
        same = parse_kwargs(a) == parse_kwargs(b) if name == "kwargs" else a == b
        if not same:
            raise ValueError(f"init.inherit_from={source!r} ran {field}={a!r}, this run "
                             f"{field}={b!r}: an inherited model keeps the source's "
                             f"architecture; set {field}={a!r}")
    stage = workdir_lib.finished_stage(source, config.init.inherit_stage or None, src)
    state = workdir_lib.load_final_state(source, stage)
    masks = jax.tree_util.tree_map(lambda m: np.asarray(m, bool), state["masks"])
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)
    if (jax.tree_util.tree_structure(masks) != jax.tree_util.tree_structure(params_like)
            or shapes(masks) != shapes(params_like)):
        raise ValueError(f"init.inherit_from={source!r}: its stage {stage!r} holds parameters "
                         f"of another structure or shape than this run's model")
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
