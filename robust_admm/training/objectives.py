"""Training objectives of adversarial training, as pure functions of logits: the public
loss functions `robust_admm.pgd_at`, `trades`, `mart` and `natural`, and what the train
step uses (one code path).

Each loss takes the clean logits (None where it reads none), the logits of the attack's
point and the integer labels, and returns the mean over the batch (or over the examples
`where` marks: a streamed batch's valid ones), or with `reduction='none'` the per-example
losses; `attack_loss` is what its inner maximisation ascends (a per-example function,
as the attacks take it). Shapes, dtypes, options and (for concrete labels) the labels'
range are checked with named errors outside the compiled program.

- `pgd_at` (Madry et al. 2018): cross-entropy at the adversarial point; the attack
  ascends the configured loss (cross-entropy by default).
- `trades` (Zhang et al. 2019): CE(clean) + beta * KL(p_clean || p_adv), the KL summed
  over classes and averaged over the batch; the attack ascends that KL, the clean
  prediction held fixed.
- `mart` (Wang et al. 2020): boosted CE at the adversarial point (CE plus
  -log(1.0001 - p_adv of the strongest wrong class)) + beta * KL(p_clean || p_adv)
  weighted per example by (1.0000001 - p_clean of the true class); the attack ascends
  the configured loss (CE, as the authors').
- `natural`: CE on clean inputs; no attack (the step passes the clean logits for both).

The constants (1e-12, 1.0001, 1.0000001) are those of the authors' code, kept so that
results compare.

Two options of every objective, as in Ye et al.'s code (`smooth_eps`, `alpha`):
- label smoothing (`label_smoothing` = eps): every cross-entropy term of the loss (PGD-AT's and
  natural's CE, TRADES's clean CE, the CE part of MART's boosted CE) is taken against
  `smoothed_targets`, 1 - eps on the label and eps / (classes - 1) on each other class
  (their `CrossEntropyLossMaybeSmooth`; not optax's eps / classes on every class). The KL
  terms, MART's margin term and its weight (1 - p_clean of the label) read the hard
  label, and the attacks ascend their losses with hard labels: smoothing is of the
  training loss only.
- mixup (Zhang et al. 2018): the batch is mixed with a permutation of itself,
  lam * x + (1 - lam) * x[perm] (`training.augment.mixup`), and the loss is `mixed`:
  lam * loss(y) + (1 - lam) * loss(y[perm]) for every objective (their `mixup_criterion`;
  for CE that is CE against the mixed targets). The labels travel as `MixedLabels`, and
  the training attack ascends its own loss mixed the same way (`mixed_attack_loss`;
  Ye et al.'s ascends the CE of y alone).
"""
import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import xlogy

OBJECTIVES = ("pgd_at", "trades", "mart", "natural")
REDUCTIONS = ("mean", "none")

# What `robust_admm.objectives` offers a user (docs/api.md); the rest serves the step.
__all__ = ["pgd_at", "trades", "mart", "natural", "kl_attack_loss", "smoothed_targets",
           "OBJECTIVES", "REDUCTIONS"]


def smoothed_targets(y, num_classes: int, smoothing: float):
    """Label-smoothed targets (batch, classes): 1 - smoothing on the label, smoothing /
    (num_classes - 1) on each other class (Ye et al.'s `CrossEntropyLossMaybeSmooth`)."""
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes; got {num_classes}")
    one_hot = jax.nn.one_hot(y, num_classes)
    return one_hot * (1.0 - smoothing) + (1.0 - one_hot) * (smoothing / (num_classes - 1))


def ce(logits, y, smoothing: float = 0.0):
    """Per-example cross-entropy; against `smoothed_targets` where `smoothing` > 0 (a
    Python number: at 0 the plain integer-label CE is traced)."""
    if smoothing == 0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return optax.softmax_cross_entropy(logits, smoothed_targets(y, logits.shape[-1], smoothing))


