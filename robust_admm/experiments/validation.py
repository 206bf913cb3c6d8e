"""Checks of a config before any data is loaded or anything compiled: each error names
the field, the bad value and what is allowed."""
import jax

from robust_admm import data
from robust_admm.attacks.core import LOSSES
from robust_admm.compression import admm as admm_lib
from robust_admm.compression.projections import UNIT_KINDS
from robust_admm.compression.rules import parse_rules
from robust_admm.data.images import CHANNELS, CROPS
from robust_admm.data.stream import BAD_IMAGES
from robust_admm.data.streamed import STREAMED_SOURCES, streamed
from robust_admm.evaluation.eval_step import EVAL_ADVERSARIAL
from robust_admm.experiments.config_base import base_config, phase_config
from robust_admm.models import get_model, parse_kwargs
from robust_admm.runtime import compiler, parallel
from robust_admm.training import augment, initialization, objectives, optim
from robust_admm.training.program import PHASE_KINDS as PHASE_KINDS_ALL
from robust_admm.training.program import parse_program, phases_to_run

ATTACK_LOSSES = tuple(LOSSES)  # what PGD ascends in training and evaluation
NONFINITE_POLICIES = ("stop", "skip")


# Fields the base config leaves to the dataset config (experiments/config_base.py).
DATASET_FIELDS = ("data.name", "model.name", "attack.epsilon", "attack.step_size",
                  "eval.epsilon", "eval.step_size")


def _field(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(ok: bool, field: str, value, allowed: str):
    if not ok:
        raise ValueError(f"{field}={value!r} is not allowed: {allowed}")


def _type_error(field: str, value, want) -> ValueError:
    return ValueError(f"{field}={value!r} is not allowed: the field holds "
                      f"{'a ' + want.__name__ if want is not dict else 'an object'}")


def check_types(config, template, prefix: str = ""):
    """Every field of `template` (a ConfigDict) is in `config` with a value of its type
    (an int where a float is wanted too; None where the template's is a placeholder), and
    no float is NaN: a ValueError naming the first field that is not. Fields `template`
    lacks are left alone. For a config not made by a config file: a config.json read
    back, a study.json, a library user's ConfigDict."""
    for key in template.keys():
        field = f"{prefix}{key}"
        if key not in config:
            raise ValueError(f"{field} is missing; every config has it (experiments/"
                             f"config_base.py)")
        value, want = config[key], template.get_type(key)
        if hasattr(template[key], "keys"):
            if not hasattr(value, "keys"):
                raise _type_error(field, value, dict)
            check_types(value, template[key], field + ".")
            continue
        if value is None and (template[key] is None or want is type(None)):
            continue
        if want is type(None):
            continue
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}.get(want, lambda v: isinstance(v, want))
        if not ok(value):
            raise _type_error(field, value, want)
        if isinstance(value, float) and value != value:
            raise ValueError(f"{field}=nan is not allowed: a number is wanted")


def check_config_types(config):
    """`check_types` of a training config against the base config and, for each phase
    its program names, against its kind's phase config."""
    check_types(config, base_config())
    program = config["program"]
    for name in (s.strip() for s in program.split(",") if s.strip()):
        phase = config.get(name)
        if hasattr(phase, "keys") and phase.get("kind") in PHASE_KINDS_ALL:
            check_types(phase, phase_config(phase["kind"], epochs=0, lr=0.0), name + ".")


