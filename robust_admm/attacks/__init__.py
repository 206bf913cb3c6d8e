"""Adversarial attacks as pure functions on one protocol (`core`): init / step / finish
over a carried state, driven by one loop, traced (`core.run`, a `lax.fori_loop`) or from
the host (`core.HostRunner`). Pixels live in [0, 1]; epsilons and step sizes in that scale.

- `Pgd`, `pgd`, `pgd_restarts`, `fgsm`: L-inf PGD (Madry et al.) and FGSM.
- `ApgdCe`, `ApgdT`: APGD with cross-entropy and with the targeted DLR loss.
- `FabT`: targeted FAB (minimum norm); `Square`: random search, 5,000 queries.
- `suite`: attacks by name (`fgsm`, `pgd40`, `apgd-ce`, `apgd-t`, `fab-t`, `square`,
  `aa-standard`) and the AutoAttack ensemble.
"""
from robust_admm.attacks.apgd import Apgd, ApgdCe, ApgdT, checkpoint_schedule
from robust_admm.attacks.core import (LOSSES, Attack, HostRunner, ce_loss, dlr_loss,
                                      dlr_targeted_loss, keep_fooled, loss_fn, margin_loss,
                                      project_linf, run, run_steps)
from robust_admm.attacks.fab import FabT, projection_linf
from robust_admm.attacks.pgd import Pgd, fgsm, pgd, pgd_restarts
from robust_admm.attacks.square import Square, p_selection, square_sides

__all__ = [
    "LOSSES", "Apgd", "ApgdCe", "ApgdT", "Attack", "FabT", "HostRunner", "Pgd", "Square",
    "ce_loss", "checkpoint_schedule", "dlr_loss", "dlr_targeted_loss", "fgsm", "keep_fooled",
    "loss_fn", "margin_loss", "p_selection", "pgd", "pgd_restarts", "project_linf",
    "projection_linf", "run", "run_steps", "square_sides",
]
