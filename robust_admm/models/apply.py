"""How every model of the zoo is called: with or without BatchNorm statistics."""


def apply_model(model, params, batch_stats, x, train: bool):
    """Logits and the updated batch statistics (unchanged when there are none). With
    `train`, BatchNorm normalises with the batch's statistics and returns the updated
    running averages; without, it uses the running averages."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, new["batch_stats"]
        return model.apply(variables, x, train=False), batch_stats
    return model.apply(variables, x, train=train), batch_stats
