"""Compression: exact projections onto compression sets (`projections`), the rules that say
which layer goes to which set (`rules`), ADMM over parameter pytrees (`admm`), what a
compressed model takes to store (`size`), and the optax transformations that bring ADMM
into any training loop (`transforms`). Pure functions over pytrees; no training loop.
(The transformations are `admm_phase` and `retrain_phase`: `admm` here is the module.)

The public API (for your own model, params tree and loop):

- `Rule`, `parse_rules`: rules as objects or from the config's text grammar;
- `resolve(params, rules)`: which leaf goes to which set (`is_kernel` by default);
- `admm_phase(inner, rules, update_every=...)`: an optimizer running the ADMM phase;
- `retrain_phase(inner, rules)`: an optimizer whose params stay on the sets;
- `retrain_masks`, `keep_on_sets`, `admm_state`, `straight_through`: the support kept,
  the sets to the bit after an update, ADMM's Z/U/rho, the STE forward;
- `project(params, rules)`, `size_report(params, rules)`.
"""
from robust_admm.compression.projections import KINDS, SPARSITY_KINDS
from robust_admm.compression.rules import Rule, is_kernel, parse_rules
from robust_admm.compression.transforms import (AdmmOptState, RetrainState, admm_phase,
                                                admm_state, keep_on_sets, project, resolve,
                                                retrain_masks, retrain_phase, size_report,
                                                straight_through)

__all__ = [
    "KINDS",
    "SPARSITY_KINDS",
    "AdmmOptState",
    "RetrainState",
    "Rule",
    "admm_phase",
    "admm_state",
    "is_kernel",
    "keep_on_sets",
    "parse_rules",
    "project",
    "resolve",
    "retrain_phase",
    "retrain_masks",
    "size_report",
    "straight_through",
]
