"""A run's initial weights: `init.scheme` re-draws every kernel (conv and dense) with one
of jax.nn.initializers' schemes (biases stay 0, BatchNorm scales 1); 'default' keeps
flax's (LeCun normal); `init.pretrained` reads torchvision's or timm's ImageNet weights
from a safetensors file (models/pretrained.py). Starting from another run's pruned model
(`init.inherit_from`) is `experiments/inherit.py`'s business: it reads that run's
workdir."""
import jax
import jax.numpy as jnp

from robust_admm.models import get_model, init_variables, pretrained
from robust_admm.runtime import logs

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
    if init_cfg.pretrained_head not in pretrained.HEAD_MODES:
        raise ValueError(f"init.pretrained_head={init_cfg.pretrained_head!r}; allowed: "
                         f"{', '.join(pretrained.HEAD_MODES)}")


def check_pretrained(config, input_shape, num_classes=None):
    """Refuses `init.pretrained` where it cannot apply, before any data is read or anything
    compiled: with a non-default `init.scheme` or with `init.inherit_from`, on a model
    without a mapping or without ImageNet's normalisation, a file that is not a readable
    safetensors file, or one whose names and shapes do not fit the model (built at
    `num_classes`; None: at the checkpoint's own class count, the data's being unknown
    yet)."""
    init, path = config.init, config.init.pretrained
    if init.scheme != "default":
        raise ValueError(f"init.pretrained={path!r} with init.scheme={init.scheme!r}: the "
                         f"pretrained weights are the initialisation; set one of them only "
                         f"(init.scheme='default')")
    if init.inherit_from:
        raise ValueError(f"init.pretrained={path!r} with init.inherit_from="
                         f"{init.inherit_from!r}: a run starts from one of them only")
    name = config.model.name
    if name not in pretrained.MAPPED_MODELS:
        raise ValueError(f"init.pretrained={path!r}: model.name={name!r} has no mapping from "
                         f"torchvision's or timm's names; models with one: "
                         f"{', '.join(pretrained.MAPPED_MODELS)}")
    if config.model.normalize != "imagenet":
        raise ValueError(f"init.pretrained={path!r} with model.normalize="
                         f"{config.model.normalize!r}: torchvision's and timm's ImageNet "
                         f"weights expect pixels normalised by ImageNet's mean and std; set "
                         f"model.normalize='imagenet'")
    shapes = pretrained.read_shapes(path)
    classes = num_classes or pretrained.checkpoint_classes(name, shapes) or 1000
    model = get_model(name, classes, config.model.width, "float32", config.model.normalize)
    like = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    pretrained.check_fit(name, shapes, like["params"], like.get("batch_stats", {}),
                         init.pretrained_head, f"init.pretrained={path!r}")


def initial_variables(config, model, input_shape):
    """(params, batch_stats) a run of `config` starts from, before any inheritance."""
    check(config.init)
    key = jax.random.PRNGKey(config.seed)
    if config.init.pretrained:
        return _pretrained(config, model, jax.random.fold_in(key, 12345), input_shape)
    variables = init_variables(model, jax.random.fold_in(key, 12345),
                               jnp.zeros(input_shape, jnp.float32))
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


def _pretrained(config, model, key, input_shape):
    """The model's variables from `init.pretrained`. With `init.pretrained_head='new'` the
    classifier is the model's own, drawn as `model.init` draws it without pretrained
    weights; otherwise the model is never initialised (only its shapes are read)."""
    path, head = config.init.pretrained, config.init.pretrained_head
    x = jnp.zeros(input_shape, jnp.float32)
    if head == "new":
        variables = jax.jit(model.init)(key, x)
    else:
        variables = jax.eval_shape(model.init, key, x)
    state = pretrained.read_state(path)
    params, batch_stats = pretrained.from_torch(
        config.model.name, state, variables["params"], variables.get("batch_stats", {}), head,
        f"init.pretrained={path!r}")
    timm = pretrained.checkpoint_format(config.model.name, state) == "timm"
    logs.log(f"initial weights: {path} ({len(state)} tensors{', timm names' if timm else ''}"
             f"); classifier: {'drawn afresh' if head == 'new' else 'pretrained'}")
    return jax.tree_util.tree_map(jnp.asarray, (params, batch_stats))
