"""Checks of a config before any data is loaded or anything compiled: each error names
the field, the bad value and what is allowed."""
import jax

from robust_admm import compiler, data, objectives, optim, parallel
from robust_admm.attacks.core import LOSSES
from robust_admm.config_base import STAGES
from robust_admm.models import get_model
from robust_admm.step import PGD_LOOPS

PRUNE_KINDS = ("irregular", "filter", "column", "channel")
ATTACK_LOSSES = tuple(LOSSES)  # what PGD ascends in training and evaluation
NONFINITE_POLICIES = ("stop", "skip")


def parse_stages(stages: str) -> list:
    """'pretrain,admm,retrain' -> list, checked to be a non-empty ordered subset."""
    names = [s.strip() for s in str(stages).split(",") if s.strip()]
    if not names:
        raise ValueError(f"stages={stages!r} is empty; allowed: a comma-separated, ordered "
                         f"subset of {','.join(STAGES)}")
    for s in names:
        if s not in STAGES:
            raise ValueError(f"stages={stages!r}: unknown stage {s!r}; allowed: {STAGES}")
    order = [STAGES.index(s) for s in names]
    if order != sorted(set(order)):
        raise ValueError(f"stages={stages!r} is out of order; allowed order: "
                         f"{','.join(STAGES)} (each stage starts from the previous one)")
    if order != list(range(order[0], order[0] + len(order))):
        raise ValueError(f"stages={stages!r} must be consecutive in {','.join(STAGES)} "
                         f"(each stage starts from the previous one)")
    return names


def parse_ratios(text: str) -> dict:
    """'conv1=0.8,fc*=0.9' -> {'conv1': 0.8, 'fc*': 0.9}."""
    out = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"prune.ratios={text!r}: item {item!r} is not 'layer=ratio'") from None
    if not out:
        raise ValueError(f"prune.ratios={text!r} names no layer; e.g. 'conv1=0.5,fc*=0.9'")
    for key, r in out.items():
        if not 0.0 <= r < 1.0:
            raise ValueError(f"prune.ratios={text!r}: ratio {r} for {key!r} is outside [0, 1)")
    return out


def _require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}")


def validate_config(config, device_count: int | None = None):
    """Raises ValueError (or NotImplementedError) on the first bad field."""
    stages = parse_stages(config.stages)
    _require(config.setting in ("adversarial", "natural"), "setting", config.setting,
             "'adversarial' or 'natural'")
    _require(config.objective in objectives.OBJECTIVES, "objective", config.objective,
             f"one of {objectives.OBJECTIVES}")
    _require(config.objective_beta >= 0, "objective_beta", config.objective_beta, ">= 0")
    if config.setting == "natural" and config.objective in ("trades", "mart"):
        raise ValueError(f"objective={config.objective!r} needs an attack; setting='natural' "
                         f"trains without one (use setting='adversarial')")
    if config.objective == "trades" and config.attack.loss != "ce":
        raise ValueError(f"attack.loss={config.attack.loss!r} with objective='trades': its "
                         f"attack ascends the KL to the clean prediction; leave attack.loss "
                         f"at 'ce'")
    _require(config.data.name in data.DATASETS, "data.name", config.data.name,
             f"one of {list(data.DATASETS)}")
    _require(config.data.source in data.SOURCES, "data.source", config.data.source,
             f"one of {list(data.SOURCES)}")
    get_model(config.model.name, 10, config.model.width)  # names the bad model / width
    for prefix, a in (("attack", config.attack), ("eval", config.eval)):
        _require(a.num_steps >= 0, f"{prefix}.num_steps", a.num_steps, "an integer >= 0")
        _require(a.step_size > 0, f"{prefix}.step_size", a.step_size, "a number > 0")
    for prefix, a in (("attack", config.attack), ("eval", config.eval)):
        _require(0 <= a.epsilon <= 1, f"{prefix}.epsilon", a.epsilon,
                 "a number in [0, 1] (pixels are in [0, 1])")
        _require(a.loss in ATTACK_LOSSES, f"{prefix}.loss", a.loss, f"one of {ATTACK_LOSSES}")
    _require(config.attack.loop in PGD_LOOPS, "attack.loop", config.attack.loop,
             f"one of {list(PGD_LOOPS)}")
    # Names a bad value, and refuses 'xla' on a jaxlib without the option.
    compiler.compiler_options(config.cpu_convolutions)
    _require(config.attack.unroll >= 1, "attack.unroll", config.attack.unroll, "an integer >= 1")
    _require(config.eval.restarts >= 1, "eval.restarts", config.eval.restarts, "an integer >= 1")
    _require(config.eval.every_epochs >= 1, "eval.every_epochs", config.eval.every_epochs, ">= 1")
    devices = jax.device_count() if device_count is None else device_count
    parallel.check_global_batch(config.batch_size, devices, "batch_size")
    parallel.check_global_batch(config.eval.batch_size, devices, "eval.batch_size")
    if config.prune.kind == "quantize":
        raise NotImplementedError("prune.kind='quantize': ADMM quantization with quantized "
                                  "retraining is not implemented yet; allowed: "
                                  f"{PRUNE_KINDS}")
    _require(config.prune.kind in PRUNE_KINDS, "prune.kind", config.prune.kind,
             f"one of {PRUNE_KINDS}")
    if not config.prune.to_width:
        parse_ratios(config.prune.ratios)
    for stage in STAGES:
        s = config[stage]
        _require(s.epochs >= 0, f"{stage}.epochs", s.epochs, "an integer >= 0")
        try:
            period = config.admm.update_every_epochs if stage == "admm" else None
            optim.make_optimizer(s, optim.make_schedule(s, 1, period))
        except ValueError as e:
            raise ValueError(f"{stage}: {e}") from None
    _require(config.admm.rho > 0, "admm.rho", config.admm.rho, "a number > 0")
    _require(config.admm.rho_growth >= 1, "admm.rho_growth", config.admm.rho_growth, ">= 1")
    _require(config.admm.update_every_epochs >= 1, "admm.update_every_epochs",
             config.admm.update_every_epochs, "an integer >= 1")
    _require(config.checkpoint.every_steps >= 1, "checkpoint.every_steps",
             config.checkpoint.every_steps, "an integer >= 1")
    _require(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, ">= 1")
    _require(config.nonfinite.policy in NONFINITE_POLICIES, "nonfinite.policy",
             config.nonfinite.policy, f"one of {NONFINITE_POLICIES}")
    _require(config.log_every_steps >= 1, "log_every_steps", config.log_every_steps, ">= 1")
    return stages


# Fields that may change between runs in one workdir without changing the results.
RESUMABLE_CHANGES = ("stages", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep",
                     "attack.loop", "attack.unroll", "cpu_convolutions")


def config_differences(old: dict, new: dict, prefix: str = "") -> list:
    """['field: old -> new', ...] between two config dicts, ignoring RESUMABLE_CHANGES."""
    out = []
    for key in sorted(set(old) | set(new)):
        field = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, field + ".")
        elif a != b and field not in RESUMABLE_CHANGES:
            out.append(f"{field}: {a!r} -> {b!r}")
    return out