class MixedLabels(NamedTuple):
    """mixup's labels (a pytree): every example is lam of its own (`y`) and 1 - lam of its
    partner's (`partner`, the labels permuted as the images were)."""

    y: jnp.ndarray
    partner: jnp.ndarray
    lam: jnp.ndarray  # float32 scalar, one per batch

    def major(self):
        """The label of the larger weight (y where lam >= 0.5): what train_acc counts."""
        return jnp.where(self.lam >= 0.5, self.y, self.partner)


def mixed(loss: Callable, labels: MixedLabels):
    """mixup's loss, `loss(labels)` a function of integer labels:
    lam * loss(y) + (1 - lam) * loss(partner)."""
    return labels.lam * loss(labels.y) + (1.0 - labels.lam) * loss(labels.partner)


def mixed_attack_loss(base: Callable) -> Callable:
    """A per-example attack loss `base(logits, y, *rest)` made to take `MixedLabels`: the
    same mixture per example (what a training attack ascends under mixup)."""
    def loss(logits, labels: MixedLabels, *rest):
        return mixed(lambda t: base(logits, t, *rest), labels)
    return loss


def kl_clean_adv(clean_logits, adv_logits):
    """Per-example KL(softmax(clean) || softmax(adv)), summed over classes."""
    p = jax.nn.softmax(clean_logits)
    return (p * (jax.nn.log_softmax(clean_logits) - jax.nn.log_softmax(adv_logits))).sum(-1)


def kl_attack_loss(adv_logits, y, clean_logits):
    """TRADES's inner loss: KL to the clean prediction (held fixed), per example."""
    del y
    return kl_clean_adv(jax.lax.stop_gradient(clean_logits), adv_logits)


def weighted_mean(weights):
    """The mean over the examples whose weight is 1 (a streamed batch's valid ones); a
    batch with none gives 0."""
    weights = weights.astype(jnp.float32)
    return lambda v: (v * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _check_logits(name: str, logits):
    """(batch, classes) of floating logits with at least 2 classes."""
    shape, dtype = jnp.shape(logits), jnp.result_type(logits)
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(f"{name} have shape {shape}; allowed: (batch, classes) with "
                         f"classes >= 2")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} have dtype {dtype}; allowed: a floating dtype")
    return shape


def _check(loss: str, clean_logits, adv_logits, labels, label_smoothing, reduction, where,
           beta=0.0):
    """Named errors for what can be checked outside the compiled program (shapes, dtypes,
    options; the labels' range where they are concrete): returns nothing, traces nothing.
    A logits argument given as None is one `loss` does not read."""
    reads = {"pgd_at": ("adv_logits",), "natural": ("clean_logits",)}.get(
        loss, ("clean_logits", "adv_logits"))
    given = {"clean_logits": clean_logits, "adv_logits": adv_logits}
    for n in reads:
        if given[n] is None:
            raise TypeError(f"{n}=None; allowed: float logits (batch, classes), which "
                            f"{loss} reads")
    shapes = {n: _check_logits(n, given[n]) for n in reads}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"clean_logits have shape {shapes['clean_logits']} and adv_logits "
                         f"{shapes['adv_logits']}; allowed: the same (batch, classes)")
    batch, classes = next(iter(shapes.values()))
    if jnp.shape(labels) != (batch,) or not jnp.issubdtype(jnp.result_type(labels),
                                                           jnp.integer):
        raise ValueError(f"labels have shape {jnp.shape(labels)} and dtype "
                         f"{jnp.result_type(labels)}; allowed: integer class indices of shape "
                         f"({batch},), one per row of the logits")
    if not isinstance(labels, jax.core.Tracer):
        y = np.asarray(labels)
        if y.size and (y.min() < 0 or y.max() >= classes):
            raise ValueError(f"labels hold values in [{y.min()}, {y.max()}]; allowed: "
                             f"0 <= label < {classes} (the logits' classes)")
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing={label_smoothing!r}; allowed: 0 <= it < 1")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {', '.join(REDUCTIONS)}")
    if where is not None:
        dtype = jnp.result_type(where)
        if jnp.shape(where) != (batch,) or not (dtype == jnp.bool_
                                                or jnp.issubdtype(dtype, jnp.floating)):
            raise ValueError(f"where has shape {jnp.shape(where)} and dtype {dtype}; allowed: "
                             f"a mask of shape ({batch},), bool or floats 0/1")
        if not isinstance(where, jax.core.Tracer) and not np.isin(np.asarray(where),
                                                                  (0, 1)).all():
            raise ValueError(f"where holds {np.unique(np.asarray(where))}; allowed: a mask "
                             f"(True/False or 1/0)")
    if not (isinstance(beta, jax.core.Tracer) or (np.isfinite(beta) and beta >= 0)):
        raise ValueError(f"beta={beta!r}; allowed: a finite number >= 0")


