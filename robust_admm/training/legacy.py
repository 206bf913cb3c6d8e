"""Checkpoints of earlier releases, read by this one: robust-admm 0.1 kept ADMM's Z, U and
rho in the train state beside a bare optimizer state; since 0.2 they live in the state of
the phase's transformation (`compression.transforms.admm_phase`, `retrain_phase`). The
conversion is exact: 0.1 updated Z and U after the last step of an interval, as
`admm_phase` does, so a 0.1 checkpoint resumed here goes on as 0.1 would have."""
import jax
import jax.numpy as jnp

from robust_admm.compression import admm as admm_lib
from robust_admm.compression import transforms
from robust_admm.runtime import checkpoint
from robust_admm.training.state import TrainState, TrainState01


def layouts(like: TrainState) -> list[checkpoint.Layout]:
    """The earlier layouts of a phase's state `like` (as `loop.initial_state` builds it),
    for `checkpoint.restore_latest(..., older=...)`."""
    top = like.opt_state
    wrapped = isinstance(top, (transforms.AdmmOptState, transforms.RetrainState))
    old = TrainState01(
        step=like.step, params=like.params, batch_stats=like.batch_stats,
        opt_state=top.inner if wrapped else top, masks=like.masks,
        admm=top.admm if isinstance(top, transforms.AdmmOptState) else admm_lib.empty(),
        key=like.key)

    def convert(state: TrainState01) -> TrainState:
        # The transformation's masks in buffers of their own (the step donates the state).
        masks = jax.tree_util.tree_map(jnp.copy, state.masks)
        if isinstance(top, transforms.AdmmOptState):
            opt_state = top._replace(
                count=jnp.array(state.step, jnp.int32), admm=state.admm,
                masks=None if top.masks is None else masks, inner=state.opt_state)
        elif isinstance(top, transforms.RetrainState):
            opt_state = transforms.RetrainState(masks=masks, inner=state.opt_state)
        else:
            opt_state = state.opt_state
        return TrainState(step=state.step, params=state.params, batch_stats=state.batch_stats,
                          opt_state=opt_state, masks=state.masks, key=state.key)

    return [checkpoint.Layout("robust-admm 0.1", old, convert)]
