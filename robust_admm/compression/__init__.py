"""Compression: exact projections onto compression sets (`projections`), the rules that say
which layer goes to which set (`rules`), ADMM over parameter pytrees (`admm`), what a
compressed model takes to store (`size`), and the optax transformations that bring ADMM
into any training loop (`transforms`). Pure functions over pytrees; no training loop.
(The transformations are `admm_phase` and `retrain_phase`: `admm` here is the module.)

The public API (for your own model, params tree and loop):

- `Rule`, `parse_rules`: rules as objects or from the config's text grammar;
- `resolve(params, rules)`: which leaf goes to which set (`is_kernel` by default);
- `admm_phase(rules, update_every=...)`: the ADMM phase, chained before an optimizer;
- `retrain_phase(inner, rules)`: an optimizer whose params stay on the sets;
- `retrain_masks`, `straight_through`: the support kept, the STE forward;
- `project(params, rules)`, `size_report(params, rules)`.
"""
from robust_admm.compression.projections import KINDS, SPARSITY_KINDS
from robust_admm.compression.rules import Rule, is_kernel, parse_rules
from robust_admm.compression.transforms import (AdmmOptState, RetrainState, admm_phase,
                                                project, resolve, retrain_masks, retrain_phase,
                                                size_report, straight_through)

__all__ = [
    "KINDS",
    "SPARSITY_KINDS",
    "AdmmOptState",
    "RetrainState",
    "Rule",
    "admm_phase",
    "is_kernel",
    "parse_rules",
    "project",
    "resolve",
    "retrain_phase",
    "retrain_masks",
    "size_report",
    "straight_through",
]