def _reduce(reduction: str, where, main: Callable, beta=None, robust: Callable | None = None):
    """The loss main + beta * robust from its per-example terms (thunks of (batch,)
    arrays, traced in this order; no `robust`: main alone): mean(main) + beta *
    mean(robust) ('mean': means over the examples `where` marks when given, 0 where it
    marks none), or the per-example main + beta * robust, 0 where `where` is False
    ('none')."""
    if reduction == "none":
        total = main() if robust is None else main() + beta * robust()
        return total if where is None else jnp.where(jnp.asarray(where, bool), total, 0.0)
    mean = jnp.mean if where is None else weighted_mean(where)
    return mean(main()) if robust is None else mean(main()) + beta * mean(robust())


def pgd_at(clean_logits: jax.Array | None, adv_logits: jax.Array, labels: jax.Array, *,
           label_smoothing: float = 0.0, reduction: str = "mean",
           where: jax.Array | None = None) -> jax.Array:
    """PGD adversarial training's loss (Madry et al. 2018): the cross-entropy of the
    adversarial logits.

    `adv_logits` float (batch, classes); `labels` int (batch,) in [0, classes);
    `clean_logits` is not read (None or the clean logits). `label_smoothing` eps in
    [0, 1), a Python number: CE against 1 - eps on the label and eps / (classes - 1) on
    each other class.
    `reduction` 'mean' (a scalar: the mean over the batch, or over the examples `where`
    (bool (batch,)) is True) or 'none' (float (batch,), 0 where `where` is False).
    """
    _check("pgd_at", None, adv_logits, labels, label_smoothing, reduction, where)
    del clean_logits
    return _reduce(reduction, where, lambda: ce(adv_logits, labels, label_smoothing))


def natural(clean_logits: jax.Array, adv_logits: jax.Array | None, labels: jax.Array, *,
            label_smoothing: float = 0.0, reduction: str = "mean",
            where: jax.Array | None = None) -> jax.Array:
    """Natural (standard) training's loss: the cross-entropy of the clean logits.

    `clean_logits` float (batch, classes); `adv_logits` is not read (None, or what the
    other objectives take there); `labels`, `label_smoothing`, `reduction` and `where`
    as in `pgd_at`.
    """
    _check("natural", clean_logits, None, labels, label_smoothing, reduction, where)
    del adv_logits
    return _reduce(reduction, where, lambda: ce(clean_logits, labels, label_smoothing))


def trades(clean_logits: jax.Array, adv_logits: jax.Array, labels: jax.Array, *,
           beta: float = 6.0, label_smoothing: float = 0.0, reduction: str = "mean",
           where: jax.Array | None = None) -> jax.Array:
    """TRADES's loss (Zhang et al. 2019): CE(clean logits, labels) + beta *
    KL(softmax(clean) || softmax(adv)), the KL summed over classes.

    `clean_logits`, `adv_logits` float (batch, classes), the same shape; `labels` int
    (batch,) in [0, classes); `beta` >= 0 weighs robustness against accuracy (the paper's
    1/lambda; 6 in its experiments). Label smoothing applies to the CE only; `reduction`
    and `where` as in `pgd_at` ('mean' is mean(CE) + beta * mean(KL)). Gradients flow
    into both logits; TRADES's attack holds the clean ones fixed (`kl_attack_loss`).
    """
    _check("trades", clean_logits, adv_logits, labels, label_smoothing, reduction, where, beta)
    return _reduce(reduction, where, lambda: ce(clean_logits, labels, label_smoothing), beta,
                   lambda: kl_clean_adv(clean_logits, adv_logits))


