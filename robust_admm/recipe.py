"""A run's compression program: its phases in order, and the compression rules of each.

The config names the phases in `program` ("pretrain,admm,retrain" by default); each name
is a top-level field holding that phase's settings (`--config.admm.epochs=4` overrides one),
whose `kind` says what it does:

- `dense`: training without compression constraints (masks from earlier phases are kept);
- `admm`: training with the ADMM penalty toward the phase's rules, Z/U updated every
  `update_every_epochs` epochs;
- `retrain`: the weights are hard-projected onto the phase's rules once, then fine-tuned
  with the result kept: pruned weights stay zero, quantized weights stay on their levels.

Rules (`rules` of an admm or retrain phase) map layers to compression sets:

    "conv*=filter:0.5, fc1=irregular:0.9+quantize:4, fc2=nm:2:4, conv2=quantize:2"

`pattern=set[+set]`: the pattern is a layer name or a glob over the `/`-joined module path;
a set is `irregular|filter|column|channel:RATIO` (the fraction of units removed) or
`...:wK` (keep as many weights as the same model at width K), `nm:N:M` (N of every M along
the input channels), `quantize:BITS` (1 = binary, 2 = ternary, k-bit; on its own or on top
of one sparsity set). An empty `rules` takes the rules of the closest earlier admm or
retrain phase, and the first one takes `prune.kind` / `prune.ratios` / `prune.to_width`.
"""
import dataclasses

import jax
import jax.numpy as jnp

from robust_admm import projections
from robust_admm.config_base import STAGES, base_config, phase_config
from robust_admm.models import get_model

PHASE_KINDS = ("dense", "admm", "retrain")
DEFAULT_KINDS = dict(zip(STAGES, PHASE_KINDS))  # the default program's phases
RULE_KINDS = ("irregular", "filter", "column", "channel")  # the kinds taking a ratio


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    kind: str  # one of PHASE_KINDS
    index: int  # position in the program (random keys are folded with it)
    rules: str  # the rules text in force ('' for a dense phase)
    rules_from: str = ""  # whose `rules` field that is: a phase's name, or 'prune'

    @property
    def compresses(self) -> bool:
        return self.kind != "dense"


def _names(text: str) -> list:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def parse_ratios(text: str) -> dict:
    """'conv1=0.8,fc*=0.9' -> {'conv1': 0.8, 'fc*': 0.9} (`prune.ratios`)."""
    out = {}
    for item in _names(text):
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


def legacy_rules(prune) -> str:
    """`prune.kind` with `prune.ratios` (or `prune.to_width`) as a rules text."""
    if prune.to_width:
        return ",".join(f"{layer}={prune.kind}:w{prune.to_width}"
                        for layer in _names(prune.to_width_layers))
    return ",".join(f"{layer}={prune.kind}:{ratio!r}"
                    for layer, ratio in parse_ratios(prune.ratios).items())


def parse_program(config) -> list:
    """The program's phases, each with the rules it inherits resolved to text."""
    names = _names(config.program)
    if not names:
        raise ValueError(f"program={config.program!r} is empty; e.g. 'pretrain,admm,retrain'")
    phases, rules, source = [], "", ""
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ValueError(f"program={config.program!r} names phase {name!r} twice")
        cfg = config.get(name)
        if cfg is None or not hasattr(cfg, "get") or cfg.get("kind") is None:
            raise ValueError(
                f"program={config.program!r}: {name!r} is not a phase (a config field "
                f"with a 'kind'); a config file defines phases with "
                f"config_base.phase_config(kind, ...)")
        kind = cfg.kind
        if kind not in PHASE_KINDS:
            raise ValueError(f"{name}.kind={kind!r} is not allowed; allowed: {PHASE_KINDS}")
        if kind != "dense":
            if cfg.get("rules", ""):
                rules, source = cfg.rules, name
            elif not rules:
                if not (config.prune.to_width or _names(config.prune.ratios)):
                    raise ValueError(
                        f"phase {name!r} ({kind}) has no compression rules: set "
                        f"{name}.rules (e.g. 'conv*=filter:0.5,fc*=irregular:0.9') or "
                        f"prune.ratios")
                rules, source = legacy_rules(config.prune), "prune"
        phases.append(Phase(name=name, kind=kind, index=i,
                            rules=rules if kind != "dense" else "",
                            rules_from=source if kind != "dense" else ""))
    return phases


def upgrade_config_dict(d: dict) -> dict:
    """A config.json written by an older version, read with the fields added since at the
    values that mean what it ran: no augmentation, float32, the default initialisation,
    every phase on `attack.*`; before programs, the default program."""
    if "init" not in d:
        d = dict(d, init=base_config().init.to_dict())
    if "augment" not in d.get("data", {"augment": None}):
        d = dict(d, data=dict(d["data"], augment="none"))
    if "dtype" not in d.get("model", {"dtype": None}):
        d = dict(d, model=dict(d["model"], dtype="float32"))
    if "program" in d:
        for name in _names(d["program"]):  # phase fields added since programs
            if name in d and "attack_steps" not in d[name]:
                d = dict(d, **{name: dict(d[name], attack_steps=None, attack_step_size=None)})
        return d
    d = dict(d, program=",".join(STAGES))
    for name, kind in DEFAULT_KINDS.items():
        # The fields phases gained since, at their defaults.
        d[name] = {**phase_config(kind, epochs=0, lr=1.0).to_dict(), **d[name]}
    return d


