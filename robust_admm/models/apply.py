"""How every model is called: with or without BatchNorm statistics, with a dropout key for
the models that have dropout, and with a `train` argument where its `__call__` takes one
(a user's model may not: `models.external`)."""
import functools
import inspect


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


def apply_model(model, params, batch_stats, x, train: bool, dropout_key=None):
    """Logits and the updated batch statistics (unchanged when there are none). With
    `train`, BatchNorm normalises with the batch's statistics and returns the updated
    running averages; without, it uses the running averages. `dropout_key`, where given,
    is the 'dropout' rng: models with dropout drop units only with `train` and a key, so
    a train-mode pass without one (the attack's) is deterministic. A model whose
    `__call__` takes no `train` gets none (`takes_train`)."""
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
