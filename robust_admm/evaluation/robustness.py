"""Robust accuracy under single attacks and ensembles, counted as AutoAttack counts it.

A point is robust under an ensemble if the model classifies it correctly and no member
attack fools it: the members run in order, each only on the points still robust, and a
point's worst case is kept. A single attack runs on every correctly classified point.
A pass's batches are all of one size (the points shared evenly, the last batch padded)
and split along the mesh's `data` axis, so each attack compiles once per pass and runs on
one device or many. `LogitsEvaluator` attacks any
`apply(model_args, x) -> logits` (the public `autoattack` builds one from a user's
function); `Evaluator` is it on a model of the zoo.
"""
import dataclasses
import functools
import time
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from robust_admm.attacks import core, suite
from robust_admm.evaluation.eval_step import TOP5_ABOVE_CLASSES, EvaluationInterrupted
from robust_admm.models import apply_model
from robust_admm.runtime import logs, parallel
from robust_admm.runtime.compiler import (jit_for_attacks, jit_with_options,
                                          resolve_pgd_loop)


TAIL_GRANULE = 16  # a pass's batches are padded to a multiple of this


def model_apply(model) -> Callable:
    """`apply(model_args, x) -> logits` of a model of the zoo, `model_args` = (params,
    batch_stats); BatchNorm on running averages (`models.apply_model`, train=False)."""
    return lambda m, xa: apply_model(model, *m, xa, train=False)[0]


def make_fooled_fn(model, attack: core.Attack, mesh: Mesh | None = None, loop: str = "auto",
                   cpu_convolutions: str = "auto", place: Callable | None = None,
                   bucket: Callable | None = None) -> Callable:
    """`apply_fooled_fn` for a model of the zoo: `model_args` = (params, batch_stats)."""
    return apply_fooled_fn(model_apply(model), attack, mesh, loop, cpu_convolutions, place,
                           bucket)


def apply_fooled_fn(apply: Callable, attack: core.Attack, mesh: Mesh | None = None,
                    loop: str = "auto", cpu_convolutions: str = "auto",
                    place: Callable | None = None, bucket: Callable | None = None) -> Callable:
    """`fooled(model_args, x, y, key) -> bool (batch,)` over host arrays x, y: the
    attack's point is misclassified by `apply(model_args, x) -> logits`. The host form
    regroups the points still robust (`Compacting`); `place` puts a host batch on the
    devices, `bucket(count)` sizes a regrouped batch."""
    jit, attack_jit = jit_with_options(cpu_convolutions), jit_for_attacks(cpu_convolutions)
    shard = parallel.batch_constraint(mesh)
    place = place or jnp.asarray
    if resolve_pgd_loop(loop) == "fori":
        # The search and the verdict are two programs: the verdict without the attacks'
        # fast min/max (`compiler.attack_compiler_options`).
        search = attack_jit(lambda m, x, y, key: core.run(
            attack, functools.partial(apply, m), shard(x), shard(y), key))
        verdict = jit(lambda m, x, y: core.misclassified(functools.partial(apply, m), x, y))

        def fooled(m, x, y, key):
            x, y = place(x), place(y)
            return np.asarray(verdict(m, search(m, x, y, key), y))
        return fooled
    return Compacting(attack, apply, attack_jit, shard, place, bucket or (lambda n: n),
                      verdict_jit=jit)


def apply_adversarial_fn(apply: Callable, attack: core.Attack, mesh: Mesh | None = None,
                         loop: str = "auto", cpu_convolutions: str = "auto",
                         place: Callable | None = None) -> Callable:
    """`adversarial(model_args, x, y, key) -> x_adv` (a device array) over host arrays x,
    y: the whole attack on every point of the batch, traced in one program ('fori') or
    driven from the host (`core.HostRunner`), with the randomness `apply_fooled_fn` draws."""
    jit = jit_for_attacks(cpu_convolutions)
    shard = parallel.batch_constraint(mesh)
    place = place or jnp.asarray
    if resolve_pgd_loop(loop) == "fori":
        compiled = jit(lambda m, x, y, key: core.run(
            attack, functools.partial(apply, m), shard(x), shard(y), key))
        return lambda m, x, y, key: compiled(m, place(x), place(y), key)
    runner = core.HostRunner(attack, apply, jit, shard)
    return lambda m, x, y, key: runner(m, place(x), place(y), key)


