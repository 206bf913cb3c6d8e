"""What a compressed model takes: per-layer sparsity, compression rates and stored bytes
(numpy, eager, JSON-serialisable results), for summaries, evaluations and exports."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from robust_admm.compression.projections import MAX_BITS, is_int
from robust_admm.compression.rules import kernel_entries, leaves, match_rules


def _nonzero(leaf, mask) -> np.ndarray:
    if mask is not None:
        return np.asarray(mask).astype(bool)
    return np.asarray(leaf) != 0


def _mask_lookup(masks) -> dict[str, Any]:
    return {} if masks is None else dict(leaves(masks))


def param_count(params) -> int:
    """The number of entries of every leaf of `params`."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def sparsity_report(params, masks=None) -> dict[str, dict]:
    """Per-layer sparsity of the ``kernel`` leaves, keyed by module path.

    An entry counts as nonzero where ``masks`` (same structure as params) is True, or
    where the weight is nonzero when ``masks`` is None.  Each layer reports ``shape``,
    ``size``, ``nonzero``, ``sparsity`` (fraction of zeros) and, for 2-D/4-D kernels,
    ``filters``/``zero_filters`` (output channels), ``columns``/``zero_columns`` (rows of
    the (-1, out) view) and ``channels``/``zero_channels`` (input channels, axis -2).
    """
    lookup = _mask_lookup(masks)
    report = {}
    for path, module, leaf in kernel_entries(params):
        nz = _nonzero(leaf, lookup.get(path) if masks is not None else None)
        shape = tuple(np.shape(leaf))
        size = int(np.prod(shape, dtype=np.int64))
        nnz = int(nz.sum())
        entry = {
            "shape": list(shape),
            "size": size,
            "nonzero": nnz,
            "sparsity": (size - nnz) / size if size else 0.0,
        }
        if len(shape) in (2, 4):
            view = nz.reshape(-1, shape[-1])
            chan = np.moveaxis(nz, -2, 0).reshape(shape[-2], -1)
            entry.update(
                filters=int(shape[-1]),
                zero_filters=int((~view.any(axis=0)).sum()),
                columns=int(view.shape[0]),
                zero_columns=int((~view.any(axis=1)).sum()),
                channels=int(shape[-2]),
                zero_channels=int((~chan.any(axis=1)).sum()),
            )
        report[module] = entry
    return report


def compression_rate(params, rules=None, masks=None) -> float:
    """Total / nonzero number of weights.

    With ``rules=None`` over all leaves (kernels, biases, norm parameters); with rules,
    only over the kernels they match (the pruned-layers-only rate).  Nonzeros come from
    ``masks`` if given, else from the values.  Returns ``inf`` if everything is zero.
    """
    selected = None if rules is None else set(match_rules(params, rules))
    lookup = _mask_lookup(masks)
    total = nnz = 0
    for path, leaf in leaves(params):
        if selected is not None and path not in selected:
            continue
        nz = _nonzero(leaf, lookup.get(path) if masks is not None else None)
        total += int(nz.size)
        nnz += int(nz.sum())
    return float(total) / nnz if nnz else float("inf")


