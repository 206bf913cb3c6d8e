"""robust-admm: adversarial training run concurrently with ADMM compression.

The public API (docs/api.md) is reached from here: each name is imported on first use
(PEP 562), so `import robust_admm` stays cheap and the command-line modules load only
what they need.
"""
import importlib

__version__ = "0.2.0"

# Public name -> "module:attribute" it is imported from on first use ("module": the module).
_PUBLIC = {
    # AutoAttack and the single attacks on any JAX classifier (evaluation/autoattack_api.py)
    "autoattack": "robust_admm.evaluation.autoattack_api:autoattack",
    "AutoAttackResult": "robust_admm.evaluation.autoattack_api:AutoAttackResult",
    "attack": "robust_admm.evaluation.autoattack_api:attack",
    "AttackOutput": "robust_admm.evaluation.autoattack_api:AttackOutput",
    "with_cpu_forms": "robust_admm.models.cpu_forms:with_cpu_forms",
    # ADMM compression of any params pytree (compression/transforms.py)
    "compression": "robust_admm.compression",
    "Rule": "robust_admm.compression:Rule",
    "admm_phase": "robust_admm.compression:admm_phase",
    "retrain_phase": "robust_admm.compression:retrain_phase",
    "project": "robust_admm.compression:project",
    "size_report": "robust_admm.compression:size_report",
    # The training objectives as loss functions of logits (training/objectives.py)
    "objectives": "robust_admm.training.objectives",
    "pgd_at": "robust_admm.training.objectives:pgd_at",
    "trades": "robust_admm.training.objectives:trades",
    "mart": "robust_admm.training.objectives:mart",
    "natural": "robust_admm.training.objectives:natural",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'robust_admm' has no attribute {name!r}")
    module, _, attribute = _PUBLIC[name].partition(":")
    value = importlib.import_module(module)
    value = getattr(value, attribute) if attribute else value
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