def validate_config(config, device_count: int | None = None):
    """Raises ValueError (or NotImplementedError) on the first bad field; returns the
    program's phases and those to run (training/program.py)."""
    check_config_types(config)
    unset = [f for f in DATASET_FIELDS if _field(config, f) in (None, "")]
    if unset:
        raise ValueError(f"{', '.join(unset)} not set: a dataset config (configs/*.py) sets "
                         f"them, or the command line, e.g. --config.attack.epsilon=0.3")
    phases_all = parse_program(config)
    phases = phases_to_run(config, phases_all)
    _require(config.setting in ("adversarial", "natural"), "setting", config.setting,
             "'adversarial' or 'natural'")
    _require(config.objective in objectives.OBJECTIVES, "objective", config.objective,
             f"one of {objectives.OBJECTIVES}")
    _require(config.objective_beta >= 0, "objective_beta", config.objective_beta, ">= 0")
    _require(_is_number(config.label_smoothing) and 0 <= config.label_smoothing < 1,
             "label_smoothing", config.label_smoothing, "a number in [0, 1) (0: off)")
    _require(_is_number(config.mixup_alpha) and config.mixup_alpha >= 0, "mixup_alpha",
             config.mixup_alpha, "a number >= 0 (0: off)")
    if config.setting == "natural" and config.objective in ("trades", "mart"):
        raise ValueError(f"objective={config.objective!r} needs an attack; setting='natural' "
                         f"trains without one (use setting='adversarial')")
    if config.objective == "trades" and config.attack.loss != "ce":
        raise ValueError(f"attack.loss={config.attack.loss!r} with objective='trades': its "
                         f"attack ascends the KL to the clean prediction; leave attack.loss "
                         f"at 'ce'")
    _require(config.data.source in data.SOURCES + STREAMED_SOURCES, "data.source",
             config.data.source, f"one of {list(data.SOURCES + STREAMED_SOURCES)}")
    _require(config.data.augment in augment.AUGMENTATIONS, "data.augment", config.data.augment,
             f"one of {augment.AUGMENTATIONS}")
    if streamed(config.data.source, config.data.name):
        check_streamed(config.data)
    elif config.data.source == "npz":  # the name is a label; the file is read at the start
        _require(bool(config.data.dir), "data.dir", config.data.dir,
                 "the path of the .npz file (x_train, y_train, x_test, y_test) with "
                 "data.source='npz'")
    else:
        _require(config.data.name in data.DATASETS, "data.name", config.data.name,
                 f"one of {list(data.DATASETS)} (or a streamed data.source: "
                 f"{', '.join(STREAMED_SOURCES)}, or any TFDS dataset with tfds, or your "
                 f"own arrays with data.source='npz')")
    initialization.check(config.init)
    # Names a bad model, width, dtype, normalisation or kwargs; an import-path model is
    # imported and built here (its output is checked on the data's shapes at the start).
    get_model(config.model.name, 10, config.model.width, config.model.dtype,
              config.model.normalize, config.model.kwargs)
    if config.init.pretrained:
        initialization.check_pretrained(config, *_input_of(config))
    for prefix, a in (("attack", config.attack), ("eval", config.eval)):
        _require(a.num_steps >= 0, f"{prefix}.num_steps", a.num_steps, "an integer >= 0")
        _require(a.step_size > 0, f"{prefix}.step_size", a.step_size, "a number > 0")
    for prefix, a in (("attack", config.attack), ("eval", config.eval)):
        _require(0 <= a.epsilon <= 1, f"{prefix}.epsilon", a.epsilon,
                 "a number in [0, 1] (pixels are in [0, 1])")
        _require(a.loss in ATTACK_LOSSES, f"{prefix}.loss", a.loss, f"one of {ATTACK_LOSSES}")
    _require(config.attack.loop in compiler.PGD_LOOPS, "attack.loop", config.attack.loop,
             f"one of {list(compiler.PGD_LOOPS)}")
    # Names a bad value, and refuses 'xla' on a jaxlib without the option.
    compiler.compiler_options(config.cpu_convolutions)
    _require(config.attack.unroll >= 1, "attack.unroll", config.attack.unroll, "an integer >= 1")
    _require(config.eval.restarts >= 1, "eval.restarts", config.eval.restarts, "an integer >= 1")
    _require(config.eval.every_epochs >= 1, "eval.every_epochs", config.eval.every_epochs, ">= 1")
    _require(config.eval.adversarial in EVAL_ADVERSARIAL, "eval.adversarial",
             config.eval.adversarial, f"one of {EVAL_ADVERSARIAL}")
    _require(isinstance(config.eval.n, int) and not isinstance(config.eval.n, bool)
             and config.eval.n >= 0, "eval.n", config.eval.n,
             "an integer >= 0 (0: the whole test split)")
    devices = jax.device_count() if device_count is None else device_count
    parallel.check_global_batch(config.batch_size, devices, "batch_size")
    parallel.check_global_batch(config.eval.batch_size, devices, "eval.batch_size")
    _require(config.prune.kind in UNIT_KINDS, "prune.kind", config.prune.kind,
             f"one of {UNIT_KINDS} (N:M and quantization: a phase's rules, e.g. "
             f"--config.admm.rules='fc*=nm:2:4,conv2=quantize:4')")
    for phase in phases_all:
        s = config[phase.name]
        _require(s.epochs >= 0, f"{phase.name}.epochs", s.epochs, "an integer >= 0")
        steps, size = s.get("attack_steps"), s.get("attack_step_size")
        _require(steps is None or steps >= 0, f"{phase.name}.attack_steps", steps,
                 "an integer >= 0, or None for attack.num_steps")
        _require(size is None or size > 0, f"{phase.name}.attack_step_size", size,
                 "a number > 0, or None for attack.step_size")
        if phase.compresses:
            parse_rules(phase.rules)  # the syntax; layers are matched at the start
        if phase.kind == "retrain":
            _require(s.quantize_update in admm_lib.QUANTIZE_UPDATES,
                     f"{phase.name}.quantize_update", s.quantize_update,
                     f"one of {admm_lib.QUANTIZE_UPDATES}")
        if phase.kind == "admm":
            _require(s.rho > 0, f"{phase.name}.rho", s.rho, "a number > 0")
            _require(s.rho_growth >= 1, f"{phase.name}.rho_growth", s.rho_growth, ">= 1")
            _require(s.update_every_epochs >= 1, f"{phase.name}.update_every_epochs",
                     s.update_every_epochs, "an integer >= 1")
        try:
            period = s.update_every_epochs if phase.kind == "admm" else None
            optim.make_optimizer(s, optim.make_schedule(s, 1, period))
        except ValueError as e:
            raise ValueError(f"{phase.name}: {e}") from None
    _require(config.checkpoint.every_steps >= 1, "checkpoint.every_steps",
             config.checkpoint.every_steps, "an integer >= 1")
    _require(config.checkpoint.keep >= 1, "checkpoint.keep", config.checkpoint.keep, ">= 1")
    _require(config.nonfinite.policy in NONFINITE_POLICIES, "nonfinite.policy",
             config.nonfinite.policy, f"one of {NONFINITE_POLICIES}")
    _require(config.log_every_steps >= 1, "log_every_steps", config.log_every_steps, ">= 1")
    return phases_all, phases


