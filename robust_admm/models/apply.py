"""How every model of the zoo is called: with or without BatchNorm statistics, and with a
dropout key for the models that have dropout."""


def uses_dropout(model) -> bool:
    """Whether `model` drops units in training (a `dropout_rate` field above 0). The train
    step derives and hands a dropout key only to such models, so the programs of the others
    are what they are without dropout."""
    return getattr(model, "dropout_rate", 0.0) > 0


def apply_model(model, params, batch_stats, x, train: bool, dropout_key=None):
    """Logits and the updated batch statistics (unchanged when there are none). With
    `train`, BatchNorm normalises with the batch's statistics and returns the updated
    running averages; without, it uses the running averages. `dropout_key`, where given,
    is the 'dropout' rng: models with dropout drop units only with `train` and a key, so
    a train-mode pass without one (the attack's) is deterministic."""
    variables = {"params": params}
    rngs = {} if dropout_key is None else {"rngs": {"dropout": dropout_key}}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                      **rngs)
            return logits, new["batch_stats"]
        return model.apply(variables, x, train=False, **rngs), batch_stats
    return model.apply(variables, x, train=train, **rngs), batch_stats
