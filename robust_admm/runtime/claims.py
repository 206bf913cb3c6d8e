"""Locks on shared folders: claims on a study's cells (so that processes sharing one study
never run the same cell) and the hold of a run on its workdir (so that a second process
started on it by mistake is refused at once, naming the holder).

A lock is a POSIX record lock (`fcntl.lockf`) on a file in the folder (`<cell>/claim.lock`,
`<workdir>/run.lock`), held for as long as the process runs; the file holds the owner's
host, pid and start time, for messages. The kernel (or the file server) drops the lock when
the process ends, however it ends, so a killed process leaves no stale lock: the next
process takes the folder over and resumes it from its checkpoints. POSIX locks work across
machines on shared filesystems that support them (NFSv3 with lockd, NFSv4, Lustre mounted
with `flock`); on one that ignores them, two machines may both take one.

POSIX locks belong to a (process, file) pair: the same process locking the same file again
through another descriptor succeeds, and closing any of its descriptors of that file drops
the lock. So each kind of lock has its own file name, and a process never takes one lock
file twice. No JAX here: tests lock folders from plain Python processes.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = "claim.lock"  # a study cell's claim
RUN_LOCK_NAME = "run.lock"  # a run's hold on its workdir (experiments/workdir.py)


class HeldError(RuntimeError):
    """A folder is held by another live process (the message names it)."""

    def __init__(self, message: str, owner: dict | None):
        super().__init__(message)
        self.owner = owner


def owner() -> dict:
    """Who holds a lock: host and process id (written into the lock file, for messages)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


@contextlib.contextmanager
def locked(path: str):
    """Yields True while this process holds the lock on file `path` (created if absent,
    with its folder), False (holding nothing) if another process holds it. Never blocks.
    Other errors of the filesystem (no lock support: ENOLCK, EOPNOTSUPP) are raised."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            yield False
            return
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(owner()).encode(), 0)
            yield True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def owner_of(path: str) -> dict | None:
    """The owner record in lock file `path` ({'host', 'pid', 'since'}), None if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        return {"host": str(info["host"]), "pid": int(info["pid"]),
                "since": float(info.get("since", 0.0))}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_owner(info: dict | None) -> str:
    """'host:pid (since 2024-05-01 12:00:00)', or 'an unknown process' for no record."""
    if info is None:
        return "an unknown process (its lock file names none yet)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
    return f"{info['host']}:{info['pid']} (since {since})"


@contextlib.contextmanager
def claim(cell_dir: str):
    """Yields True while this process holds `cell_dir`'s claim, False (holding nothing) if
    another process holds it. Never blocks."""
    with locked(os.path.join(cell_dir, LOCK_NAME)) as mine:
        yield mine


def holder(cell_dir: str) -> str:
    """'host:pid' of the process that last claimed `cell_dir` ('' if none ever did)."""
    info = owner_of(os.path.join(cell_dir, LOCK_NAME))
    return f"{info['host']}:{info['pid']}" if info else ""


# What a filesystem without POSIX locks answers (some FUSE and object-store mounts).
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextlib.contextmanager
def hold(directory: str, what: str, name: str = RUN_LOCK_NAME, warn=print):
    """Holds `directory` (lock file `name` in it) for the body; raises `HeldError`, naming
    the holder's host, pid and start time, at once if another live process holds it.

    On a filesystem without POSIX locks (NO_LOCKS) nothing can be held: the body runs
    after `warn` says that a second process would not be refused."""
    path = os.path.join(directory, name)
    with contextlib.ExitStack() as stack:
        try:
            mine = stack.enter_context(locked(path))
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise
            warn(f"WARNING: cannot lock {path} ({e.strerror or e}): the filesystem has no "
                 f"POSIX locks, so a second process started on {directory} would not be "
                 f"refused")
            mine = True
        if not mine:
            info = owner_of(path)
            raise HeldError(
                f"{what} {directory} is held by {describe_owner(info)}, a live process "
                f"running in it ({path}); wait for it to end or stop it (a run resumes "
                f"from its checkpoints), or use another folder", info)
        yield path
