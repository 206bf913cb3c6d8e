"""Keep freed host memory inside the process, so XLA:CPU's per-call buffers reuse it.

Why: XLA:CPU allocates a compiled program's buffers on every call and frees them after
(for VGG-16 at batch 128, blocks of hundreds of MB). With glibc's default malloc these
blocks come from a fresh `mmap`, or from a worker thread's heap that returns pages to the
system, so every call faults in new zeroed pages, a measurable part of a CIFAR model's
step on CPU (benchmarks/NOTES.md, entry 11, "Host memory"). Three documented glibc
settings stop this: one malloc arena (worker-thread heaps are capped at 64 MB, so larger
blocks bypass them), large blocks taken from the heap instead of `mmap`, and no trimming
of the heap's top (`M_TRIM_THRESHOLD` = -1 disables it, as mallopt(3) documents). The
cost: the process keeps its peak host memory until it exits.

The single arena has a cost where buffers are small and many, probably contention for
its lock between XLA's threads and the dispatching thread; the LeNet steps (all buffers
well under 64 MB) have nothing to gain and are slower with it (NOTES.md, entry 11). So
'auto' (`resolve`) picks 'reuse' for the CIFAR models and 'system' for the rest.

The same settings can be given from outside as environment variables (`MALLOC_ARENA_MAX=1
MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736`); this module sets
them from inside for `python -m robust_admm.train` and the benchmarks. No library offers
this; it is a few `mallopt` calls through ctypes.
"""
import ctypes
import ctypes.util
import re

# mallopt(3) parameter numbers (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MODES = ("auto", "reuse", "system")
# Models whose programs allocate hundreds of MB per call at their usual batch sizes: the
# CIFAR models, WideResNets ('wrn<depth>_<k>') among them.
LARGE_BUFFER_MODELS = ("vgg16", "resnet18")
# As models.get_model names them; not imported from there, since this module must run
# before anything imports JAX.
_WIDE_RESNET = re.compile(r"wrn\d+_\d+")
SETTINGS = (  # (parameter, name, value): the 'reuse' mode
    (M_ARENA_MAX, "M_ARENA_MAX", 1),
    (M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD", 2**31 - 1),  # largest int: mmap only past 2 GiB
    (M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD", -1),  # never give the heap's top back
)


def _glibc():
    """The C library when it is glibc (it has `gnu_get_libc_version`), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def resolve(mode: str, model_name: str) -> str:
    """'auto' -> 'reuse' for the models in LARGE_BUFFER_MODELS, 'system' for the others;
    'reuse' and 'system' as given."""
    if mode not in MODES:
        raise ValueError(f"host malloc mode {mode!r}; allowed: {MODES}")
    if mode != "auto":
        return mode
    large = model_name in LARGE_BUFFER_MODELS or _WIDE_RESNET.fullmatch(model_name)
    return "reuse" if large else "system"


def configure(mode: str) -> str:
    """Applies the host malloc `mode` ('reuse': the settings above; 'system': leave the C
    library's defaults) and says what it did. Call it first, before JAX (or anything else)
    starts threads: a thread keeps the malloc arena it was given at its first allocation.

    Without glibc (macOS, musl) 'reuse' changes nothing and says so; a setting glibc
    refuses is reported in the returned text, not raised, since only speed depends on it.
    """
    if mode not in MODES[1:]:
        raise ValueError(f"host malloc mode {mode!r}; allowed: {MODES[1:]} (resolve 'auto' "
                         "with `resolve` first)")
    if mode == "system":
        return "host malloc: the C library's defaults"
    libc = _glibc()
    if libc is None:
        return "host malloc: not glibc, defaults kept"
    refused = [name for param, name, value in SETTINGS
               if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1]
    if refused:
        return f"host malloc: glibc refused {', '.join(refused)}; the others are set"
    return "host malloc: freed memory kept for reuse (one arena, no mmap below 2 GiB, no trim)"
