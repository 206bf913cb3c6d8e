"""What the fuzz tests (tests/test_fuzz_*.py) share: the outcomes allowed on bad input,
a per-example time limit and allocation bound, and mutations of valid bytes and texts.

The guarantee checked: reading a mutated file or parsing a mutated string either gives a
correct result (each test checks it against its own reference) or raises one of the
project's own errors (those the entry points report as a message: `logs.exit_on_error`)
whose message names the file or the field. Anything else (a TypeError, IndexError,
struct.error, a bare json or UnicodeDecodeError, MemoryError), a hang, or an allocation
beyond what the file's size allows fails the test with the input that caused it.

Examples per property: `FUZZ_EXAMPLES` (default 40; e.g. FUZZ_EXAMPLES=2000 for a long
fuzz); the examples are derandomized, so the default run is the same every time.
"""
import contextlib
import os
import signal
import tracemalloc

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from robust_admm.runtime.checkpoint import CheckpointError

# The project's own errors: what `logs.exit_on_error` turns into a message.
OWN_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, CheckpointError)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
TIME_LIMIT_S = 10  # per example: a reader of a few-KB file that takes longer hangs


def fuzz_settings(scale: float = 1.0):
    """Deterministic hypothesis settings: `scale` x FUZZ_EXAMPLES examples, no deadline
    (the time limit is `within_limits`'), no example database."""
    return settings(max_examples=max(1, int(EXAMPLES * scale)), deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])


class Hang(Exception):
    """A reader ran past TIME_LIMIT_S."""


@contextlib.contextmanager
def time_limit(seconds: int = TIME_LIMIT_S):
    def alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn, names, max_bytes: int | None = None):
    """`fn()`'s result, or None where it raised one of OWN_ERRORS naming one of `names`
    (a path or a field); any other exception, a hang, or a peak allocation (Python and
    numpy, by tracemalloc) above `max_bytes` fails the test."""
    names = [os.fspath(n) for n in names]
    if max_bytes is not None:
        tracemalloc.start()
    try:
        with time_limit():
            try:
                result = fn()
            except OWN_ERRORS as e:
                message = str(e)
                assert any(n in message for n in names), (
                    f"{type(e).__name__} names none of {names}: {message}")
                result = None
    finally:
        if max_bytes is not None:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    if max_bytes is not None:
        assert peak <= max_bytes, f"peak allocation {peak:,} bytes > bound {max_bytes:,}"
    return result


@st.composite
def mutated_bytes(draw, valid: bytes, fields=(), max_edits: int = 4):
    """`valid` with a few edits: byte flips, truncation, extension, a cut in the middle,
    and overwritten header fields (`fields`: (offset, size) of big/little-endian words,
    set to 0, 1, small, huge or random values)."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(("flip", "truncate", "extend", "cut", "field")
                                  if fields else ("flip", "truncate", "extend", "cut")))
        if op == "flip" and data:
            i = draw(st.integers(0, min(len(data) - 1, 4096)))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=64))
        elif op == "cut" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "field":
            offset, size = draw(st.sampled_from(list(fields)))
            value = draw(st.sampled_from((0, 1, 2, 3, 255, 2 ** (8 * size) - 1,
                                          2 ** (8 * size - 1)))
                         | st.integers(0, 2 ** (8 * size) - 1))
            if offset + size <= len(data):
                order = draw(st.sampled_from(("big", "little")))
                data[offset:offset + size] = value.to_bytes(size, order)
    return bytes(data)


@st.composite
def mutated_text(draw, valid: list, alphabet: str = ""):
    """One of the `valid` texts with a few character edits (insertions from `alphabet`
    and any character, deletions, replacements, a duplicated or dropped item), or an
    arbitrary text."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40))
    text = draw(st.sampled_from(valid))
    chars = st.sampled_from(alphabet) if alphabet else st.characters()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("insert", "insert", "delete", "replace", "item",
                                   "any")))
        i = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:i] + draw(st.text(chars, min_size=1, max_size=3)) + text[i:]
        elif op == "any":
            text = text[:i] + draw(st.text(min_size=1, max_size=3)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 3)):]
        elif op == "replace" and text:
            i = min(i, len(text) - 1)
            text = text[:i] + draw(chars) + text[i + 1:]
        elif op == "item":
            items = text.split(",")
            j = draw(st.integers(0, len(items) - 1))
            items.insert(j, items[j]) if draw(st.booleans()) else items.pop(j)
            text = ",".join(items)
    return text


ODD_VALUES = (None, "", "x", 0, -1, 1.5, float("nan"), float("inf"), 10 ** 30, -10 ** 30,
              True, [], {}, [1, "a"], {"k": 1})


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated_json(draw, valid: dict, max_edits: int = 3):
    """(JSON text, the key paths edited) of `valid` with a few edits: a field deleted, its
    value swapped for another type, a huge number, NaN, or a key added; or the text cut
    or a byte changed (paths: None, the file is no longer JSON)."""
    import copy
    import json
    doc, edited = copy.deepcopy(valid), []
    for _ in range(draw(st.integers(1, max_edits))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(("delete", "swap", "swap", "add")))
        if op == "delete":
            del parent[path[-1]]
        elif op == "swap":
            parent[path[-1]] = draw(st.sampled_from(ODD_VALUES))
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.sampled_from(("extra", "kind", "x.y")))] = draw(
                st.sampled_from(ODD_VALUES))
        edited.append(path)
    text = json.dumps(doc)
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return text[:draw(st.integers(0, len(text) - 1))], None
    if kind == 1:
        return json.dumps(draw(st.sampled_from(ODD_VALUES))), None
    if kind == 2:
        i = draw(st.integers(0, len(text) - 1))
        return text[:i] + draw(st.sampled_from(("\udcff", "}", "\"", "\x00"))) + text[i + 1:], None
    return text, edited