def _input_of(config) -> tuple:
    """(model input shape, class count or None where the data will tell) of a valid data
    config, without reading the data."""
    d = config.data
    if streamed(d.source, d.name):
        return (1, d.image_size, d.image_size, d.channels), None
    shape, classes = data.input_shape(d.name, d.source, d.dir or None)
    return (1, *shape), classes


# Fields that may change between runs in one workdir without changing the results.
RESUMABLE_CHANGES = ("stages", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep",
                     "attack.loop", "attack.unroll", "cpu_convolutions")


def config_differences(old: dict, new: dict, prefix: str = "") -> list:
    """['field: old -> new', ...] between two config dicts, ignoring RESUMABLE_CHANGES
    (and a `model.kwargs` written with other spacing or key order: the same JSON object)."""
    out = []
    for key in sorted(set(old) | set(new)):
        field = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, field + ".")
        elif a != b and field not in RESUMABLE_CHANGES and not (
                field == "model.kwargs" and _same_kwargs(a, b)):
            out.append(f"{field}: {a!r} -> {b!r}")
    return out


def _same_kwargs(a, b) -> bool:
    try:
        return parse_kwargs(a) == parse_kwargs(b)
    except ValueError:
        return False


def check_streamed(d) -> None:
    """The fields of a streamed source (`data.streamed.streamed`)."""
    _require(bool(d.name), "data.name", d.name, "a name for the dataset (e.g. 'imagenet')")
    if d.source != "tfds":  # TFDS has its default data_dir
        _require(bool(d.dir), "data.dir", d.dir, f"the folder of the {d.source}")
    _require(isinstance(d.image_size, int) and d.image_size >= 8, "data.image_size",
             d.image_size, "an integer >= 8 (the side of the crops the model sees)")
    _require(d.augment == "none", "data.augment", d.augment,
             "'none' with a streamed source (its training crop and flip are "
             "RandomResizedCrop's, on the host)")
    _require(d.crops in CROPS, "data.crops", d.crops, f"one of {list(CROPS)}")
    _require(d.channels in CHANNELS, "data.channels", d.channels, f"one of {list(CHANNELS)}")
    _require(d.bad_images in BAD_IMAGES, "data.bad_images", d.bad_images,
             f"one of {list(BAD_IMAGES)}")
    _require(d.max_pixels >= 1, "data.max_pixels", d.max_pixels, "an integer >= 1")
    _require(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    _require(d.num_threads >= 1, "data.num_threads", d.num_threads, "an integer >= 1")
    _require(d.prefetch >= 1, "data.prefetch", d.prefetch, "an integer >= 1")
    for field in ("train_examples", "test_examples"):
        _require(d[field] == 0, f"data.{field}", d[field],
                 "0 with a streamed source (make a smaller folder instead)")
