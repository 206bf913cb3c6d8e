"""robust-admm: adversarial training run concurrently with ADMM compression.

The public API (docs/api.md) is reached from here: each name is imported on first use
(PEP 562), so `import robust_admm` stays cheap and the command-line modules load only
what they need.
"""
import importlib

__version__ = "0.1.0"

# Public name -> "module:attribute" it is imported from on first use.
_PUBLIC = {
    # AutoAttack and the single attacks on any JAX classifier (evaluation/autoattack_api.py)
    "autoattack": "robust_admm.evaluation.autoattack_api:autoattack",
    "AutoAttackResult": "robust_admm.evaluation.autoattack_api:AutoAttackResult",
    "attack": "robust_admm.evaluation.autoattack_api:attack",
    "AttackOutput": "robust_admm.evaluation.autoattack_api:AttackOutput",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'robust_admm' has no attribute {name!r}")
    module, attribute = _PUBLIC[name].split(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
