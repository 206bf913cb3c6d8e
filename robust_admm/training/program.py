"""A run's compression program: its phases in order, and the compression rules of each.

The config names the phases in `program` ("pretrain,admm,retrain" by default); each name
is a top-level field holding that phase's settings (`--config.admm.epochs=4` overrides one),
whose `kind` says what it does:

- `dense`: training without compression constraints (masks from earlier phases are kept);
- `admm`: training with the ADMM penalty toward the phase's rules, Z/U updated every
  `update_every_epochs` epochs;
- `retrain`: the weights are hard-projected onto the phase's rules once, then fine-tuned
  with the result kept: pruned weights stay zero, quantized weights stay on their levels.

The rules of an admm or retrain phase (grammar: `compression/rules.py`) say which layers
are compressed to which set. An empty `rules` takes the rules of the closest earlier admm
or retrain phase, and the first one takes `prune.kind` / `prune.ratios` / `prune.to_width`.
"""
import dataclasses

from robust_admm.compression.rules import comma_list, legacy_rules, resolve_rules

PHASE_KINDS = ("dense", "admm", "retrain")


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


def parse_program(config) -> list:
    """The program's phases, each with the rules it inherits resolved to text."""
    names = comma_list(config.program)
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
                if not (config.prune.to_width or comma_list(config.prune.ratios)):
                    raise ValueError(
                        f"phase {name!r} ({kind}) has no compression rules: set "
                        f"{name}.rules (e.g. 'conv*=filter:0.5,fc*=irregular:0.9') or "
                        f"prune.ratios")
                rules, source = legacy_rules(config.prune), "prune"
        phases.append(Phase(name=name, kind=kind, index=i,
                            rules=rules if kind != "dense" else "",
                            rules_from=source if kind != "dense" else ""))
    return phases


def phases_to_run(config, program: list) -> list:
    """The phases `stages` selects ('' = the whole program): consecutive, in order."""
    names = [p.name for p in program]
    chosen = comma_list(config.stages)
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


def finished_phase_specs(config, stage: str, params, num_classes: int, input_shape) -> dict:
    """The specs the final model of phase `stage` satisfies: its rules after a retrain
    phase, none after a dense or admm phase (whose weights are not on the sets)."""
    phase = {p.name: p for p in parse_program(config)}[stage]
    if phase.kind != "retrain":
        return {}
    return resolve_rules(phase.rules, params, config.model, num_classes, input_shape)


def phase_specs(config, program, params, num_classes: int, input_shape) -> dict:
    """{phase name: {leaf path: projection spec}} for every phase of the program."""
    out = {}
    for phase in program:
        out[phase.name] = {}
        if not phase.compresses:
            continue
        try:
            out[phase.name] = resolve_rules(phase.rules, params, config.model, num_classes,
                                            input_shape)
        except ValueError as e:
            where = ("prune.kind / prune.ratios / prune.to_width" if phase.rules_from == "prune"
                     else f"{phase.rules_from}.rules")
            raise ValueError(f"phase {phase.name!r}: rules {phase.rules!r} (from {where}): "
                             f"{e}") from None
    return out
