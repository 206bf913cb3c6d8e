"""AutoAttack and the single attacks on any JAX classifier, as a library.

`autoattack(logits_fn, images, labels, epsilon=...)` and `attack(name, logits_fn, ...)`
take any callable from images to logits: a bound Flax linen module, a Flax NNX module,
`functools.partial(model.apply, variables, ...)`, a pure `jnp` function. They run through
the eval command's own machinery (`robustness.LogitsEvaluator`, `robustness.run_ensemble`:
fixed-size batches split over every local device, each attack compiled once per batch
shape), so on the same model, images and key they give the eval command's result bit for
bit. The model's arrays are lifted out of `logits_fn` and passed to the compiled programs
as arguments wherever they can be found (`split_logits_fn`); a plain closure works too,
its arrays compiled in as constants.
"""
import dataclasses
import functools
import math
import numbers
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

from robust_admm.attacks import core, suite
from robust_admm.evaluation import robustness
from robust_admm.models.cpu_forms import with_cpu_forms
from robust_admm.runtime import logs, parallel

__all__ = ["AttackOutput", "AutoAttackResult", "attack", "autoattack", "split_logits_fn"]

# AutoAttack's versions: the members run in order, each on the points still robust.
VERSIONS = {"standard": suite.STANDARD}
NOT_IMPLEMENTED_VERSIONS = {
    "plus": "APGD-DLR, untargeted FAB and 5 restarts of each member",
    "rand": "APGD with expectation over transformation for randomised defences",
}


# ----------------------------------------------------------------------------- the model

def _lift(fn) -> tuple[Any, Callable]:
    """(tree, call) with call(tree, *args, **kwargs) = fn(*args, **kwargs), the arrays of
    `fn` among tree's leaves: a bound linen module gives its variables, a
    `functools.partial` its arguments (and what its function gives), any other callable
    itself (a pytree such as an NNX module, or a leaf)."""
    if isinstance(fn, linen.Module):
        if fn.scope is None:
            raise TypeError(f"logits_fn is an unbound flax.linen module ({type(fn).__name__}), "
                            f"which holds no parameters; allowed: model.bind(variables) or "
                            f"functools.partial(model.apply, variables)")
        module, variables = fn.unbind()
        return variables, lambda v, *a, **k: module.apply(v, *a, **k)
    if isinstance(fn, functools.partial):
        tree, call = _lift(fn.func)
        return ((tree, fn.args, fn.keywords),
                lambda t, *a, **k: call(t[0], *t[1], *a, **{**t[2], **k}))
    return fn, lambda f, *a, **k: f(*a, **k)


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def split_logits_fn(logits_fn: Callable) -> tuple[Callable, list]:
    """`logits_fn` as (apply, arrays) with apply(arrays, x) = logits_fn(x), the arrays it
    holds lifted out (a bound linen module's variables, an NNX module's state, the arrays
    among a `functools.partial`'s arguments), so that a compiled attack takes them as
    arguments rather than constants. The arrays a plain function closes over stay inside it."""
    if not callable(logits_fn):
        raise TypeError(f"logits_fn={logits_fn!r} is not callable; allowed: a function from "
                        f"images to logits (a bound Flax module, an NNX module, a jnp function)")
    tree, call = _lift(logits_fn)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    lifted = [_is_array(leaf) for leaf in leaves]

    def apply(arrays, x):
        it = iter(arrays)
        rebuilt = [next(it) if is_array else leaf for leaf, is_array in zip(leaves, lifted)]
        return call(jax.tree_util.tree_unflatten(treedef, rebuilt), x)

    return apply, [leaf for leaf, is_array in zip(leaves, lifted) if is_array]


# ----------------------------------------------------------------------------- checks

def _check_norm(norm) -> str:
    if norm not in core.NORMS:
        raise ValueError(f"norm={norm!r} is not known; allowed: {', '.join(core.NORMS)}")
    return norm


def _check_epsilon(epsilon) -> float:
    if (isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real)
            or not math.isfinite(epsilon) or epsilon <= 0):
        raise ValueError(f"epsilon={epsilon!r}; allowed: a finite number > 0 (in the scale "
                         f"of the images' bounds)")
    return float(epsilon)


def _check_bounds(bounds) -> tuple[float, float]:
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds={bounds!r}; allowed: (low, high), finite, low < high")
    return lo, hi


