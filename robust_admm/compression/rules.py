"""Compression rules: which layers are compressed to which set.

Grammar (the `rules` of an admm or retrain phase; `prune.ratios` in the older form):

    "conv*=filter:0.5, fc1=irregular:0.9+quantize:4, fc2=nm:2:4, conv2=quantize:2"

`pattern=set[+set]`: the pattern is a layer name or a glob over the `/`-joined module path;
a set is `irregular|filter|column|channel:RATIO` (the fraction of units removed) or
`...:wK` (keep as many weights as the same model at width K), `nm:N:M` (N of every M along
the input channels), `quantize:BITS` (1 = binary, 2 = ternary, k-bit; on its own or on top
of one sparsity set).

Matching: a pattern matches the compressible leaves of a params tree (by default the
leaves named `kernel` with at least 2 dims: dense and conv weights; any predicate of
(path, leaf) instead) whose module path (the leaf path without its last name) or leaf
path it globs; a pattern that matches nothing, or a leaf two patterns match, is an error.
Rules are also objects (`Rule`) or dicts `{pattern: spec}`. Resolution turns a rules text
into `{leaf path: projection spec}` (widths expanded to ratios against the same model at
that width). Pure Python: only shapes are inspected.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from robust_admm.compression.projections import (KINDS, SPARSITY_KINDS, UNIT_KINDS, check_spec,
                                                  project_leaf)
from robust_admm.models import get_model

# --------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------


def comma_list(text: str) -> list:
    """'a, b,,c' -> ['a', 'b', 'c']: the config's list fields (rules, ratios, programs)."""
    return [s.strip() for s in str(text).split(",") if s.strip()]


def parse_ratios(text: str) -> dict:
    """'conv1=0.8,fc*=0.9' -> {'conv1': 0.8, 'fc*': 0.9} (`prune.ratios`)."""
    out = {}
    for item in comma_list(text):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"prune.ratios={text!r}: item {item!r} is not 'layer=ratio'") from None
    if not out:
        raise ValueError(f"prune.ratios={text!r} names no layer; e.g. 'conv1=0.5,fc*=0.9'")
    for key, r in out.items():
        if not 0.0 <= r < 1.0:
            raise ValueError(f"prune.ratios={text!r}: ratio {r} for {key!r} is outside [0, 1)")
    return out


def legacy_rules(prune) -> str:
    """`prune.kind` with `prune.ratios` (or `prune.to_width`) as a rules text."""
    if prune.to_width:
        return ",".join(f"{layer}={prune.kind}:w{prune.to_width}"
                        for layer in comma_list(prune.to_width_layers))
    return ",".join(f"{layer}={prune.kind}:{ratio!r}"
                    for layer, ratio in parse_ratios(prune.ratios).items())


def _number(text: str, what: str, item: str, integer: bool = False):
    try:
        return int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"rule {item!r}: {what}={text!r} is not {kind}") from None


def _parse_set(part: str, item: str) -> dict:
    kind, *args = [a.strip() for a in part.split(":")]
    if kind in UNIT_KINDS:
        if len(args) != 1:
            raise ValueError(f"rule {item!r}: {kind!r} takes one value, a ratio (e.g. "
                             f"'{kind}:0.9') or a width (e.g. '{kind}:w4')")
        if args[0].startswith("w"):
            return {"kind": kind, "width": _number(args[0][1:], "width", item, True)}
        return {"kind": kind, "ratio": _number(args[0], "ratio", item)}
    if kind == "nm":
        if len(args) != 2:
            raise ValueError(f"rule {item!r}: 'nm' takes N and M, e.g. 'nm:2:4'")
        return {"kind": "nm", "n": _number(args[0], "N", item, True),
                "m": _number(args[1], "M", item, True)}
    if kind == "quantize":
        if len(args) != 1:
            raise ValueError(f"rule {item!r}: 'quantize' takes the bits, e.g. 'quantize:4'")
        return {"kind": "quantize", "bits": _number(args[0], "bits", item, True)}
    raise ValueError(f"rule {item!r}: unknown set {kind!r}; allowed: {', '.join(KINDS)}")