def storage_bytes(params, masks=None, bits: int | None = None) -> dict[str, int]:
    """Bytes to store every leaf of ``params`` (an array or a pytree) in several formats.

    Per leaf with ``size`` entries, ``nnz`` nonzeros (from ``masks`` or the values) and
    the ``(rows, out)`` view ``reshape(-1, shape[-1])``; results summed over leaves:

    * ``dense``:  4 * size (float32);
    * ``bitmask``: ceil(size / 8) + 4 * nnz (1 bit per entry + float32 nonzeros);
    * ``csr``: 4 * nnz values + 4 * nnz int32 column indices + 4 * (rows + 1) row pointers;
    * with ``bits``: ``quantized`` = ceil(size * bits / 8) + 4 (b-bit code for every
      entry + one float32 scale per leaf) and ``quantized_sparse`` = ceil(size / 8) +
      ceil(nnz * bits / 8) + 4 (bitmask + codes of the nonzeros + scale).
    """
    if bits is not None and (not is_int(bits) or not 1 <= bits <= MAX_BITS):
        raise ValueError(f"bits={bits!r} is not allowed: bits must be an integer in [1, {MAX_BITS}]")
    lookup = _mask_lookup(masks)
    out = {"dense": 0, "bitmask": 0, "csr": 0}
    if bits is not None:
        out.update(quantized=0, quantized_sparse=0)
    for path, leaf in leaves(params):
        nz = _nonzero(leaf, lookup.get(path) if masks is not None else None)
        shape = nz.shape
        size = int(nz.size)
        nnz = int(nz.sum())
        rows = size // shape[-1] if len(shape) and shape[-1] else 1
        out["dense"] += 4 * size
        out["bitmask"] += -(-size // 8) + 4 * nnz
        out["csr"] += 8 * nnz + 4 * (rows + 1)
        if bits is not None:
            out["quantized"] += -(-size * bits // 8) + 4
            out["quantized_sparse"] += -(-size // 8) + -(-nnz * bits // 8) + 4
    return out


def leaf_size(leaf, spec: Mapping[str, Any] | None = None) -> dict:
    """How one leaf is stored: ``size``, ``nonzero`` (counted from the values), ``bits``
    (a ``quantize`` spec's, else 32), ``format`` and ``bytes`` (as `model_size` says),
    ``dense_bytes`` (4 per entry) and ``compressed`` (whether a spec is given)."""
    w = np.asarray(leaf)
    size, nnz = int(w.size), int(np.count_nonzero(w))
    if spec is None:
        nbytes, bits, fmt = 4 * size, 32, "dense"
    else:
        bits = int(spec["bits"]) if spec["kind"] == "quantize" else 32
        scale = 4 if spec["kind"] == "quantize" else 0
        formats = {"dense": -(-size * bits // 8) + scale,
                   "bitmask": -(-size // 8) + -(-nnz * bits // 8) + scale}
        fmt = min(formats, key=formats.get)
        nbytes = formats[fmt]
    return {"size": size, "nonzero": nnz, "bits": bits, "format": fmt, "bytes": nbytes,
            "dense_bytes": 4 * size, "compressed": spec is not None}


def _total(entries) -> dict:
    total = {"size": 0, "nonzero": 0, "bytes": 0, "dense_bytes": 0}
    for e in entries:
        for k in total:
            total[k] += e[k]
    inf = float("inf")
    total["rate_by_nonzeros"] = total["size"] / total["nonzero"] if total["nonzero"] else inf
    total["rate_by_bytes"] = total["dense_bytes"] / total["bytes"] if total["bytes"] else inf
    return total


def model_size(params, specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """What the compressed model takes to store, per kernel layer and in total.

    ``specs`` (``{leaf path: spec}``, as ``match_rules`` returns) give each compressed
    kernel's bits (a ``quantize`` spec's, else 32); nonzeros are counted from the values.
    A compressed kernel is stored in the smaller of two formats: ``dense`` (every entry's
    code: ceil(size * bits / 8) bytes) and ``bitmask`` (one bit per entry saying whether it
    is nonzero, then the nonzeros' codes: ceil(size / 8) + ceil(nnz * bits / 8)); a
    quantized kernel adds its float32 scale (4 bytes). Every other parameter (biases, norm
    scales, kernels without a rule) is dense float32. ``dense_bytes`` is 4 bytes per
    parameter. BatchNorm running statistics are not parameters and are not counted.
    """
    specs = dict(specs or {})
    layers, entries = {}, []
    for path, leaf in leaves(params):
        spec = specs.get(path)
        entry = leaf_size(leaf, spec)
        entries.append(entry)
        if path.endswith("/kernel") or spec is not None:
            layers[path.rsplit("/", 1)[0]] = entry
    return {"layers": layers, "total": _total(entries)}


def leaf_sizes(params, specs: Mapping[str, Mapping[str, Any]] | None = None) -> dict:
    """`model_size` keyed by leaf path, every leaf listed: ``{"leaves": {path:
    leaf_size}, "total": ...}`` (for any params tree, where two compressed leaves may
    share a module)."""
    specs = dict(specs or {})
    out = {path: leaf_size(leaf, specs.get(path)) for path, leaf in leaves(params)}
    return {"leaves": out, "total": _total(out.values())}
