"""Shrinking a pruned LeNet: a smaller dense model, the pruned units gone, whose outputs
equal the masked model's (for filter and channel pruning; `shrink` says which units go)."""
import jax
import numpy as np

from robust_admm.compression.size import param_count
from robust_admm.models import LeNet


def lenet_args(model: LeNet) -> dict:
    return {"features": list(model.features), "hidden": model.hidden,
            "num_classes": model.num_classes, "kernel_size": model.kernel_size,
            "padding": model.padding}


def _consumer_slices(kernel: np.ndarray, kind: str, units: int):
    """The consumer kernel's input slice of each producer unit, stacked: (units, ..., out)."""
    if kind == "conv":
        return np.moveaxis(kernel, 2, 0)
    if kind == "flatten":  # rows (h, w, c) row-major: unit c owns rows c, c + C, ...
        return np.moveaxis(kernel.reshape(-1, units, kernel.shape[-1]), 1, 0)
    return kernel  # dense: row u


def _keep_inputs(kernel: np.ndarray, kind: str, units: int, keep: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return kernel[:, :, keep, :]
    if kind == "flatten":
        return kernel.reshape(-1, units, kernel.shape[-1])[:, keep, :].reshape(
            -1, kernel.shape[-1])
    return kernel[keep]


def shrink(model, params, batch_stats=None, masks=None):
    """A smaller dense LeNet equal in outputs (up to float rounding) to `model` with the
    masked `params`: returns (small_model, {'params': ...}, report).

    Each output unit (conv filter, fc1 unit) of a layer is removed when that is exact:
    * its consumer's input slice is all zero (channel pruning): it is never read;
    * its kernel is all zero (filter pruning) so its output is the constant relu(bias)
      (max-pooling keeps it constant): dropped if that is 0, else folded into the
      consumer's bias where the consumer sums the constant the same at every position
      (dense layers, including after the flatten; VALID convolutions). A constant channel
      into a zero-padded ('SAME') convolution contributes differently near the border:
      such units are kept and listed under `kept_constant`.
    A layer keeps at least one unit. The image's channels (conv1's inputs) are never
    removed, and fc2's outputs (the classes) neither.
    Raises NotImplementedError for models other than LeNet (VGG-16, ResNet-18: BatchNorm
    and the residual connections are not handled).
    """
    if not isinstance(model, LeNet):
        raise NotImplementedError(
            f"shrink handles the LeNet family (lenet_adv, lenet5, lenet_digits), not "
            f"{type(model).__name__}: pruned filters of VGG-16 / ResNet-18 (BatchNorm, "
            "residual connections) are not removed; export the masked model instead")
    if batch_stats:
        raise ValueError("LeNet has no BatchNorm statistics, got batch_stats="
                         f"{list(batch_stats)}")
    if masks is not None:
        params = jax.tree_util.tree_map(lambda w, m: np.asarray(w) * np.asarray(m), params,
                                        masks)
    names = [f"conv{i}" for i in range(1, len(model.features) + 1)] + ["fc1", "fc2"]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params lack layers {missing}; a LeNet has {names}")
    p = {n: {k: np.array(params[n][k], np.float32) for k in ("kernel", "bias")}
         for n in names}
    before = param_count(p)
    layers, notes = {}, []
    for i, name in enumerate(names[:-1]):
        nxt = names[i + 1]
        units = p[name]["kernel"].shape[-1]
        kind = "conv" if nxt.startswith("conv") else (
            "flatten" if name.startswith("conv") else "dense")
        foldable = kind != "conv" or model.padding == "VALID"
        slices = _consumer_slices(p[nxt]["kernel"], kind, units)
        unused = ~slices.reshape(units, -1).any(axis=1)
        constant = ~p[name]["kernel"].reshape(-1, units).any(axis=0)
        value = np.maximum(p[name]["bias"], 0.0)  # relu(bias), the constant output
        remove = unused | (constant & ((value == 0) | foldable))
        kept_constant = np.flatnonzero(constant & ~remove)
        if remove.all():
            remove[0] = False  # keep one unit (no zero-width layers)
        fold = remove & ~unused & (value != 0)
        if fold.any():
            contrib = slices[fold].reshape(int(fold.sum()), -1, slices.shape[-1]).sum(axis=1)
            p[nxt]["bias"] = p[nxt]["bias"] + value[fold] @ contrib
        keep = ~remove
        p[name] = {"kernel": p[name]["kernel"][..., keep], "bias": p[name]["bias"][keep]}
        p[nxt]["kernel"] = _keep_inputs(p[nxt]["kernel"], kind, units, keep)
        layers[name] = {"units": units, "kept": int(keep.sum()), "removed": int(remove.sum()),
                        "removed_unused": int((remove & unused).sum()),
                        "removed_constant": int((remove & ~unused).sum()),
                        "folded_into_next_bias": int(fold.sum()),
                        "kept_constant": kept_constant.tolist()}
        if len(kept_constant):
            notes.append(
                f"{name}: units {kept_constant.tolist()} have all-zero kernels but a "
                f"positive bias; their constant output enters {nxt}, a zero-padded "
                f"({model.padding!r}) convolution, where it is not the same at every "
                "position, so it cannot be folded into a bias exactly: kept")
    small = LeNet(features=tuple(p[n]["kernel"].shape[-1] for n in names[:-2]),
                  hidden=p["fc1"]["kernel"].shape[-1], num_classes=model.num_classes,
                  kernel_size=model.kernel_size, padding=model.padding)
    rep = {"model": "LeNet", "params_before": before, "params_after": param_count(p),
           "args_after": lenet_args(small), "layers": layers, "notes": notes}
    return small, {"params": p}, rep