def mart(clean_logits: jax.Array, adv_logits: jax.Array, labels: jax.Array, *,
         beta: float = 6.0, label_smoothing: float = 0.0, reduction: str = "mean",
         where: jax.Array | None = None) -> jax.Array:
    """MART's loss (Wang et al. 2020), as the authors' code computes it: the boosted CE
    at the adversarial point, CE(adv) - log(1.0001 - p_adv[k*] + 1e-12) with k* the
    strongest wrong class, plus beta * KL(p_clean || p_adv + 1e-12) * (1.0000001 -
    p_clean[label]), which weighs the KL most on misclassified clean examples.

    Shapes, `beta`, `reduction` and `where` as in `trades` ('mean' is mean(boosted CE)
    + beta * mean(weighted KL)); label smoothing applies to the CE part only (the margin
    term and the weight read the hard label).
    """
    _check("mart", clean_logits, adv_logits, labels, label_smoothing, reduction, where, beta)
    y = labels
    adv_probs = jax.nn.softmax(adv_logits)
    # The strongest wrong class at the adversarial point.
    wrong = jnp.where(jax.nn.one_hot(y, adv_logits.shape[-1], dtype=bool), -jnp.inf,
                      adv_probs).argmax(-1)
    p_wrong = jnp.take_along_axis(adv_probs, wrong[:, None], axis=1)[:, 0]
    boosted_ce = ce(adv_logits, y, label_smoothing) - jnp.log(1.0001 - p_wrong + 1e-12)
    clean_probs = jax.nn.softmax(clean_logits)
    p_true = jnp.take_along_axis(clean_probs, y[:, None], axis=1)[:, 0]
    kl = (xlogy(clean_probs, clean_probs) - clean_probs * jnp.log(adv_probs + 1e-12)).sum(-1)
    return _reduce(reduction, where, lambda: boosted_ce, beta,
                   lambda: kl * (1.0000001 - p_true))


@dataclasses.dataclass(frozen=True)
class Objective:
    """`loss`: the public loss function (`pgd_at`, `trades`, `mart`, `natural`);
    `attack_loss(adv_logits, y, clean_logits)` per example (None: the configured
    `attack.loss`, a name); `attack_start_std` > 0: the attack starts at x + that *
    N(0, 1); `needs_clean`: whether `loss` reads the clean logits (a clean forward pass
    in the step); `uses_beta`: whether `loss` takes `beta`."""

    name: str
    loss: Callable
    attack_loss: Callable | None
    needs_clean: bool
    attack_start_std: float = 0.0
    uses_beta: bool = False

    def batch_loss(self, clean_logits, adv_logits, labels, *, beta: float,
                   label_smoothing: float = 0.0, where=None):
        """`loss` with the configured `beta` where it takes one (the step's call)."""
        kwargs = {"beta": beta} if self.uses_beta else {}
        return self.loss(clean_logits, adv_logits, labels, label_smoothing=label_smoothing,
                         where=where, **kwargs)


def get(name: str) -> Objective:
    table = {"pgd_at": Objective("pgd_at", pgd_at, None, False),
             "trades": Objective("trades", trades, kl_attack_loss, True, 0.001, True),
             "mart": Objective("mart", mart, None, True, uses_beta=True),
             "natural": Objective("natural", natural, None, False)}
    if name not in table:
        raise ValueError(f"objective={name!r} is not known; allowed: {', '.join(OBJECTIVES)}")
    return table[name]
