"""Stage checkpoints with orbax: each stage's result is saved under
`<workdir>/checkpoints/<stage>` and the next stage starts from it."""
import os

import jax
import orbax.checkpoint as ocp


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints", stage)


def save_stage(workdir: str, stage: str, tree) -> str:
    """Saves `tree` (params, batch stats, masks, ...) as the result of `stage`; blocks
    until written, so a finished stage is never lost."""
    path = stage_dir(workdir, stage)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, tree, force=True)
        ckpt.wait_until_finished()
    return path


def has_stage(workdir: str, stage: str) -> bool:
    return os.path.isdir(stage_dir(workdir, stage))


def load_stage(workdir: str, stage: str, target=None):
    """The saved result of `stage`, shaped like `target` (abstract or concrete) if given."""
    path = stage_dir(workdir, stage)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"no checkpoint of stage {stage!r} at {path}: run that stage first in this "
            f"workdir (e.g. include it in --config.stages)")
    with ocp.StandardCheckpointer() as ckpt:
        if target is not None:
            target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        return ckpt.restore(path, target)