def phases_to_run(config, program: list) -> list:
    """The phases `stages` selects ('' = the whole program): consecutive, in order."""
    names = [p.name for p in program]
    chosen = _names(config.stages)
    if not chosen:
        return list(program)
    for s in chosen:
        if s not in names:
            raise ValueError(f"stages={config.stages!r}: unknown stage {s!r}; allowed: "
                             f"the program's phases {names}")
    order = [names.index(s) for s in chosen]
    if order != sorted(set(order)):
        raise ValueError(f"stages={config.stages!r} is out of order; allowed order: "
                         f"{','.join(names)} (each phase starts from the previous one)")
    if order != list(range(order[0], order[0] + len(order))):
        raise ValueError(f"stages={config.stages!r} must be consecutive in "
                         f"{','.join(names)} (each phase starts from the previous one)")
    return [program[i] for i in order]


def _number(text: str, what: str, item: str, integer: bool = False):
    try:
        return int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"rule {item!r}: {what}={text!r} is not {kind}") from None


def _parse_set(part: str, item: str) -> dict:
    kind, *args = [a.strip() for a in part.split(":")]
    if kind in RULE_KINDS:
        if len(args) != 1:
            raise ValueError(f"rule {item!r}: {kind!r} takes one value, a ratio (e.g. "
                             f"'{kind}:0.9') or a width (e.g. '{kind}:w4')")
        if args[0].startswith("w"):
            return {"kind": kind, "width": _number(args[0][1:], "width", item, True)}
        return {"kind": kind, "ratio": _number(args[0], "ratio", item)}
    if kind == "nm":
        if len(args) != 2:
            raise ValueError(f"rule {item!r}: 'nm' takes N and M, e.g. 'nm:2:4'")
        return {"kind": "nm", "n": _number(args[0], "N", item, True),
                "m": _number(args[1], "M", item, True)}
    if kind == "quantize":
        if len(args) != 1:
            raise ValueError(f"rule {item!r}: 'quantize' takes the bits, e.g. 'quantize:4'")
        return {"kind": "quantize", "bits": _number(args[0], "bits", item, True)}
    raise ValueError(f"rule {item!r}: unknown set {kind!r}; allowed: "
                     f"{', '.join(RULE_KINDS + ('nm', 'quantize'))}")


def parse_rules(text: str) -> dict:
    """Rules text -> {pattern: spec} (a sparsity spec's ratio may be {'width': K})."""
    out = {}
    for item in _names(text):
        pattern, sep, body = item.partition("=")
        pattern = pattern.strip()
        if not sep or not pattern or not body.strip():
            raise ValueError(f"rule {item!r} is not 'layer=set', e.g. 'fc1=irregular:0.9'")
        if pattern in out:
            raise ValueError(f"rules {text!r} name layer pattern {pattern!r} twice")
        sets = [_parse_set(p, item) for p in body.split("+")]
        quant = [s for s in sets if s["kind"] == "quantize"]
        sparse = [s for s in sets if s["kind"] != "quantize"]
        if len(quant) > 1 or len(sparse) > 1:
            raise ValueError(f"rule {item!r}: at most one sparsity set and one quantize, "
                             f"e.g. 'irregular:0.9+quantize:4'")
        if quant and sparse:
            s = sparse[0]
            spec = {"kind": "quantize", "bits": quant[0]["bits"], "sparsity": s["kind"],
                    **{k: v for k, v in s.items() if k != "kind"}}
        else:
            spec = sets[0]
        out[pattern] = spec
    if not out:
        raise ValueError(f"rules {text!r} name no layer; e.g. 'conv*=filter:0.5,fc1=irregular:0.9'")
    return out


def _kernel_shapes(model_name: str, num_classes: int, width: int, input_shape):
    model = get_model(model_name, num_classes, width)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros(input_shape, jnp.float32))["params"]


def finished_phase_specs(config, stage: str, params, num_classes: int, input_shape) -> dict:
    """The specs the final model of phase `stage` satisfies: its rules after a retrain
    phase, none after a dense or admm phase (whose weights are not on the sets)."""
    phase = {p.name: p for p in parse_program(config)}[stage]
    if phase.kind != "retrain":
        return {}
    return resolve_rules(phase.rules, params, config.model, num_classes, input_shape)


def resolve_rules(text: str, params, model_cfg, num_classes: int, input_shape) -> dict:
    """{kernel leaf path: projection spec} of a rules text on `params` (shapes suffice).

    Errors name the rule: a malformed set, a pattern that matches no layer, a layer that two
    patterns match, a width not below the model's."""
    rules = parse_rules(text)
    # Every pattern must match, and no layer twice, before any width is expanded.
    projections.match_rules(params, {p: {"kind": "irregular", "ratio": 0.0} for p in rules})
    expanded = {}
    for pattern, spec in rules.items():
        if "width" not in spec:
            expanded[pattern] = spec
            continue
        w = spec["width"]
        if not 0 < w < model_cfg.width:
            raise ValueError(f"rule {pattern!r}: width {w} must be in (0, model.width="
                             f"{model_cfg.width})")
        ratios = projections.ratios_to_match(
            params, _kernel_shapes(model_cfg.name, num_classes, w, input_shape), [pattern])
        rest = {k: v for k, v in spec.items() if k != "width"}
        for module, ratio in ratios.items():
            expanded[module] = dict(rest, ratio=ratio)
    return projections.match_rules(params, expanded)
