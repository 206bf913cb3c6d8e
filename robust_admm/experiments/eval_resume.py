"""Resuming an interrupted `robust_admm.eval`: every attack batch's result (which of its
points the attack fooled) is saved as it finishes in DIR/eval/<stage>.partial.json, and a
rerun with the same arguments takes the saved batches instead of attacking them again.

A batch is found again by where it runs (`scope`: the chunk and what is evaluated, set by
the caller; the attack's label; its index) and by a checksum of all that decides its
result: the attack (its parameters), the batch's key, its points' indices, pixels and
labels. Only an identical computation is reused, so a resumed evaluation ends with the
numbers an uninterrupted one gives; AutoAttack's later members run on the points the
earlier ones left, which the saved batches give back exactly. The file also records the
arguments and the model (`identity`); a file of other arguments is set aside with a log
line. SIGTERM is honoured between batches (`stop`), so it waits for one attack batch at
most."""
import os
import zlib

import jax
import numpy as np

from robust_admm.runtime import logs


def params_checksum(tree) -> int:
    """crc32 over the arrays of a pytree (the model's parameters), in leaf order."""
    crc = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        crc = zlib.crc32(f"{a.dtype}{a.shape}".encode(), crc)
        crc = zlib.crc32(a.tobytes(), crc)
    return crc


def key_bytes(key) -> bytes:
    """The raw bits of a PRNG key (a typed key or a uint32 array)."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).tobytes()


class BatchJournal:
    """Finished attack batches of one evaluation, kept in `path` (JSON, rewritten
    atomically after each batch). `stop()` says whether to stop before the next batch
    (the SIGTERM flag); `scope` names the part of the evaluation now running."""

    def __init__(self, path: str, identity: dict, stop=lambda: False, log=logs.log):
        self.path, self.identity, self.stop, self.log = path, identity, stop, log
        self.scope = ""
        self.batches = {}
        self.reused = self.computed = 0
        if os.path.exists(path):
            try:
                saved = logs.read_json(path)
            except (OSError, ValueError) as e:
                saved = None
                why = f"it cannot be read ({e})"
            else:
                why = "it was written by an evaluation with other arguments or another model"
            if isinstance(saved, dict) and saved.get("identity") == logs.to_python(identity):
                self.batches = dict(saved.get("batches", {}))
                self.log(f"[eval] resuming: {len(self.batches)} finished attack batches in "
                         f"{path} are reused, the rest are computed")
            else:
                self.log(f"[eval] {path} is set aside, not reused: {why}")
                if logs.is_main_process():
                    os.replace(path, path + ".discarded")

    def _unit(self, label, i, attack, key, x, y, rows) -> tuple[str, str]:
        crc = zlib.crc32(repr(attack).encode())
        for part in (key_bytes(jax.random.fold_in(key, i)), np.asarray(rows, np.int64),
                     np.ascontiguousarray(x[rows]), np.ascontiguousarray(y[rows])):
            crc = zlib.crc32(part if isinstance(part, bytes) else part.tobytes(), crc)
        return f"{self.scope}|{label}|{i}", f"{crc:08x}"

    def get(self, label, i, attack, key, x, y, rows) -> np.ndarray | None:
        """Which of `rows` the attack fooled, if this very batch was saved; else None."""
        unit, check = self._unit(label, i, attack, key, x, y, rows)
        entry = self.batches.get(unit)
        if entry is None or entry["check"] != check or entry["n"] != len(rows):
            return None
        self.reused += 1
        return np.unpackbits(np.frombuffer(bytes.fromhex(entry["fooled"]), np.uint8),
                             count=entry["n"]).astype(bool)

    def put(self, label, i, attack, key, x, y, rows, fooled):
        """Saves a finished batch (which of `rows` the attack fooled)."""
        unit, check = self._unit(label, i, attack, key, x, y, rows)
        fooled = np.asarray(fooled, bool)
        self.batches[unit] = {"check": check, "n": len(fooled),
                              "fooled": np.packbits(fooled).tobytes().hex()}
        self.computed += 1
        logs.write_json(self.path, {"identity": self.identity, "batches": self.batches},
                        indent=None)

    def finish(self):
        """The evaluation is complete: the partial file goes."""
        if logs.is_main_process() and os.path.exists(self.path):
            os.remove(self.path)
