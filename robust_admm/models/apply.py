"""How every model is called: with or without BatchNorm statistics, with a dropout key for
the models that have dropout, and with a `train` argument where its `__call__` takes one
(a user's model may not: `models.external`). A user's model is computed on CPU in the
zoo's CPU forms (`models.cpu_forms`), as the zoo's own layers are: the same model, its
convolutions and small max-pools in the forms tuned for XLA:CPU."""
import functools
import inspect

from robust_admm.models.cpu_forms import with_cpu_forms

ZOO_PACKAGE = "robust_admm."  # the zoo's classes live under it; their layers pick CPU forms


def uses_dropout(model) -> bool:
    """Whether `model` drops units in training (a `dropout_rate` field above 0). The train
    step derives and hands a dropout key only to such models, so the programs of the others
    are what they are without dropout."""
    return getattr(model, "dropout_rate", 0.0) > 0


@functools.lru_cache(maxsize=None)
def _train_parameter(cls):
    return inspect.signature(cls.__call__).parameters.get("train")


def takes_train(model) -> bool:
    """Whether the model's `__call__` has a `train` parameter (every model of the zoo has;
    a model without it is called without it, the same in training and evaluation)."""
    return _train_parameter(type(model)) is not None


def init_variables(model, key, x):
    """`model.init(key, x)`, with train=False where `train` has no default (the zoo's
    models all default it, and are initialised as they always were)."""
    p = _train_parameter(type(model))
    if p is not None and p.default is inspect.Parameter.empty:
        return model.init(key, x, train=False)
    return model.init(key, x)


def is_zoo_model(model) -> bool:
    """Whether `model` is one of the zoo's (its class defined in this package), whose
    layers choose their CPU forms themselves; any other model is a user's."""
    return type(model).__module__.startswith(ZOO_PACKAGE)


def apply_model(model, params, batch_stats, x, train: bool, dropout_key=None):
    """Logits and the updated batch statistics (unchanged when there are none). With
    `train`, BatchNorm normalises with the batch's statistics and returns the updated
    running averages; without, it uses the running averages. `dropout_key`, where given,
    is the 'dropout' rng: models with dropout drop units only with `train` and a key, so
    a train-mode pass without one (the attack's) is deterministic. A model whose
    `__call__` takes no `train` gets none (`takes_train`). A user's model
    (`is_zoo_model` false) is evaluated through `with_cpu_forms` (on CPU only: elsewhere
    that is the model itself): the same values up to the rounding of its convolutions'
    sums, in the forms the zoo's layers use on CPU."""
    if not is_zoo_model(model):
        call = lambda p, s, xx, k: _apply(model, p, s, xx, train, k)
        return with_cpu_forms(call)(params, batch_stats, x, dropout_key)
    return _apply(model, params, batch_stats, x, train, dropout_key)


def _apply(model, params, batch_stats, x, train: bool, dropout_key):
    variables = {"params": params}
    kw = {} if dropout_key is None else {"rngs": {"dropout": dropout_key}}
    if takes_train(model):
        kw["train"] = train
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            logits, new = model.apply(variables, x, mutable=["batch_stats"], **kw)
            return logits, new["batch_stats"]
        return model.apply(variables, x, **kw), batch_stats
    return model.apply(variables, x, **kw), batch_stats
