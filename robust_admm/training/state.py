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
    opt_state: Any
    masks: Any  # bool tree with the params' structure; False = pruned, stays zero
    admm: admm_lib.AdmmState  # empty outside the admm stage
    key: jnp.ndarray  # the run's PRNG key; per-step keys are fold_in(key, step)