def _check_batch_size(batch_size, mesh) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; allowed: an integer >= 1")
    parallel.check_global_batch(int(batch_size), mesh, "batch_size")
    return int(batch_size)


def _check_images(images, bounds) -> np.ndarray:
    x = np.asarray(images)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"images have dtype {x.dtype}; allowed: a floating dtype with values "
                        f"in bounds={bounds} (e.g. uint8 pixels / 255.0 for [0, 1])")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"images have shape {x.shape}; allowed: (batch, ...) with batch >= 1 "
                         f"and one or more axes per image (NHWC for images)")
    x = x.astype(np.float32)
    lo, hi = bounds
    low, high = float(x.min()), float(x.max())
    if not (np.isfinite(x).all() and lo <= low and high <= hi):
        raise ValueError(f"images hold values in [{low:g}, {high:g}]; allowed: within "
                         f"bounds=({lo:g}, {hi:g}), finite (give `bounds` for another range)")
    return x


def _check_labels(labels, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype == bool or not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"labels have dtype {y.dtype}; allowed: integer class indices")
    if y.shape != (n,):
        raise ValueError(f"labels have shape {y.shape}; allowed: ({n},), one per image")
    return y.astype(np.int32)


def _check_logits(apply, arrays, x: np.ndarray, batch: int) -> int:
    """The class count of `apply`'s logits for a batch of `batch` images shaped as x's;
    an error naming what it returned unless that is floating (batch, classes >= 2)."""
    out = jax.eval_shape(apply, arrays, jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype))
    ok = (isinstance(out, jax.ShapeDtypeStruct) and len(out.shape) == 2
          and out.shape[0] == batch and out.shape[1] >= 2
          and jnp.issubdtype(out.dtype, jnp.floating))
    if not ok:
        got = (f"shape {tuple(out.shape)}, dtype {out.dtype}"
               if isinstance(out, jax.ShapeDtypeStruct) else f"{type(out).__name__} {out}")
        raise ValueError(f"logits_fn returned {got} for a batch of images of shape "
                         f"{(batch,) + x.shape[1:]} (the attacks call it on batches); allowed: "
                         f"floating logits of shape (batch, classes) = ({batch}, classes >= 2)")
    return int(out.shape[1])


def _members(version: str, attacks) -> tuple[tuple[str, ...], str]:
    """The ensemble's member names and the version they make ('custom' for a list)."""
    if attacks is None:
        if version in NOT_IMPLEMENTED_VERSIONS:
            raise NotImplementedError(
                f"version={version!r} (AutoAttack's {NOT_IMPLEMENTED_VERSIONS[version]}) is "
                f"not implemented; allowed: {', '.join(VERSIONS)} or a custom `attacks` list")
        if version not in VERSIONS:
            raise ValueError(f"version={version!r} is not known; allowed: "
                             f"{', '.join(VERSIONS)} or a custom `attacks` list")
        return VERSIONS[version], version
    if version not in ("standard", "custom"):
        raise ValueError(f"version={version!r} with attacks={attacks!r}: a custom list makes "
                         f"the 'custom' version; allowed: leave version out or 'custom'")
    items = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    members = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"attacks={attacks!r} holds {item!r}; allowed: attack names")
        for name in suite.ENSEMBLES.get(item.strip(), (item.strip(),)):
            suite.check_name(name)
            if name in members:
                raise ValueError(f"attacks={attacks!r} names {name!r} twice")
            members.append(name)
    if not members:
        raise ValueError(f"attacks={attacks!r} names no attack")
    return tuple(members), "custom"


def _key(key):
    if key is None:
        return jax.random.PRNGKey(0)
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    return key


@dataclasses.dataclass(frozen=True)
class _Prepared:
    evaluator: robustness.LogitsEvaluator
    x: np.ndarray          # images mapped to [0, 1], float32
    y: np.ndarray          # int32 (n,)
    epsilon: float         # in the [0, 1] scale
    key: Any
    num_classes: int
    to_bounds: Callable    # [0, 1] -> the caller's bounds


