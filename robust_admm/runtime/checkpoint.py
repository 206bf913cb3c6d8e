"""Checkpoints with orbax `CheckpointManager`: one manager per stage, over a folder of
`<step>` checkpoints (where that folder is, is the workdir's business:
`experiments/workdir.py`), each holding the whole `TrainState` (params, BatchNorm
statistics, optimizer state with ADMM's inside it, masks, key, step; the data position is
the step) plus JSON metadata; an earlier release's layout is read through a `Layout`. The
last checkpoint of a finished stage carries `complete: true` and the stage's evaluation;
it is what the next stage starts from. A write that fails (a full or read-only disk)
raises `CheckpointWriteError`, naming the step and its path; the checkpoint before it
stays the newest readable one, and a rerun resumes from it."""
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from robust_admm.runtime import logs


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full or read-only disk): the message names the
    step, the path and the previous checkpoint, which stays readable."""


class Manager(ocp.CheckpointManager):
    """orbax's asynchronous manager, whose failed writes raise `CheckpointWriteError` naming
    the step that failed, where orbax raises the writer's own error (from the background
    write, at the next save or wait: then it is not the step being saved that failed).
    orbax keeps a step's older checkpoints until its write has finished, and leaves a
    failed write in a temporary folder that the next manager on the folder ignores and
    removes, so the previous checkpoint stays the newest one that is read."""

    _writing = None  # the step whose write is in flight

    def save(self, step: int, *args, **kwargs) -> bool:
        self.wait_until_finished()  # the previous write's error, named as its own
        self._writing = step
        try:
            saved = super().save(step, *args, **kwargs)
        except Exception as e:  # the synchronous part: folders, serialising
            self._writing = None
            raise self._write_error(step, e) from e
        return saved

    def wait_until_finished(self):
        try:
            super().wait_until_finished()
        except Exception as e:  # the background write failed
            raise self._write_error(self._writing, e) from e

    def _write_error(self, step, e: Exception) -> CheckpointWriteError:
        folder = str(self.directory)
        self.reload()  # the steps on disk: a write that failed is not among them
        done = [s for s in self.all_steps() if s != step]
        kept = (f"the checkpoint of step {max(done)} in {folder} is intact; free space or "
                f"fix permissions and rerun the same command to resume from it" if done else
                f"no earlier checkpoint of this stage is in {folder}; free space or fix "
                f"permissions and rerun the same command to start the stage again")
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        error = CheckpointWriteError(f"could not write the checkpoint of step {step} to "
                                     f"{os.path.join(folder, str(step))}: {reason}; {kept}")
        error.errno = getattr(e, "errno", None)  # ENOSPC, EROFS, EACCES where the writer says
        return error


def manager(directory: str, keep: int = 3) -> Manager:
    """Asynchronous manager keeping the last `keep` checkpoints in `directory`; a failed
    write raises `CheckpointWriteError`."""
    return Manager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict):
    """Starts writing `state` and `meta` at `step` (returns while it writes)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(logs.to_python(meta))),
              force=True)


class CheckpointError(RuntimeError):
    """Checkpoints exist but none can be read."""


RESULT_FIELDS = ("nat_acc",)  # what a finished stage's result always holds


def check_meta(meta, where: str, need_result: bool = True) -> dict:
    """`meta` as `save` writes it: an object whose `complete` is a bool and, when true
    and `need_result` (a resume returns it), whose `result` is an object with the stage's
    accuracies; a ValueError naming `where` and the field otherwise (a damaged or
    hand-edited metadata file)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: the metadata is a {type(meta).__name__}, not an object")
    if not isinstance(meta.get("complete", False), bool):
        raise ValueError(f"{where}: complete={meta['complete']!r} is not a bool")
    if meta.get("complete") and need_result:
        result = meta.get("result")
        if not isinstance(result, dict):
            raise ValueError(f"{where}: a complete stage's result={result!r} is not an object")
        for field in RESULT_FIELDS:
            v = result.get(field)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{where}: result.{field}={v!r} is not a number")
    return meta


def _move_aside(path: str, prefix: str) -> str | None:
    """Renames `path` to `<prefix>-<time>[-n]` beside it and returns the new path, or None
    if another process of a multi-host run moved it first (it is out of the way).

    The name never collides with an earlier one (a step written again and found unreadable
    again within the same second got the same name, and the rename failed).
    """
    folder = os.path.dirname(path)
    base = os.path.join(folder, f"{prefix}-{int(time.time())}")
    aside, n = base, 1
    while os.path.exists(aside):
        n += 1
        aside = f"{base}-{n}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        if os.path.exists(path):
            raise
        return None
    return aside


class Layout(NamedTuple):
    """A state layout an earlier release checkpointed: `like` gives its structure (its
    top-level fields tell it apart), `convert` turns a restored one into today's state."""
    name: str  # who wrote it, e.g. "robust-admm 0.1"
    like: Any
    convert: Callable


