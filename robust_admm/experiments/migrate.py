"""Reading a config.json that an older release wrote: the fields added since, at the
values that mean what it ran (the one place that knows the config's history)."""
from robust_admm.compression.rules import comma_list
from robust_admm.experiments.config_base import STAGES, base_config, phase_config
from robust_admm.training.program import PHASE_KINDS

DEFAULT_KINDS = dict(zip(STAGES, PHASE_KINDS))  # the default program's phases


def _check_sections(d):
    """What the upgrade reads has the shape it reads (a damaged file: an error naming it)."""
    if not isinstance(d, dict):
        raise ValueError(f"the config is a JSON {type(d).__name__}, not an object")
    for field in ("data", "model", "init", "eval", "attack", "prune", "checkpoint",
                  "nonfinite"):
        if field in d and not isinstance(d[field], dict):
            raise ValueError(f"{field}={d[field]!r} is not an object (a config section)")
    if "program" in d and not isinstance(d["program"], str):
        raise ValueError(f"program={d['program']!r} is not a text (phase names, e.g. "
                         f"'pretrain,admm,retrain')")
    for name in comma_list(d["program"]) if "program" in d else STAGES:
        if "program" not in d and name not in d:
            raise ValueError(f"{name} is missing (a phase of the default program)")
        if name in d and not isinstance(d[name], dict):
            raise ValueError(f"{name}={d[name]!r} is not an object (a phase's settings)")


def upgrade_config_dict(d: dict) -> dict:
    """A config.json written by an older version, read with the fields added since at the
    values that mean what it ran: no augmentation, no label smoothing or mixup, float32,
    no normalisation and no kwargs in the model, the default initialisation (no
    pretrained weights), the streamed sources' fields at their defaults (unused by the
    sources it had), every phase on `attack.*`, every evaluation during training attacked
    on the whole test split; before programs, the default program.
    A ValueError names a section that is not an object, or a phase that is missing."""
    _check_sections(d)
    for field in ("label_smoothing", "mixup_alpha"):  # both off before they existed
        if field not in d:
            d = dict(d, **{field: 0.0})
    if "init" not in d or set(base_config().init) - set(d["init"]):
        # Before init (and each init field since, e.g. init.pretrained): the defaults.
        d = dict(d, init={**base_config().init.to_dict(), **d.get("init", {})})
    if "augment" not in d.get("data", {"augment": None}):
        d = dict(d, data=dict(d["data"], augment="none"))
    if "data" in d and set(base_config().data) - set(d["data"]):
        # Before streamed sources (and each data field since): what it lacks, at the
        # defaults, which read the data as it did.
        d = dict(d, data={**base_config().data.to_dict(), **d["data"]})
    if "eval" in d and "adversarial" not in d["eval"]:
        # Before eval.adversarial and eval.n: every evaluation attacked, on the whole split.
        d = dict(d, eval=dict(d["eval"], adversarial="every_eval"))
    if "eval" in d and "n" not in d["eval"]:
        d = dict(d, eval=dict(d["eval"], n=0))
    if "model" in d and set(base_config().model) - set(d["model"]):
        # model.dtype, model.normalize, model.kwargs: float32, 'none', '' (none: the
        # zoo's models, all a run could have before, take no constructor arguments).
        d = dict(d, model={**base_config().model.to_dict(), **d["model"]})
    if "program" in d:
        for name in comma_list(d["program"]):  # phase fields added since programs
            if name in d and "attack_steps" not in d[name]:
                d = dict(d, **{name: dict(d[name], attack_steps=None, attack_step_size=None)})
        return d
    d = dict(d, program=",".join(STAGES))
    for name, kind in DEFAULT_KINDS.items():
        # The fields phases gained since, at their defaults.
        d[name] = {**phase_config(kind, epochs=0, lr=1.0).to_dict(), **d[name]}
    return d