def _prepare(logits_fn, images, labels, epsilon, norm, batch_size, key, bounds, members,
             verbose: bool, cpu_forms: bool) -> _Prepared:
    """Checks every input before any work and builds the evaluator over the local
    devices, images and epsilon mapped from `bounds` to [0, 1] where they differ."""
    if not isinstance(cpu_forms, bool):
        raise TypeError(f"cpu_forms={cpu_forms!r}; allowed: True or False")
    norm = _check_norm(norm)
    epsilon = _check_epsilon(epsilon)
    lo, hi = _check_bounds(bounds)
    mesh = parallel.make_mesh(jax.local_devices())
    batch_size = _check_batch_size(batch_size, mesh)
    x = _check_images(images, (lo, hi))
    y = _check_labels(labels, len(x))
    apply, arrays = split_logits_fn(logits_fn)
    if cpu_forms:
        apply = with_cpu_forms(apply)
    if (lo, hi) != (0.0, 1.0):  # the attacks work in [0, 1]
        user_apply, scale = apply, hi - lo
        apply = lambda m, z: user_apply(m, lo + scale * z)
        x, epsilon = (x - lo) / scale, epsilon / scale
        to_bounds = lambda z: (lo + scale * z).astype(np.float32)
    else:
        to_bounds = lambda z: z
    ev = robustness.LogitsEvaluator(apply, arrays, batch_size, mesh,
                                    log=logs.log if verbose else lambda msg: None,
                                    batch_field="batch_size")
    num_classes = _check_logits(apply, arrays, x, ev.batches_for(len(x))[1])
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels hold values in [{y.min()}, {y.max()}]; allowed: "
                         f"[0, {num_classes}) for the {num_classes} classes of the logits")
    for name in members:
        suite.make(name, epsilon, num_classes, norm=norm)  # the norm and class count
        if name == "square" and x.ndim != 4:
            raise ValueError(f"square needs images of shape (batch, height, width, channels); "
                             f"got {x.shape}")
    return _Prepared(ev, x, y, epsilon, _key(key), num_classes, to_bounds)


# ----------------------------------------------------------------------------- the API

def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class AutoAttackResult:
    """What `autoattack` measured on n images.

    robust: bool (n,), classified correctly and fooled by no member; clean: bool (n,),
    classified correctly without attack; robust_accuracy, clean_accuracy: their means;
    accuracy_after: {member: robust accuracy after it}, in the order they ran; seconds:
    the whole call's wall time (compilation included), member_seconds: each member's;
    epsilon, norm: the threat model in the caller's bounds; attacks: the members;
    version: 'standard' or 'custom'."""

    robust: np.ndarray
    clean: np.ndarray
    robust_accuracy: float
    clean_accuracy: float
    accuracy_after: dict
    seconds: float
    member_seconds: dict
    epsilon: float
    norm: str
    n: int
    attacks: tuple
    version: str

    def __str__(self) -> str:
        lines = [f"clean accuracy: {100 * self.clean_accuracy:.2f}% of {self.n} images"]
        lines += [f"  after {name}: {100 * acc:.2f}% ({self.member_seconds[name]:.1f} s)"
                  for name, acc in self.accuracy_after.items()]
        lines.append(f"robust accuracy: {100 * self.robust_accuracy:.2f}% (AutoAttack "
                     f"{self.version}, {self.norm} epsilon {self.epsilon:g}, "
                     f"{self.seconds:.1f} s)")
        return "\n".join(lines)