def _check_values(spec: dict, item: str):
    """The values of a parsed set, as the projections take them (a width >= 1 stands in
    for a ratio, resolved against the model at the start)."""
    body = {k: v for k, v in spec.items() if k not in ("kind", "width")}
    if "width" in spec:
        if spec["width"] < 1:
            raise ValueError(f"rule {item!r}: width={spec['width']} must be an integer >= 1")
        body["ratio"] = 0.0
    check_spec(spec["kind"], body, where=f"rule {item!r}: ")


def parse_rules(text: str) -> dict:
    """Rules text -> {pattern: spec} (a sparsity spec's ratio may be {'width': K})."""
    out = {}
    for item in comma_list(text):
        pattern, sep, body = item.partition("=")
        pattern = pattern.strip()
        if not sep or not pattern or not body.strip():
            raise ValueError(f"rule {item!r} is not 'layer=set', e.g. 'fc1=irregular:0.9'")
        if pattern in out:
            raise ValueError(f"rules {text!r} name layer pattern {pattern!r} twice")
        sets = [_parse_set(p, item) for p in body.split("+")]
        quant = [s for s in sets if s["kind"] == "quantize"]
        sparse = [s for s in sets if s["kind"] != "quantize"]
        if len(quant) > 1 or len(sparse) > 1:
            raise ValueError(f"rule {item!r}: at most one sparsity set and one quantize, "
                             f"e.g. 'irregular:0.9+quantize:4'")
        if quant and sparse:
            s = sparse[0]
            spec = {"kind": "quantize", "bits": quant[0]["bits"], "sparsity": s["kind"],
                    **{k: v for k, v in s.items() if k != "kind"}}
        else:
            spec = sets[0]
        _check_values(spec, item)
        out[pattern] = spec
    if not out:
        raise ValueError(f"rules {text!r} name no layer; e.g. 'conv*=filter:0.5,fc1=irregular:0.9'")
    return out


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule as an object: the leaves whose module or leaf path `pattern` globs go to a
    sparsity set, a quantization set, or both (the rules text ``pattern=set[+quantize:B]``).

    - `sparsity`: 'irregular' | 'filter' | 'column' | 'channel' with `ratio` in [0, 1) (the
      fraction of weights / output channels / rows of the (-1, out) view / input channels
      removed), or 'nm' with `n` of every `m` along the input channels (axis -2); None for
      quantization alone.
    - `bits`: quantize to alpha * {levels} (1 binary, 2 ternary, k-bit up to 16), the scale
      alpha refit per leaf; on the sparsity set's support when both are given.

    ``Rule("conv*", "filter", ratio=0.5)``, ``Rule("fc1", "irregular", ratio=0.9, bits=4)``,
    ``Rule("fc2", bits=2)``. Values are checked when matched against a params tree.
    """
    pattern: str
    sparsity: str | None = None
    ratio: float | None = None
    n: int | None = None
    m: int | None = None
    bits: int | None = None

    def spec(self) -> dict:
        """The projection spec ``{"kind": ..., **params}`` that `match_rules` takes."""
        if self.sparsity is None and self.bits is None:
            raise ValueError(f"Rule({self.pattern!r}) names no set: give `sparsity` (one of "
                             f"{', '.join(SPARSITY_KINDS)}) and/or `bits`")
        given = {k: getattr(self, k) for k in ("ratio", "n", "m")
                 if getattr(self, k) is not None}
        if self.bits is None:
            return {"kind": self.sparsity, **given}
        spec = {"kind": "quantize", "bits": self.bits, **given}
        if self.sparsity is not None:
            spec["sparsity"] = self.sparsity
        return spec


# What the public API accepts as rules: a rules text, `Rule`s, or {pattern: spec}.
Rules = Union[str, Sequence[Rule], Mapping[str, Mapping[str, Any]]]


def as_pattern_specs(rules: Rules) -> dict:
    """`rules` in any accepted form -> ``{pattern: spec}`` (not yet matched or checked
    against shapes). A width (``'irregular:w4'``) needs the project's model zoo at another
    width, so here it is an error: give a ratio."""
    if isinstance(rules, str):
        out = parse_rules(rules)
    elif isinstance(rules, Mapping):
        out = dict(rules)
    elif isinstance(rules, Sequence) and all(isinstance(r, Rule) for r in rules):
        out = {}
        for r in rules:
            if r.pattern in out:
                raise ValueError(f"rules name layer pattern {r.pattern!r} twice")
            out[r.pattern] = r.spec()
        if not out:
            raise ValueError("rules are empty; e.g. [Rule('fc1', 'irregular', ratio=0.9)]")
    else:
        raise ValueError(
            f"rules must be a rules text ('conv*=filter:0.5,fc1=irregular:0.9'), a list of "
            f"Rule or a dict {{pattern: spec}}; got {type(rules).__name__}: {rules!r}")
    for pattern, spec in out.items():
        if isinstance(spec, Mapping) and "width" in spec:
            raise ValueError(
                f"rule {pattern!r}: a width ('w{spec['width']}') is resolved against the "
                f"project's own models (train CLI); over your own params give a ratio, "
                f"e.g. '{spec.get('sparsity', spec['kind'])}:0.75'")
    return out


# --------------------------------------------------------------------------------------
# Matching over parameter pytrees
# --------------------------------------------------------------------------------------


def _key_str(k) -> str:
    tu = jax.tree_util
    if isinstance(k, tu.DictKey):
        return str(k.key)
    if isinstance(k, tu.GetAttrKey):
        return str(k.name)
    if isinstance(k, tu.SequenceKey):
        return str(k.idx)
    if isinstance(k, tu.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def leaf_path(keypath: Sequence[Any]) -> str:
    """``/``-joined string of a jax key path, e.g. ``block1/conv2/kernel``. The ``.value``
    attribute a Flax NNX Variable ends its key path with is left out, so the params of
    ``nnx.state(model, nnx.Param)`` and their pure form share paths (``conv1/kernel``)."""
    keypath = tuple(keypath)
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) \
            and keypath[-1].name == "value":
        keypath = keypath[:-1]
    return "/".join(_key_str(k) for k in keypath)


def leaves(tree) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(leaf_path(kp), leaf) for kp, leaf in flat]


# Which leaves rules may compress: a predicate of (leaf path, leaf) -> bool.
Predicate = Callable[[str, Any], bool]


def is_kernel(path: str, leaf) -> bool:
    """The default compressible leaves: named ``kernel`` (Flax's dense and conv weights,
    linen and NNX) with at least 2 dims. Biases, norm scales and embeddings are not."""
    return path.rsplit("/", 1)[-1] == "kernel" and len(np.shape(leaf)) >= 2


def kernel_entries(tree, is_compressible: Predicate | None = None) -> list[tuple[str, str, Any]]:
    """(leaf path, module path, leaf) for every compressible leaf (`is_kernel` unless
    `is_compressible` is given); the module path is the leaf path without its last name."""
    pred = is_kernel if is_compressible is None else is_compressible
    out = []
    for path, leaf in leaves(tree):
        if pred(path, leaf):
            out.append((path, path.rpartition("/")[0] or path, leaf))
    return out


def _pattern_matches(pattern: str, leaf: str, module: str) -> bool:
    return fnmatch.fnmatchcase(module, pattern) or fnmatch.fnmatchcase(leaf, pattern)


def select(entries, patterns: Sequence[str], what: str = "rule",
           others: Sequence[str] = (), leaf_kind: str = "kernel") -> dict[str, str]:
    """Map leaf path -> the one pattern matching it; error on double or no match (naming
    the pattern, the layers, the candidate leaf paths, and `others`: leaves a weight might
    hide in under another name)."""
    owner: dict[str, str] = {}
    used = {pat: False for pat in patterns}
    for path, module, _ in entries:
        for pat in patterns:
            if _pattern_matches(pat, path, module):
                if path in owner:
                    raise ValueError(
                        f"{leaf_kind} {path!r} is matched by two {what}s: {owner[path]!r} "
                        f"and {pat!r}")
                owner[path] = pat
                used[pat] = True
    unused = [pat for pat, u in used.items() if not u]
    if unused:
        layers = sorted({module for _, module, _ in entries})
        paths = sorted(path for path, _, _ in entries)
        note = ""
        if others:
            shown = sorted(others)[:20]
            more = f" and {len(others) - len(shown)} more" if len(others) > len(shown) else ""
            note = (f"; only leaves named 'kernel' (flax's nn.Dense and nn.Conv name their "
                    f"weights so) are compressible; other leaves: {shown}{more}")
        raise ValueError(
            f"{what} {unused[0]!r} matches no {leaf_kind} leaf; available layers: {layers} "
            f"(candidate leaf paths: {paths}){note}")
    return owner


def match_rules(params, rules: Mapping[str, Mapping[str, Any]],
                is_compressible: Predicate | None = None) -> dict[str, dict]:
    """Resolve ``{pattern: spec}`` rules against the compressible leaves of ``params``
    (`is_kernel`: the ``kernel`` leaves, or those `is_compressible(path, leaf)` accepts).

    A pattern (layer name or fnmatch glob) matches the ``/``-joined module path holding
    the kernel (``conv1``, ``fc*``, ``block*/conv2``) or the full leaf path
    (``conv1/kernel``).  Returns ``{leaf path: {"kind": ..., **params}}`` with validated,
    normalised specs.  Errors (ValueError) for malformed specs, a leaf matched by two
    patterns, or a pattern matching nothing (naming it and the candidate leaf paths).
    Pure Python: only shapes are inspected.
    """
    if not isinstance(rules, Mapping):
        raise ValueError(f"rules must be a mapping {{pattern: spec}}, got {type(rules).__name__}")
    checked = {}
    for pat, spec in rules.items():
        if not isinstance(pat, str):
            raise ValueError(f"rule pattern {pat!r} must be a string")
        if not isinstance(spec, Mapping) or "kind" not in spec:
            raise ValueError(
                f"rule {pat!r}: spec must be a dict with a 'kind' key, e.g. "
                "{'kind': 'irregular', 'ratio': 0.9}; got " + repr(spec)
            )
        kind = spec["kind"]
        body = {k: v for k, v in spec.items() if k != "kind"}
        checked[pat] = (kind, body, check_spec(kind, body, where=f"rule {pat!r}: "))
    entries = kernel_entries(params, is_compressible)
    # Leaves a user's layer may hold its weights in under another name (not biases or
    # BatchNorm scales): named when a pattern matches nothing.
    others = [] if is_compressible is not None else [
        path for path, _ in leaves(params)
        if path.rsplit("/", 1)[-1] not in ("kernel", "bias", "scale")]
    owner = select(entries, list(checked), others=others,
                   leaf_kind="kernel" if is_compressible is None else "compressible")
    out = {}
    for path, _, leaf in entries:
        if path in owner:
            pat = owner[path]
            kind, body, _ = checked[pat]
            shape = tuple(np.shape(leaf))
            norm = check_spec(kind, body, shape, where=f"rule {pat!r} on {path!r} (shape {shape}): ")
            out[path] = {"kind": kind, **norm}
    return out


def _spec_to_kwargs(spec: Mapping[str, Any]) -> dict:
    return {k: v for k, v in spec.items() if k != "kind"}


def project_tree(params, rules: Mapping[str, Mapping[str, Any]]):
    """Project every ``kernel`` leaf matched by ``rules``; returns ``(projected, masks)``.

    Both outputs have the structure of ``params`` (nested dict or FrozenDict); leaves
    without a rule pass through unchanged with an all-True mask.  Rules are resolved
    eagerly (errors before any compilation); jit by closing over ``rules``.
    """
    matched = match_rules(params, rules)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    projected, masks = [], []
    for kp, leaf in flat:
        path = leaf_path(kp)
        if path in matched:
            p, m = project_leaf(leaf, matched[path]["kind"], **_spec_to_kwargs(matched[path]))
        else:
            p, m = leaf, jnp.ones(np.shape(leaf), bool)
        projected.append(p)
        masks.append(m)
    return treedef.unflatten(projected), treedef.unflatten(masks)


# --------------------------------------------------------------------------------------
# Resolution: a rules text on a model
# --------------------------------------------------------------------------------------


def ratios_to_match(shapes_big, shapes_small, layers: Sequence[str] | None = None) -> dict[str, float]:
    """Per-layer prune ratios that shrink a wide model's kernels to a narrow model's size.

    ``shapes_big``/``shapes_small``: shape trees of the same model at two widths (e.g.
    from ``jax.eval_shape``; leaves need ``.shape`` or are arrays).  For every kernel
    selected by ``layers`` (patterns as in rules; None = all kernels) returns
    ``{module path: 1 - size_small / size_big}``, usable directly as rule patterns.
    """
    big = kernel_entries(shapes_big)
    small = {path: leaf for path, _, leaf in kernel_entries(shapes_small)}
    if layers is None:
        chosen = [path for path, _, _ in big]
    else:
        if isinstance(layers, str):
            layers = [layers]
        owner = select(big, list(layers), what="layer pattern")
        chosen = [path for path, _, _ in big if path in owner]
    modules = {path: module for path, module, _ in big}
    big_leaves = {path: leaf for path, _, leaf in big}
    out = {}
    for path in chosen:
        if path not in small:
            raise ValueError(f"kernel {path!r} of the big model is missing from the small model")
        nb = int(np.prod(np.shape(big_leaves[path]), dtype=np.int64))
        ns = int(np.prod(np.shape(small[path]), dtype=np.int64))
        if nb == 0 or ns > nb:
            raise ValueError(
                f"kernel {path!r}: small size {ns} must be <= big size {nb} (and big nonempty)"
            )
        out[modules[path]] = float(1.0 - ns / nb)
    return out



def _kernel_shapes(model_name: str, num_classes: int, width: int, input_shape):
    model = get_model(model_name, num_classes, width)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros(input_shape, jnp.float32))["params"]


def resolve_rules(text: str, params, model_cfg, num_classes: int, input_shape) -> dict:
    """{kernel leaf path: projection spec} of a rules text on `params` (shapes suffice).

    Errors name the rule: a malformed set, a pattern that matches no layer, a layer that two
    patterns match, a width not below the model's."""
    rules = parse_rules(text)
    # Every pattern must match, and no layer twice, before any width is expanded.
    match_rules(params, {p: {"kind": "irregular", "ratio": 0.0} for p in rules})
    expanded = {}
    for pattern, spec in rules.items():
        if "width" not in spec:
            expanded[pattern] = spec
            continue
        w = spec["width"]
        if not 0 < w < model_cfg.width:
            raise ValueError(f"rule {pattern!r}: width {w} must be in (0, model.width="
                             f"{model_cfg.width})")
        ratios = ratios_to_match(
            params, _kernel_shapes(model_cfg.name, num_classes, w, input_shape), [pattern])
        rest = {k: v for k, v in spec.items() if k != "width"}
        for module, ratio in ratios.items():
            expanded[module] = dict(rest, ratio=ratio)
    return match_rules(params, expanded)