class LayoutError(RuntimeError):
    """A checkpoint whose fields are neither today's nor a known earlier layout's."""


def _fields(tree) -> frozenset:
    """The top-level field names of a state (a dataclass or dict) or of a saved tree."""
    return frozenset(tree) if isinstance(tree, dict) else frozenset(
        flax.serialization.to_state_dict(tree))


def saved_fields(directory: str, step: int) -> frozenset:
    """The top-level fields of the state saved at `step` in `directory` (its metadata
    only, no array is read)."""
    path = os.path.join(os.path.abspath(directory), str(step), "state")
    with ocp.PyTreeCheckpointer() as ckpt:
        return _fields(ckpt.metadata(path).item_metadata.tree)


def restore_latest(mngr: ocp.CheckpointManager, like, older: Sequence[Layout] = ()):
    """(state, meta, step) of the newest readable checkpoint, or None if there is none.

    `like` gives the structure (a concrete or abstract state). A checkpoint whose fields
    are those of a layout in `older` is read in that layout and converted (logged); one
    whose fields are neither is refused (`LayoutError`, naming both, nothing moved). A
    checkpoint that cannot be read (truncated, corrupted) is reported, moved aside to
    `unreadable-<step>-<time>` (so the step can be written again) and skipped in favour of
    the one before it; if checkpoints exist but none can be read, that is an error.
    """
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    failures = []
    for step in sorted(mngr.all_steps(), reverse=True):
        layout = None
        try:
            fields = saved_fields(str(mngr.directory), step)
            if fields != _fields(like):
                layout = next((lay for lay in older if _fields(lay.like) == fields), None)
                if layout is None:
                    raise LayoutError(
                        f"checkpoint {os.path.join(str(mngr.directory), str(step))} holds "
                        f"the fields {sorted(fields)}; this release reads {sorted(_fields(like))}"
                        + "".join(f" or {lay.name}'s {sorted(_fields(lay.like))}"
                                  for lay in older)
                        + ": it was written by another release of robust-admm; resume it "
                          "with that release, or move the folder aside to start the stage "
                          "again")
                target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, layout.like)
            else:
                target = abstract
            r = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            check_meta(r.meta, os.path.join(str(mngr.directory), str(step), "meta"))
        except LayoutError:
            raise
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            text = str(e).splitlines()[0][:300] if str(e) else ""
            failures.append(f"step {step}: {type(e).__name__}: {text}")
            path = os.path.join(str(mngr.directory), str(step))
            aside = _move_aside(path, f"unreadable-{step}")
            where = f"moved to {aside}" if aside else "already moved aside by another process"
            logs.log(f"WARNING: checkpoint {path} is unreadable ({type(e).__name__}: "
                     f"{text}); {where}")
            continue
        if failures:
            mngr.reload()
            logs.log(f"resuming from the previous good checkpoint, step {step}")
        if layout is not None:
            logs.log(f"checkpoint of step {step} in {mngr.directory} was written by "
                     f"{layout.name}: read in its layout and converted")
            return layout.convert(r.state), r.meta, step
        return r.state, r.meta, step
    if failures:
        mngr.reload()
        raise CheckpointError(
            f"no readable checkpoint in {mngr.directory}: " + "; ".join(failures)
            + ". Remove that folder to restart the stage from its beginning.")
    return None


def load_final_state(directory: str, stage: str) -> dict:
    """The final state of the finished `stage` whose checkpoints are in `directory`, as
    plain nested dicts of numpy arrays (no target structure needed): for evaluation,
    export and tests."""
    with manager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint of stage {stage!r} in {directory}")
        where = os.path.join(os.path.abspath(directory), str(step), "meta")
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"{where}: unreadable ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None
        check_meta(meta, where, need_result=False)  # the state is what is read here
        if not meta.get("complete"):
            raise FileNotFoundError(f"stage {stage!r} in {directory} is not finished")
    path = os.path.join(os.path.abspath(directory), str(step), "state")
    with ocp.PyTreeCheckpointer() as ckpt:
        # As host numpy arrays, whatever devices (or how many) wrote the checkpoint.
        tree = ckpt.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckpt.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
