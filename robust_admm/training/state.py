"""The train state: everything a phase carries from step to step, and checkpoints."""
from typing import Any

import flax
import jax.numpy as jnp

from robust_admm.compression import admm as admm_lib


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray  # int32 scalar: steps taken in the current stage
    params: Any
    batch_stats: Any  # {} for models without BatchNorm
    # The optimizer's, as the phase's transformation keeps it: an admm phase's holds ADMM's
    # Z, U and rho (`transforms.AdmmOptState`), a retrain phase's the support kept.
    opt_state: Any
    masks: Any  # bool tree with the params' structure; False = pruned, stays zero
    key: jnp.ndarray  # the run's PRNG key; per-step keys are fold_in(key, step)


@flax.struct.dataclass
class TrainState01:
    """The train state as robust-admm 0.1 checkpointed it: ADMM's Z, U and rho beside the
    optimizer's state (empty outside the admm phase), the phase's optimizer not wrapped in
    the compression transformations. Read to resume its checkpoints (`legacy`)."""
    step: jnp.ndarray
    params: Any
    batch_stats: Any
    opt_state: Any
    masks: Any
    admm: admm_lib.AdmmState
    key: jnp.ndarray
