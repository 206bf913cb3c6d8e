"""XLA compiler options for the compiled steps, chosen per backend.

On XLA:CPU this jaxlib hands convolutions, matmuls and reductions to the YNNPACK library.
For the convolutions of the CIFAR models XLA's own convolution runtime is faster, above
all for the kernel gradient, while the library stays the better choice for matmuls and
the BatchNorm reductions (benchmarks/NOTES.md, entries 14 and 15). Its reduce fusion
may take in a convolution that feeds a reduction; the one such case in these models, the
max-pool backward, is written so that it does not (`models.layers`; NOTES.md, entry 15).
So on CPU the steps are compiled with the library limited to dots and reductions
(`cpu_convolutions='xla'`); the per-shape convolution forms of `models.conv.choose_form`
are tuned for that. GPU and TPU get no options.

The attacks' programs on CPU also take `xla_cpu_enable_fast_min_max`
(`attack_compiler_options`): max and min lowered to the processor's instructions, which
do not propagate NaN. On finite values they give the same bits (checked on the four
AutoAttack members: the same states after 60-300 steps), and the attack steps run 6-12%
faster on the LeNet benchmark (benchmarks/NOTES.md, "fast min/max"). Only the attacks'
search takes it: whether a point is classified correctly, before and after an attack,
is computed by programs without it, so a model whose NaN the option would hide is still
judged as it computes. Training never takes it (its non-finite checks rely on NaN
propagating). A jaxlib that rejects it compiles the attacks without it, silently: it
changes no result, only the time.

The options are experimental XLA flags. They are passed per compiled program (jit's
`compiler_options`), not through XLA_FLAGS, because a jaxlib that does not know a flag in
XLA_FLAGS aborts the process, whereas an unknown compiler option is an ordinary error:
'auto' checks once whether this jaxlib accepts it and otherwise warns and keeps jaxlib's
defaults; 'xla' turns that into an error.
"""
import functools
import warnings

import jax
import jax.numpy as jnp

CPU_CONVOLUTIONS = ("auto", "xla", "library")
LIBRARY_OPTION = "xla_cpu_experimental_ynn_fusion_type"
LIBRARY_DOTS_AND_REDUCTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options(cpu_convolutions: str = "auto", backend: str | None = None) -> dict:
    """The `compiler_options` for `jax.jit` on `backend` (default: JAX's default backend).

    `cpu_convolutions`: 'xla' (XLA:CPU's own convolutions, the library for dots and
    reductions), 'library' (jaxlib's defaults), 'auto' ('xla' where this jaxlib accepts
    the option, else jaxlib's defaults with a warning)."""
    if cpu_convolutions not in CPU_CONVOLUTIONS:
        raise ValueError(f"cpu_convolutions={cpu_convolutions!r}; allowed: {CPU_CONVOLUTIONS}")
    if (backend or jax.default_backend()) != "cpu" or cpu_convolutions == "library":
        return {}
    options = {LIBRARY_OPTION: LIBRARY_DOTS_AND_REDUCTIONS}
    error = _rejected(tuple(options.items()))
    if error is None:
        return options
    message = (f"this jaxlib ({jax.__version__}) rejects the XLA:CPU compiler option "
               f"{LIBRARY_OPTION}={LIBRARY_DOTS_AND_REDUCTIONS!r}: {error}")
    if cpu_convolutions == "xla":
        raise ValueError(f"cpu_convolutions='xla': {message}; use 'auto' or 'library'")
    warnings.warn(f"{message}; compiling with jaxlib's defaults (slower convolutions on "
                  "CPU; cpu_convolutions='library' silences this)")  # once: same place
    return {}


@functools.cache
def _rejected(options: tuple) -> str | None:
    """None if XLA:CPU compiles a trivial program with `options`, else its error text (a
    fact about the installed jaxlib, so it is asked once per process)."""
    try:
        cpu = jax.devices("cpu")[0]
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
            jax.device_put(jnp.zeros((), jnp.float32), cpu)).compile()
    except Exception as e:  # noqa: BLE001 (jaxlib raises its own runtime error types)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def jit_with_options(cpu_convolutions: str = "auto"):
    """`jax.jit` with this backend's compiler options (`compiler_options`)."""
    return functools.partial(jax.jit, compiler_options=compiler_options(cpu_convolutions))


FAST_MIN_MAX = ("xla_cpu_enable_fast_min_max", True)


def attack_compiler_options(cpu_convolutions: str = "auto",
                            backend: str | None = None) -> dict:
    """`compiler_options` plus, on CPU where this jaxlib accepts it, fast min/max (no NaN
    propagation; the same bits on finite values): for an attack's own programs only, never
    for the programs that decide whether a point is classified correctly."""
    options = compiler_options(cpu_convolutions, backend)
    if (backend or jax.default_backend()) != "cpu" or _rejected((FAST_MIN_MAX,)) is not None:
        return options
    return {**options, FAST_MIN_MAX[0]: FAST_MIN_MAX[1]}


def jit_for_attacks(cpu_convolutions: str = "auto"):
    """`jax.jit` with `attack_compiler_options`."""
    return functools.partial(jax.jit,
                             compiler_options=attack_compiler_options(cpu_convolutions))


PGD_LOOPS = ("auto", "fori", "host")


def resolve_pgd_loop(loop: str, backend: str | None = None) -> str:
    """'fori' (an attack's whole loop inside one compiled program) or 'host' (one compiled
    call per attack step, dispatched asynchronously: no host sync). 'auto' is 'host' on
    CPU, where XLA runs rolled loop bodies slower (benchmarks/NOTES.md, entry 1), and
    'fori' on GPU and TPU."""
    if loop not in PGD_LOOPS:
        raise ValueError(f"attack.loop={loop!r}; allowed: {PGD_LOOPS}")
    if loop != "auto":
        return loop
    return "host" if (backend or jax.default_backend()) == "cpu" else "fori"


class CompiledStep:
    """A step made of compiled parts: one part ('fori') or, with a host-driven attack loop,
    a few parts called in sequence without waiting for results. `compilations()` counts
    the programs compiled so far (one per part once warm: nothing recompiles)."""

    def __init__(self, fn, parts):
        self._fn, self.parts = fn, tuple(parts)

    def __call__(self, *args):
        return self._fn(*args)

    def compilations(self) -> int:
        return sum(p._cache_size() for p in self.parts)
