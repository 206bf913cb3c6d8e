"""The signs of gradient masking in an evaluation (Carlini et al. 2019), as sentences that
name the numbers: a weaker attack beating a stronger one, a black-box attack finding what
the gradient attacks missed, accuracy at epsilon = 1 above about 0, accuracy that rises
as epsilon grows."""

# Gradient-masking checks: how much a weaker attack may beat a stronger one, the most
# accuracy allowed at epsilon = 1, how much accuracy may rise as epsilon grows.
MARGIN, MAX_ACC_AT_EPS_1, RISE = 0.01, 0.02, 0.005
WEAKER_STRONGER = (("fgsm", "pgd"), ("pgd", "apgd-ce"))
BLACK_BOX = ("square",)  # attacks that use no gradients


def _acc(result: dict, prefix: str) -> tuple[str, float] | None:
    """The accuracy of the first attack (or ensemble member) whose name starts with prefix."""
    for label, r in result["attacks"].items():
        if label.startswith(prefix) and len(r["members"]) == 1:
            return label, r["robust_acc"]
    for label, r in result["attacks"].items():
        for name, acc in r.get("after", {}).items():
            if name.startswith(prefix) and r["members"][0] == name:
                return f"{label}/{name}", acc
    return None


def masking_warnings(result: dict, at_eps_1: dict | None = None,
                     curve: list[dict] | None = None) -> list[str]:
    """The signs of gradient masking in an evaluation, as sentences naming the numbers."""
    out = []
    for weak, strong in WEAKER_STRONGER:
        a, b = _acc(result, weak), _acc(result, strong)
        if a and b and a[1] < b[1] - MARGIN:
            out.append(f"{a[0]} ({100 * a[1]:.2f}%) beats the stronger {b[0]} "
                       f"({100 * b[1]:.2f}%) by more than {100 * MARGIN:g} point: the stronger "
                       f"attack's gradients may be masked or its steps too small")
    for label, r in result["attacks"].items():
        after = list((r.get("after") or {}).items())
        for (prev, before), (name, acc) in zip(after, after[1:]):
            if name in BLACK_BOX and acc < before - MARGIN:
                out.append(f"{label}: the black-box {name} lowers accuracy from "
                           f"{100 * before:.2f}% (after {prev}) to {100 * acc:.2f}%, more than "
                           f"{100 * MARGIN:g} point: the gradient attacks before it miss "
                           f"points a search without gradients finds (masked gradients?)")
    if at_eps_1 is not None:
        for label, r in at_eps_1["attacks"].items():
            if r["robust_acc"] > MAX_ACC_AT_EPS_1:
                out.append(f"at epsilon = 1 (any image reachable) {label} leaves "
                           f"{100 * r['robust_acc']:.2f}% accuracy, not about 0: the attack "
                           f"does not reach what is reachable (masked gradients?)")
    for before, after in zip(curve or [], (curve or [])[1:]):
        for label, r in after["attacks"].items():
            prev = before["attacks"][label]["robust_acc"]
            if r["robust_acc"] > prev + RISE:
                out.append(f"{label}: accuracy rises from {100 * prev:.2f}% at epsilon "
                           f"{before['epsilon']:g} to {100 * r['robust_acc']:.2f}% at "
                           f"{after['epsilon']:g}: it should not grow with epsilon")
    return out
