"""Training objectives of adversarial training, as small pure functions of logits.

Each objective takes the clean logits (None where it needs none), the logits of the
attack's point and the labels, and returns the batch's mean loss (`mean`: the plain
mean, or `weighted_mean` of a streamed batch's valid examples); `attack_loss` is what
its inner maximisation ascends (a per-example function, as the attacks take it).

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
- label smoothing (`smoothing` = eps): every cross-entropy term of the loss (PGD-AT's and
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
import optax
from jax.scipy.special import xlogy

OBJECTIVES = ("pgd_at", "trades", "mart", "natural")


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


def pgd_at(clean_logits, adv_logits, y, beta: float = 0.0, mean=jnp.mean,
           smoothing: float = 0.0):
    del clean_logits, beta
    return mean(ce(adv_logits, y, smoothing))


def natural(clean_logits, adv_logits, y, beta: float = 0.0, mean=jnp.mean,
            smoothing: float = 0.0):
    del adv_logits, beta
    return mean(ce(clean_logits, y, smoothing))


def trades(clean_logits, adv_logits, y, beta: float = 6.0, mean=jnp.mean,
           smoothing: float = 0.0):
    return (mean(ce(clean_logits, y, smoothing))
            + beta * mean(kl_clean_adv(clean_logits, adv_logits)))


def mart(clean_logits, adv_logits, y, beta: float = 6.0, mean=jnp.mean,
         smoothing: float = 0.0):
    adv_probs = jax.nn.softmax(adv_logits)
    # The strongest wrong class at the adversarial point.
    wrong = jnp.where(jax.nn.one_hot(y, adv_logits.shape[-1], dtype=bool), -jnp.inf,
                      adv_probs).argmax(-1)
    p_wrong = jnp.take_along_axis(adv_probs, wrong[:, None], axis=1)[:, 0]
    boosted_ce = ce(adv_logits, y, smoothing) - jnp.log(1.0001 - p_wrong + 1e-12)
    clean_probs = jax.nn.softmax(clean_logits)
    p_true = jnp.take_along_axis(clean_probs, y[:, None], axis=1)[:, 0]
    kl = (xlogy(clean_probs, clean_probs) - clean_probs * jnp.log(adv_probs + 1e-12)).sum(-1)
    return mean(boosted_ce) + beta * mean(kl * (1.0000001 - p_true))


@dataclasses.dataclass(frozen=True)
class Objective:
    """`loss(clean_logits, adv_logits, y, beta, mean=jnp.mean, smoothing=0.0)`;
    `attack_loss(adv_logits, y, clean_logits)` per example (None: the configured
    `attack.loss`, a name); `attack_start_std` > 0: the attack starts at x + that *
    N(0, 1); `needs_clean`: whether `loss` reads the clean logits (a clean forward pass
    in the step)."""

    name: str
    loss: Callable
    attack_loss: Callable | None
    needs_clean: bool
    attack_start_std: float = 0.0


def get(name: str) -> Objective:
    table = {"pgd_at": Objective("pgd_at", pgd_at, None, False),
             "trades": Objective("trades", trades, kl_attack_loss, True, 0.001),
             "mart": Objective("mart", mart, None, True),
             "natural": Objective("natural", natural, None, False)}
    if name not in table:
        raise ValueError(f"objective={name!r} is not known; allowed: {', '.join(OBJECTIVES)}")
    return table[name]