def autoattack(logits_fn: Callable, images, labels, *, epsilon: float, norm: str = "linf",
               version: str = "standard", attacks: Sequence[str] | str | None = None,
               batch_size: int = 500, key: jax.Array | int | None = None,
               bounds: tuple[float, float] = (0.0, 1.0),
               verbose: bool = False, cpu_forms: bool = True) -> AutoAttackResult:
    """AutoAttack (Croce & Hein, 2020) on any JAX classifier: robust accuracy at radius
    `epsilon` in `norm`, counted as AutoAttack counts it (each member runs on the points
    still robust; a point misclassified without attack is not robust).

    logits_fn: images (batch, ...) float32 -> logits (batch, classes), classes >= 2: a
      bound Flax linen module (`model.bind(variables)`), a Flax NNX module (in eval
      mode: `model.eval()`, so BatchNorm uses its running averages), a
      `functools.partial(model.apply, variables, train=False)`, a pure jnp function.
    images: float array (n, ...), NHWC for image models (Square needs 4 axes), values
      within `bounds`; computed in float32. labels: int array (n,) in [0, classes).
    epsilon: the radius (> 0, finite) in the scale of `bounds` (e.g. 8/255 for [0, 1]).
    norm: 'linf' or 'l2'. version: 'standard' (APGD-CE, APGD-T, FAB-T, Square).
    attacks: a custom ensemble instead: names as the eval command's --attacks takes them
      (fgsm, pgd<N>, apgd-ce, apgd-dlr, apgd-t, fab-t, square, aa-standard), a list or a
      comma-separated string.
    batch_size: images per compiled batch, split over every local device (a multiple of
      their count). key: a jax PRNG key or an int seed (None: PRNGKey(0), the eval
      command's default seed). bounds: (low, high) of the pixels; the attacks clip to it.
    verbose: print the eval command's progress lines.
    cpu_forms: compute the model's convolutions and tiling max-pools in the forms the
      zoo's layers use on CPU (`robust_admm.models.cpu_forms`: 1.6-3x faster passes
      on small models; the max-pools exact, the convolutions up to float rounding).
      No effect on the zoo's models, whose layers choose these forms themselves, nor on
      GPU and TPU. False runs the model's own ops.

    On a model of the zoo, with the same images, epsilon and key, the result is the eval
    command's (`robust_admm eval --attacks=aa-standard`) bit for bit."""
    members, version = _members(version, attacks)
    t0 = time.perf_counter()
    p = _prepare(logits_fn, images, labels, epsilon, norm, batch_size, key, bounds, members,
                 verbose, cpu_forms)
    clean = p.evaluator.correct(p.x, p.y)
    label = "aa-" + version if version != "custom" else "autoattack"
    robust, after, seconds = robustness.run_ensemble(
        p.evaluator, p.x, p.y, members, p.epsilon, p.key, clean, p.num_classes, None, norm,
        label)
    return AutoAttackResult(
        robust=_readonly(robust), clean=_readonly(clean),
        robust_accuracy=float(robust.mean()), clean_accuracy=float(clean.mean()),
        accuracy_after=after, seconds=time.perf_counter() - t0, member_seconds=seconds,
        epsilon=float(epsilon), norm=norm, n=len(p.y), attacks=members, version=version)


class AttackOutput(NamedTuple):
    """What `attack` returns. adversarial: float32, the images' shape, within `bounds`
    and the epsilon-ball around each image; fooled: bool (n,), the model does not predict
    the label at the adversarial image (so also where it errs without attack)."""

    adversarial: np.ndarray
    fooled: np.ndarray


def _with_options(attack: core.Attack, name: str, options: dict) -> core.Attack:
    """`attack` with some of its fields replaced (e.g. num_steps, restarts); epsilon and
    norm are the call's own arguments."""
    allowed = [f.name for f in dataclasses.fields(attack) if f.name not in ("epsilon", "norm")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{name}: option(s) {', '.join(unknown)} not known; allowed: "
                         f"{', '.join(allowed)}")
    return dataclasses.replace(attack, **options)


def attack(name: str, logits_fn: Callable, images, labels, *, epsilon: float,
           norm: str = "linf", key: jax.Array | int | None = None, batch_size: int = 500,
           bounds: tuple[float, float] = (0.0, 1.0), cpu_forms: bool = True,
           **options) -> AttackOutput:
    """One attack of the suite on any JAX classifier: the adversarial image of every
    point and whether it fools the model. Arguments as `autoattack`'s.

    name: fgsm, pgd<N> (N steps of 2.5 * epsilon / N, random start), apgd-ce, apgd-dlr,
      apgd-t, fab-t, square, at AutoAttack's standard settings.
    options: fields of the attack's class to change (robust_admm.attacks: Pgd, ApgdCe,
      ApgdT, FabT, Square), e.g. num_steps=50, restarts=3, step_size=0.01.

    The attack runs on every point, in batches of `batch_size` (batch i draws with
    fold_in(fold_in(key, crc32(name)), i), as `autoattack` draws for its first member)."""
    suite.check_name(name)
    p = _prepare(logits_fn, images, labels, epsilon, norm, batch_size, key, bounds, (name,),
                 False, cpu_forms)
    the_attack = suite.make(name, p.epsilon, p.num_classes, norm=norm)
    if options:
        the_attack = _with_options(the_attack, name, options)
    x_adv = p.evaluator.adversarial(the_attack, p.x, p.y,
                                    jax.random.fold_in(p.key, zlib.crc32(name.encode())))
    fooled = ~p.evaluator.correct(x_adv, p.y)
    return AttackOutput(p.to_bounds(x_adv), fooled)
