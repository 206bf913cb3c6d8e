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
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import xlogy

OBJECTIVES = ("pgd_at", "trades", "mart", "natural")


def ce(logits, y):
    """Per-example cross-entropy."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


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


def pgd_at(clean_logits, adv_logits, y, beta: float = 0.0, mean=jnp.mean):
    del clean_logits, beta
    return mean(ce(adv_logits, y))


def natural(clean_logits, adv_logits, y, beta: float = 0.0, mean=jnp.mean):
    del adv_logits, beta
    return mean(ce(clean_logits, y))


def trades(clean_logits, adv_logits, y, beta: float = 6.0, mean=jnp.mean):
    return mean(ce(clean_logits, y)) + beta * mean(kl_clean_adv(clean_logits, adv_logits))


def mart(clean_logits, adv_logits, y, beta: float = 6.0, mean=jnp.mean):
    adv_probs = jax.nn.softmax(adv_logits)
    # The strongest wrong class at the adversarial point.
    wrong = jnp.where(jax.nn.one_hot(y, adv_logits.shape[-1], dtype=bool), -jnp.inf,
                      adv_probs).argmax(-1)
    p_wrong = jnp.take_along_axis(adv_probs, wrong[:, None], axis=1)[:, 0]
    boosted_ce = ce(adv_logits, y) - jnp.log(1.0001 - p_wrong + 1e-12)
    clean_probs = jax.nn.softmax(clean_logits)
    p_true = jnp.take_along_axis(clean_probs, y[:, None], axis=1)[:, 0]
    kl = (xlogy(clean_probs, clean_probs) - clean_probs * jnp.log(adv_probs + 1e-12)).sum(-1)
    return mean(boosted_ce) + beta * mean(kl * (1.0000001 - p_true))


@dataclasses.dataclass(frozen=True)
class Objective:
    """`loss(clean_logits, adv_logits, y, beta, mean=jnp.mean)`; `attack_loss(adv_logits, y,
    clean_logits)` per example (None: the configured `attack.loss`, a name);
    `attack_start_std` > 0: the attack starts at x + that * N(0, 1); `needs_clean`:
    whether `loss` reads the clean logits (a clean forward pass in the step)."""

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
