"""A user's own flax.linen model, named by import path: `model.name='my_pkg.my_module:MyNet'`
(anything with a ':'), built with the keyword arguments of `model.kwargs` (a JSON object).

Rules, so that a run's config.json says everything needed to rebuild the model:
- the attribute (dots allowed: 'mod:Outer.Net') must be a flax.linen.Module subclass;
- `num_classes` is passed when the class has a field of that name (the data's class count);
  giving it in `model.kwargs` is refused, the data owns that fact;
- JSON arrays arrive as tuples (flax modules are hashable only with tuple fields);
- `model.width` must be 1 and `model.normalize` 'none' (the zoo's knobs); `model.dtype`
  'bfloat16' is set with `clone(dtype=...)` only on a class with a `dtype` field.
Whether `__call__` takes `train` and whether the model has BatchNorm is read from the
model itself (`models.apply`); `check_model` verifies the model on the data's shapes.
"""
import dataclasses
import importlib
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from robust_admm.models.apply import apply_model, init_variables, takes_train, uses_dropout

# The variable collections the training state carries.
COLLECTIONS = ("params", "batch_stats")


def is_import_path(name) -> bool:
    """Whether `model.name` names a user's model ('module:Class') rather than the zoo's."""
    return isinstance(name, str) and ":" in name


def parse_kwargs(text) -> dict:
    """`model.kwargs` (a JSON object as a string; '' = none) -> dict, arrays as tuples."""
    if isinstance(text, dict):
        return {k: _tuples(v) for k, v in text.items()}
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if not isinstance(text, str):
        raise ValueError(f"model.kwargs={text!r} must be a JSON object as a string, e.g. "
                         f"'{{\"features\": 64}}'")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"model.kwargs={text!r} is not valid JSON ({e}); give a JSON "
                         f"object, e.g. --config.model.kwargs='{{\"features\": 64}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"model.kwargs={text!r} is a JSON {type(value).__name__}, not an "
                         f"object; e.g. --config.model.kwargs='{{\"features\": 64}}'")
    return {k: _tuples(v) for k, v in value.items()}


def _tuples(v):
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def resolve(name: str):
    """The object `name` ('module:attr[.attr]') names; errors name the value and the cause."""
    module_name, _, attr = name.rpartition(":")
    if not module_name or not attr or ":" in module_name:
        raise ValueError(f"model.name={name!r} is not an import path 'module:Class' "
                         f"(e.g. 'my_pkg.my_module:MyNet')")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # pylint: disable=broad-except  # a user's module may raise anything
        raise ValueError(f"model.name={name!r}: module {module_name!r} does not import: "
                         f"{type(e).__name__}: {e} (is its folder on PYTHONPATH?)") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            classes = sorted(k for k, v in vars(module).items()
                             if isinstance(v, type) and issubclass(v, nn.Module)
                             and v.__module__ == module.__name__)
            raise ValueError(f"model.name={name!r}: {module_name!r} has no attribute "
                             f"{attr!r}; its flax.linen.Module classes: {classes}")
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        kind = (f"an instance of {type(obj).__name__}" if not isinstance(obj, type)
                else f"the class {obj.__name__}")
        raise ValueError(f"model.name={name!r} is {kind}, not a flax.linen.Module subclass "
                         f"(give the class; its arguments go in model.kwargs)")
    return obj


def _fields(cls) -> list:
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def build(name: str, num_classes: int, width, dtype, normalize: str, kwargs):
    """The user's model `name` built with `kwargs` (see the module's rules)."""
    if width != 1:
        raise ValueError(f"model.width={width!r} with model.name={name!r}: the width "
                         f"multiplier is the zoo's; give your model's sizes in model.kwargs "
                         f"and leave model.width=1")
    if normalize != "none":
        raise ValueError(f"model.normalize={normalize!r} with model.name={name!r}: only the "
                         f"zoo's imagenet_* models normalise; normalise inside your model and "
                         f"leave model.normalize='none'")
    kw = parse_kwargs(kwargs)
    cls = resolve(name)
    fields = _fields(cls)
    if "num_classes" in kw:
        raise ValueError(f"model.kwargs={kwargs!r} gives num_classes: the class count comes "
                         f"from the data (passed to {cls.__name__}'s num_classes field)")
    if "num_classes" in fields:
        kw["num_classes"] = num_classes
    try:
        model = cls(**kw)
    except Exception as e:  # pylint: disable=broad-except  # TypeError, or the user's check
        raise ValueError(f"model.name={name!r} refuses model.kwargs={kwargs!r}: "
                         f"{type(e).__name__}: {e}; its fields: {fields}") from None
    if dtype is not None:
        if "dtype" not in fields:
            raise ValueError(f"model.dtype='bfloat16' with model.name={name!r}: "
                             f"{cls.__name__} has no `dtype` field to set it with; leave "
                             f"model.dtype='float32' (or add a `dtype` field)")
        model = model.clone(dtype=dtype)
    return model


def check_model(model, name: str, input_shape, num_classes: int) -> None:
    """Refuses, before anything compiles, a model that the training state cannot carry or
    whose logits are not (batch, num_classes): variables outside COLLECTIONS, BatchNorm
    statistics without a `train` argument to choose them, a forward pass that fails (in
    training or evaluation mode), an output of another shape. Shapes only (eval_shape)."""
    x = jax.ShapeDtypeStruct((2, *tuple(input_shape)[1:]), jnp.float32)
    where = f"model.name={name!r} on inputs {tuple(x.shape)} float32"
    try:
        variables = jax.eval_shape(lambda k, xx: init_variables(model, k, xx),
                                   jax.random.PRNGKey(0), x)
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{where}: init failed: {type(e).__name__}: {e}") from None
    extra = sorted(set(variables) - set(COLLECTIONS))
    if extra:
        raise ValueError(f"{where}: variable collections {extra}; a run carries only "
                         f"{list(COLLECTIONS)}")
    if "params" not in variables:
        raise ValueError(f"{where}: the model has no parameters to train")
    stats = variables.get("batch_stats", {})
    if stats and not takes_train(model):
        raise ValueError(f"{where}: the model has BatchNorm statistics but its __call__ "
                         f"takes no `train` argument to choose batch statistics (training) "
                         f"or running averages (evaluation); add `train: bool = False`")
    key = jax.random.PRNGKey(0) if uses_dropout(model) else None
    for train in (True, False):
        try:
            out = jax.eval_shape(
                lambda p, s, xx, k, t=train: apply_model(model, p, s, xx, t, k)[0],
                variables["params"], stats, x, key)
        except Exception as e:  # pylint: disable=broad-except
            mode = "training" if train else "evaluation"
            hint = (" (a model with dropout needs a `dropout_rate` field > 0, so that the "
                    "step hands it a 'dropout' key)" if "dropout" in str(e).lower() else "")
            raise ValueError(f"{where}: the {mode} forward pass failed: "
                             f"{type(e).__name__}: {e}{hint}") from None
        if not hasattr(out, "shape") or tuple(out.shape) != (2, num_classes):
            got = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            raise ValueError(f"{where}: the output is {got}; it must be logits of shape "
                             f"(batch, classes) = (2, {num_classes}) (the data has "
                             f"{num_classes} classes)")
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(f"{where}: the logits are {out.dtype}; they must be floats")