class Compacting:
    """The host-driven attack spending work only on points still robust, as AutoAttack
    does: each run (restart) starts on the points no earlier run fooled, and an attack
    that keeps its best point (`keeps_best`) drops the points it has fooled every
    `check_every` steps, regrouping the rest into a smaller batch once they fit one.
    Per-example results do not depend on the grouping: every state array is batch-first
    and each example's work is its own (Square's shared random squares are drawn per
    step, whoever is in the batch)."""

    def __init__(self, attack: core.Attack, apply, jit, shard, place, bucket, verdict_jit):
        """`jit` compiles the attack's parts; `verdict_jit` the check of which points its
        result fools (`apply_fooled_fn`: without the attacks' fast min/max)."""
        self.attack, self.place, self.bucket = attack, place, bucket
        self.runner = core.HostRunner(attack, apply, jit, shard)
        self.fooled_c = verdict_jit(lambda m, s, x, y: core.misclassified(
            functools.partial(apply, m),
            attack.finish(functools.partial(apply, m), s, x, y), y))
        self.take_c = jit(lambda tree, idx: jax.tree_util.tree_map(
            lambda a: a[idx] if a.ndim else a, tree))
        self.check_every = max(10, attack.num_steps // 50) if attack.keeps_best else 0

    def _padded(self, rows: np.ndarray) -> np.ndarray:
        size = self.bucket(len(rows))
        return np.concatenate([rows, np.full(size - len(rows), rows[0], rows.dtype)])

    def __call__(self, m, x: np.ndarray, y: np.ndarray, key) -> np.ndarray:
        fooled = np.zeros(len(y), bool)
        x_all, y_all = self.place(x), self.place(y)
        for r in range(self.attack.restarts):
            rows = np.flatnonzero(~fooled)  # the points this run attacks, in batch order
            if not len(rows):
                break
            # The start is drawn for the whole batch, as the compiled loop draws it, and
            # then cut down to the points still robust.
            s, xb, yb = self.runner.init(m, x_all, y_all, key, r, 1.0), x_all, y_all
            idx = np.arange(len(y))
            if len(rows) < len(y):
                idx = self._padded(rows)
                s, xb, yb = self.take_c((s, xb, yb), jnp.asarray(idx))
            for i in range(1, self.attack.num_steps + 1):
                s = self.runner.step_c(m, s, xb, yb)
                if self.check_every and i % self.check_every == 0 and i < self.attack.num_steps:
                    done = np.asarray(self.fooled_c(m, s, xb, yb))[:len(rows)]
                    fooled[rows[done]] = True
                    keep = np.flatnonzero(~done)
                    if not len(keep):
                        break
                    if self.bucket(len(keep)) < len(idx):
                        s, xb, yb = self.take_c((s, xb, yb), jnp.asarray(self._padded(keep)))
                        rows = rows[keep]
                        idx = self._padded(rows)
            else:
                fooled[rows] |= np.asarray(self.fooled_c(m, s, xb, yb))[:len(rows)]
        return fooled


@dataclasses.dataclass
class LogitsEvaluator:
    """Runs attacks on `apply(model_args, x) -> logits (batch, classes)` over host arrays
    of pixels in [0, 1] and labels. `model_args` (a pytree of arrays, replicated over the
    mesh) is an argument of every compiled program, so the programs compile once per batch
    shape whatever its values. `batch_field` names the batch size in errors."""

    apply: Callable
    model_args: object
    batch: int = 500
    mesh: Mesh | None = None
    loop: str = "auto"
    cpu_convolutions: str = "auto"
    log: Callable = logs.log
    batch_field: str = "--batch"
    # Optional: finished batches kept and reused (`get(label, i, attack, key, x, y, b)`,
    # `put(...)`) and asked before each batch whether to stop (`stop()`), so an evaluation
    # interrupted between batches resumes where it stopped (`experiments/eval_resume.py`).
    journal: object = None

    def __post_init__(self):
        if self.mesh is not None:
            parallel.check_global_batch(self.batch, self.mesh, self.batch_field)
            self.model_args = parallel.replicate(self.model_args, self.mesh)
        elif self.batch < 1:
            raise ValueError(f"{self.batch_field}={self.batch} must be >= 1")
        jit = jit_with_options(self.cpu_convolutions)
        self._predict = jit(lambda m, x: self.apply(m, x).argmax(-1))
        self._top5 = jit(lambda m, x: jax.lax.top_k(self.apply(m, x), 5)[1])
        self._fooled = {}
        self._adversarial = {}

    def _place(self, a: np.ndarray):
        if self.mesh is None:
            return jnp.asarray(a)
        sharding = parallel.batch_sharding(self.mesh)
        return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

    def batch_for(self, count: int) -> int:
        """The batch for `count` points: `batch`, or for fewer points the next power of two
        (a multiple of the device count), so few points left cost little and the attacks
        compile for a handful of shapes only (the buckets a regrouped batch takes)."""
        if count >= self.batch:
            return self.batch
        devices = 1 if self.mesh is None else self.mesh.size
        b = 1 << max(0, int(count - 1).bit_length())
        return min(self.batch, -(-max(b, devices) // devices) * devices)

    def batches_for(self, count: int) -> tuple[int, int]:
        """(number, size) of the batches `count` points are attacked in: as few as `batch`
        allows, all of one size (one compiled shape per pass), that size the points' even
        share rounded up to a multiple of TAIL_GRANULE (and of the device count) or to
        `batch_for`'s power of two, whichever is smaller. So padding wastes at most a
        granule per batch: 939 points with batch 500 are 2 batches of 480, not 2 of 500."""
        number = -(-count // self.batch)
        share = -(-count // number)
        unit = int(np.lcm(TAIL_GRANULE, 1 if self.mesh is None else self.mesh.size))
        return number, min(self.batch_for(share), -(-share // unit) * unit)

    def _batches(self, idx: np.ndarray):
        """Index batches (`batches_for(len(idx))`, the last padded with idx[0]) and the
        number of real entries in each."""
        size = self.batches_for(len(idx))[1]
        for start in range(0, len(idx), size):
            part = idx[start:start + size]
            yield np.concatenate([part, np.full(size - len(part), idx[0], idx.dtype)]), len(part)

    def correct(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Natural correctness of every point."""
        out = np.zeros(len(y), bool)
        for b, n in self._batches(np.arange(len(y))):
            pred = np.asarray(self._predict(self.model_args, self._place(x[b])))
            out[b[:n]] = pred[:n] == y[b[:n]]
        return out

    def correct_top5(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether each point's label is among its 5 largest logits (natural)."""
        out = np.zeros(len(y), bool)
        for b, n in self._batches(np.arange(len(y))):
            top = np.asarray(self._top5(self.model_args, self._place(x[b])))
            out[b[:n]] = (top[:n] == y[b[:n], None]).any(-1)
        return out

    def fooled_fn(self, attack: core.Attack):
        if attack not in self._fooled:
            self._fooled[attack] = apply_fooled_fn(self.apply, attack, self.mesh, self.loop,
                                                   self.cpu_convolutions, self._place,
                                                   self.batch_for)
        return self._fooled[attack]

    def adversarial(self, attack: core.Attack, x: np.ndarray, y: np.ndarray,
                    key) -> np.ndarray:
        """The attack's image of every point (the batches of `attack` over all points:
        batch i draws with fold_in(key, i)), as a host array shaped as x."""
        if attack not in self._adversarial:
            self._adversarial[attack] = apply_adversarial_fn(
                self.apply, attack, self.mesh, self.loop, self.cpu_convolutions, self._place)
        fn = self._adversarial[attack]
        out = np.array(x, copy=True)
        if attack.is_identity:
            return out
        for i, (b, n) in enumerate(self._batches(np.arange(len(y)))):
            out[b[:n]] = np.asarray(fn(self.model_args, x[b], y[b],
                                       jax.random.fold_in(key, i)))[:n]
        return out

    def attack(self, attack: core.Attack, x, y, idx: np.ndarray, key,
               label: str = "") -> np.ndarray:
        """Which of the points `idx` the attack fools (bool over idx), with progress."""
        fooled = np.zeros(len(idx), bool)
        if len(idx) == 0 or attack.is_identity:
            return fooled
        fn = self.fooled_fn(attack)
        t0, (n_batches, _), done = time.perf_counter(), self.batches_for(len(idx)), 0
        for i, (b, n) in enumerate(self._batches(idx)):
            start, done = done, done + n
            kept = None if self.journal is None else self.journal.get(label, i, attack, key,
                                                                      x, y, b[:n])
            if kept is not None:
                fooled[start:done] = kept
                continue
            if self.journal is not None and self.journal.stop():
                raise EvaluationInterrupted(self.journal.computed)
            f = fn(self.model_args, x[b], y[b], jax.random.fold_in(key, i))
            fooled[start:done] = f[:n]
            if self.journal is not None:
                self.journal.put(label, i, attack, key, x, y, b[:n], f[:n])
            elapsed = time.perf_counter() - t0
            left = len(idx) - int(fooled.sum())
            self.log(f"[eval] {label}: batch {i + 1}/{n_batches}, {left} points still robust "
                     f"after {done}/{len(idx)} attacked, {elapsed:.0f} s, ETA "
                     f"{logs.fmt_duration(elapsed / done * (len(idx) - done))}")
        return fooled


class Evaluator(LogitsEvaluator):
    """`LogitsEvaluator` on a model of the zoo: `model_args` = (params, batch_stats),
    BatchNorm on running averages."""

    def __init__(self, model, params, batch_stats, batch: int = 500, mesh: Mesh | None = None,
                 loop: str = "auto", cpu_convolutions: str = "auto", log: Callable = logs.log):
        self.model = model
        super().__init__(model_apply(model), (params, batch_stats), batch, mesh, loop,
                         cpu_convolutions, log)


def run_ensemble(ev: LogitsEvaluator, x: np.ndarray, y: np.ndarray, members: Sequence[str],
                 epsilon: float, key, correct: np.ndarray, num_classes: int = 10,
                 pgd_step_ratio: float | None = None, norm: str = "linf",
                 label: str = "") -> tuple[np.ndarray, dict, dict]:
    """The members (names of `suite`) run in order, each on the points still robust:
    (robust bool (n,), accuracy after each member {name: float}, seconds {name: float}).
    Member `name` draws with fold_in(key, crc32(name)), so an attack at one epsilon draws
    the same randomness wherever it runs first (alone or as an ensemble's first member)."""
    robust = correct.copy()
    after, seconds = {}, {}
    for name in members:
        pgd_step = pgd_step_ratio * epsilon if pgd_step_ratio else None
        attack = suite.make(name, epsilon, num_classes, pgd_step, norm)
        idx = np.flatnonzero(robust)
        t0 = time.perf_counter()
        key_name = jax.random.fold_in(key, zlib.crc32(name.encode()))
        fooled = ev.attack(attack, x, y, idx, key_name,
                           f"{label}/{name}" if len(members) > 1 else name)
        robust[idx[fooled]] = False
        seconds[name] = time.perf_counter() - t0
        after[name] = float(robust.mean())
        ev.log(f"[eval] eps {epsilon:g}: after {name}: {100 * after[name]:.2f}% robust "
               f"({seconds[name]:.0f} s)")
    return robust, after, seconds


def robust_accuracy(ev: LogitsEvaluator, x: np.ndarray, y: np.ndarray,
                    items: Sequence[tuple[str, Sequence[str]]], epsilon: float, key,
                    num_classes: int = 10, pgd_step_ratio: float | None = None,
                    correct: np.ndarray | None = None, norm: str = "linf") -> dict:
    """Natural accuracy and, for each (label, members) item of `suite.parse`, the
    accuracy under it at radius `epsilon` (`run_ensemble`); ensembles also report the
    accuracy after each member (cumulative, as AutoAttack prints it) and the time each
    took. `pgd_step_ratio`: PGD's step size as a fraction of epsilon (default 2.5 / steps);
    `norm`: the threat model, 'linf' or 'l2'. With more than 10 classes, the natural
    top-5 accuracy too (the attacks count top-1 errors, as AutoAttack does)."""
    n = len(y)
    correct = ev.correct(x, y) if correct is None else correct
    result = {"n": n, "epsilon": epsilon, "norm": norm, "natural_acc": float(correct.mean()),
              "attacks": {}}
    if num_classes > TOP5_ABOVE_CLASSES:
        result["natural_top5"] = float(ev.correct_top5(x, y).mean())
    for label, members in items:
        robust, after, seconds = run_ensemble(ev, x, y, members, epsilon, key, correct,
                                              num_classes, pgd_step_ratio, norm, label)
        entry = {"robust_acc": float(robust.mean()), "epsilon": epsilon, "norm": norm,
                 "members": list(members), "seconds": sum(seconds.values())}
        if len(members) > 1:
            entry.update(after=after, member_seconds=seconds)
        result["attacks"][label] = entry
    return result
