"""Claims on a study's cells, so that processes sharing one study never run the same cell.

A claim is a POSIX record lock (`fcntl.lockf`) on `<cell>/claim.lock`, held for as long as
the process runs the cell. The kernel (or the file server) drops it when the process ends,
however it ends, so a killed process leaves no stale claim: the next process takes the cell
over and resumes it from its checkpoints. POSIX locks work across machines on shared
filesystems that support them (NFSv3 with lockd, NFSv4, Lustre mounted with `flock`); on
one that ignores them, two machines may run the same cell. No JAX here: tests lock cells
from plain Python processes.
"""
import contextlib
import fcntl
import json
import os
import socket
import time

LOCK_NAME = "claim.lock"


def owner() -> dict:
    """Who holds a claim: host and process id (written into the lock file, for messages)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


@contextlib.contextmanager
def claim(cell_dir: str):
    """Yields True while this process holds `cell_dir`'s claim, False (holding nothing) if
    another process holds it. Never blocks."""
    os.makedirs(cell_dir, exist_ok=True)
    fd = os.open(os.path.join(cell_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
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


def holder(cell_dir: str) -> str:
    """'host:pid' of the process that last claimed `cell_dir` ('' if none ever did)."""
    try:
        with open(os.path.join(cell_dir, LOCK_NAME), encoding="utf-8") as f:
            info = json.load(f)
        return f"{info['host']}:{info['pid']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
