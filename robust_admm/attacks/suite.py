"""Attacks by name, and AutoAttack's standard ensemble.

Names: `fgsm`; `pgd<N>` (N steps, random start); `apgd-ce`, `apgd-dlr`, `apgd-t`
(100 iterations; APGD-T over 9 target classes); `fab-t` (targeted FAB, 9 target
classes); `square` (5,000 queries). `aa-standard` is AutoAttack's standard ensemble:
apgd-ce, apgd-t, fab-t, square in that order, each run only on the points still robust.
"""
import re

from robust_admm.attacks import core
from robust_admm.attacks.apgd import ApgdCe, ApgdT
from robust_admm.attacks.fab import FabT
from robust_admm.attacks.pgd import Pgd
from robust_admm.attacks.square import Square

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
ENSEMBLES = {"aa-standard": STANDARD}
SINGLE = ("fgsm", "pgd<N>", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
# The classes an attack needs: the DLR losses read the 3 (untargeted) or 4 (targeted)
# largest logits; every other attack needs a true class and one other.
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}
MAX_PGD_STEPS = 2 ** 31 - 1  # the attack loop counts steps in int32


def pgd_steps(name: str) -> int | None:
    """N of a name `pgd<N>` (ASCII digits, 1 <= N <= MAX_PGD_STEPS), else None."""
    m = re.fullmatch(r"pgd([0-9]{1,10})", name)
    if m and 1 <= int(m.group(1)) <= MAX_PGD_STEPS:
        return int(m.group(1))
    return None


def make(name: str, epsilon: float, num_classes: int = 10,
         pgd_step_size: float | None = None, norm: str = "linf") -> core.Attack:
    """The attack `name` at radius `epsilon` in `norm` ('linf' or 'l2'). `pgd<N>` takes
    `pgd_step_size` per step (default 2.5 * epsilon / N, Madry et al.'s rule)."""
    check_name(name)
    if not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0")
    core.check_norm(name, norm)
    need = MIN_CLASSES.get(name, 2)
    if num_classes < need:
        raise ValueError(f"{name} needs at least {need} classes; the model has {num_classes}"
                         + (" (its DLR loss reads the largest logits)" if need > 2 else ""))
    n_targets = min(9, num_classes - 1)
    steps = pgd_steps(name)
    if steps is not None:
        step = 2.5 * epsilon / steps if pgd_step_size is None else pgd_step_size
        return Pgd(epsilon=epsilon, step_size=step, num_steps=steps, norm=norm)
    if name == "fgsm":
        return Pgd(epsilon=epsilon, step_size=epsilon, num_steps=1, random_start=False,
                   norm=norm)
    if name in ("apgd-ce", "apgd-dlr"):
        return ApgdCe(epsilon=epsilon, num_steps=100, loss_name=name[5:], norm=norm)
    if name == "apgd-t":
        return ApgdT(epsilon=epsilon, num_steps=100, n_target_classes=n_targets,
                     restarts=n_targets, norm=norm)
    if name == "fab-t":
        return FabT(epsilon=epsilon, num_steps=100, n_target_classes=n_targets,
                    restarts=n_targets, norm=norm)
    return Square(epsilon=epsilon, num_steps=5000, norm=norm)


def check_name(name: str):
    """Raises a ValueError naming `name` and what is allowed unless it is an attack."""
    if pgd_steps(name) is not None or name in SINGLE[:1] + SINGLE[2:]:
        return
    raise ValueError(f"attack {name!r} is not known; allowed: {', '.join(SINGLE)} "
                     f"(pgd<N> with 1 <= N <= {MAX_PGD_STEPS}, e.g. pgd40) and the ensembles "
                     f"{', '.join(ENSEMBLES)}")


def parse(spec: str) -> list[tuple[str, tuple[str, ...]]]:
    """'fgsm,pgd40,aa-standard' -> [(label, member names)]: a single attack is an
    ensemble of one. Unknown names are an error naming them."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError(f"--attacks={spec!r} names no attack")
    out = []
    for item in items:
        members = ENSEMBLES.get(item, (item,))
        for name in members:
            check_name(name)
        if item in (label for label, _ in out):
            raise ValueError(f"--attacks={spec!r} names {item!r} twice")
        out.append((item, members))
    return out
