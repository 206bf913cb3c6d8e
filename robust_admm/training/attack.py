"""The training attack: which attack a phase trains against, from the config, with an
epsilon ramp at the start of training."""
import dataclasses

import jax.numpy as jnp

from robust_admm import attacks
from robust_admm.training import objectives


@dataclasses.dataclass(frozen=True)
class TrainAttack:
    """The training attack: any attack of `robust_admm.attacks` (None in the natural
    setting; one run, no restarts) whose epsilon and step sizes ramp linearly from 0 to
    their configured values over the first `warmup_steps` steps of the stage (adversarial
    training from scratch at full epsilon can sit at chance level for a long time)."""

    attack: attacks.Attack | None
    warmup_steps: int = 0

    def __post_init__(self):
        if self.attack is not None and self.attack.restarts != 1:
            raise ValueError(f"a training attack runs once: restarts={self.attack.restarts}")

    def scale(self, step):
        if self.warmup_steps <= 0:
            return jnp.float32(1.0)
        return jnp.minimum(1.0, (step + 1) / self.warmup_steps).astype(jnp.float32)

    @property
    def num_steps(self) -> int:
        return 0 if self.attack is None or self.attack.is_identity else self.attack.num_steps

    def mixed(self) -> "TrainAttack":
        """The same attack ascending its loss under mixup: `objectives.mixed_attack_loss`
        of it, given `objectives.MixedLabels` as its labels (TRADES's KL reads no label,
        so the mixture leaves it the KL)."""
        a = self.attack
        if a is None:
            return self
        if not isinstance(a, attacks.Pgd):
            raise NotImplementedError(f"mixup with a {type(a).__name__} training attack: "
                                      f"only PGD's loss is mixed")
        base = a.loss if callable(a.loss) else attacks.loss_fn(a.loss)
        return dataclasses.replace(self, attack=dataclasses.replace(
            a, loss=objectives.mixed_attack_loss(base),
            loss_reads_clean=callable(a.loss) and a.loss_reads_clean))

    def describe(self) -> str:
        """In words, for the log: 'PGD-10 (eps 0.3, step 0.05)' or 'none'."""
        a = self.attack
        if a is None:
            return "none"
        return f"PGD-{a.num_steps} (eps {a.epsilon:g}, step {a.step_size:g})"


def make_attack(attack_cfg, setting: str, warmup_steps: int = 0,
                objective: str = "pgd_at", phase_cfg=None) -> TrainAttack:
    """The training attack for the setting ('natural' = no attack) and the objective
    (TRADES's attack ascends the KL to the clean prediction from a small Gaussian start);
    a phase's `attack_steps` / `attack_step_size`, where set, replace `attack_cfg`'s."""
    if setting not in ("adversarial", "natural"):
        raise ValueError(f"setting={setting!r}; allowed: 'adversarial', 'natural'")
    if setting == "natural" or objective == "natural":
        return TrainAttack(None)
    obj = objectives.get(objective)
    num_steps, step_size = attack_cfg.num_steps, attack_cfg.step_size
    if phase_cfg is not None:
        if phase_cfg.get("attack_steps") is not None:
            num_steps = phase_cfg.attack_steps
        if phase_cfg.get("attack_step_size") is not None:
            step_size = phase_cfg.attack_step_size
    return TrainAttack(attacks.Pgd(
        epsilon=attack_cfg.epsilon, step_size=step_size,
        num_steps=num_steps, random_start=attack_cfg.random_start,
        loss=obj.attack_loss or attack_cfg.loss, unroll=attack_cfg.unroll,
        start_std=obj.attack_start_std), warmup_steps)
