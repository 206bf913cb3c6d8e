"""Optimizers and learning-rate schedules of one stage, built with optax from its config."""
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "multistep", "periodic")


def make_schedule(cfg, steps_per_epoch: int, period_epochs: int | None = None):
    """The stage's learning-rate schedule (a function of the step within the stage).

    - constant, cosine (to 0 over the stage), multistep (x `gamma` at each fraction of the
      stage in `milestones`, e.g. "0.5,0.75");
    - periodic: a cosine that restarts every `period_epochs` (the ADMM update interval):
      each W-step starts again at the full learning rate, as in the original ADMM code.
    All of them after `warmup_epochs` of linear warmup from 0.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"schedule={cfg.schedule!r} is not known; allowed: {SCHEDULES}")
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(1, total - warmup))
    elif cfg.schedule == "multistep":
        fractions = [float(f) for f in str(cfg.milestones).split(",") if f.strip()]
        if any(not 0 < f < 1 for f in fractions):
            raise ValueError(f"milestones={cfg.milestones!r}: each must be a fraction in (0, 1)")
        main = optax.piecewise_constant_schedule(
            cfg.lr, {int(f * total) - warmup: cfg.gamma for f in fractions})
    else:
        if not period_epochs:
            raise ValueError("schedule='periodic' needs an ADMM update interval (admm stage only)")
        period = max(1, period_epochs * steps_per_epoch)
        main = optax.sgdr_schedule([
            dict(init_value=cfg.lr, peak_value=cfg.lr, decay_steps=period, warmup_steps=0)
            for _ in range(-(-total // period))])
    if warmup <= 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def make_optimizer(cfg, schedule) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum or Adam, with decoupled-from-loss L2 weight decay."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={cfg.optimizer!r} is not known; allowed: {OPTIMIZERS}")
    if cfg.lr <= 0:
        raise ValueError(f"lr={cfg.lr} must be > 0")
    if cfg.optimizer == "sgd":
        opt = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov)
    else:
        opt = optax.adam(schedule)
    # Weight decay as an L2 gradient term (as torch.optim.SGD's weight_decay does).
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
