"""Export of a compressed model: an `.npz` of float32 arrays plus a JSON sidecar, enough to
rebuild the model without the workdir; for the LeNet family also a physically smaller
dense model (pruned units gone) whose outputs equal the masked model's.

Files, for an output path `PATH` (or `PATH.npz`):
  PATH.npz          every parameter and BatchNorm statistic, keyed by its '/'-joined path
                    ('params/conv1/kernel', 'batch_stats/bn1/mean'), float32
  PATH.json         the sidecar: model constructor, input, layouts, per-layer sparsity, bits
  PATH.small.npz    (filter / channel pruning, LeNets) the shrunk dense model, and
  PATH.small.json   its sidecar, with the shrink report
  PATH.onnx         with --onnx (the optional extra, robust_admm/onnx_export.py): the
  PATH.small.onnx   model (and the shrunk one) as ONNX, checked with onnxruntime

    python -m robust_admm.export --workdir runs/digits --stage retrain --out runs/digits/model \
        [--onnx]
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from robust_admm import checkpoint, logs, projections, recipe
from robust_admm.config_base import STAGES
from robust_admm.models import LeNet, get_model

FORMAT_VERSION = 1
COLLECTIONS = ("params", "batch_stats")
# dataset -> input (H, W, C) and number of classes (robust_admm.data loads these shapes)
INPUTS = {"mnist": ((28, 28, 1), 10), "digits": ((8, 8, 1), 10), "cifar10": ((32, 32, 3), 10),
          "cifar100": ((32, 32, 3), 100)}
LAYOUTS = {
    "input": "NHWC float32 pixels in [0, 1]; normalisation (if any) is inside the model",
    "conv_kernel": "(kh, kw, in, out)",
    "dense_kernel": "(in, out)",
    "flatten": "conv features flattened (h, w, c) row-major before the first dense layer",
    "batch_norm": "scale and bias under params/<bn>, mean and var under batch_stats/<bn>; "
                  "y = (x - mean) / sqrt(var + 1e-5) * scale + bias",
}
SHRINKABLE_KINDS = ("filter", "channel")


# ---------------------------------------------------------------------------------------
# .npz <-> nested trees


def _flat(tree, prefix: str) -> dict:
    """{'<prefix>/a/b': leaf} for every leaf of a nested dict."""
    return {f"{prefix}/{projections.leaf_path(kp)}": leaf
            for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def flatten_tree(tree, prefix: str) -> dict:
    """{'<prefix>/a/b': float32 array} for every leaf of a nested dict."""
    out = {}
    for key, leaf in _flat(tree, prefix).items():
        arr = np.asarray(leaf)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{key} has dtype {arr.dtype}; only floating-point leaves are "
                             "exported (float32)")
        out[key] = arr.astype(np.float32)
    return out


def unflatten(flat: dict) -> dict:
    """Inverse of `flatten_tree` over all prefixes: {'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
    tree = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def export_npz(params, batch_stats, path: str) -> dict:
    """Writes `params` and `batch_stats` (may be empty) to the .npz `path` (compressed: the
    zeros of a pruned model cost little); returns the flat dict written."""
    flat = {**flatten_tree(params, "params"), **flatten_tree(batch_stats or {}, "batch_stats")}
    np.savez_compressed(path, **flat)
    return flat


def load_npz(path: str) -> dict:
    """{'params': tree, 'batch_stats': tree ({} if none)} from an `export_npz` file."""
    with np.load(path, allow_pickle=False) as f:
        flat = {k: f[k] for k in f.files}
    bad = sorted(k for k in flat if k.split("/")[0] not in COLLECTIONS)
    if bad:
        raise ValueError(f"{path}: keys {bad[:5]} are not under {list(COLLECTIONS)}")
    tree = unflatten(flat)
    return {c: tree.get(c, {}) for c in COLLECTIONS}


# ---------------------------------------------------------------------------------------
# Sidecar and the full export


def output_paths(path: str) -> dict:
    """The four file names for `path` (a trailing '.npz' is dropped to get the stem)."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"export path={path!r}: must be a non-empty file path, e.g. "
                         "'runs/mnist/model' or 'runs/mnist/model.npz'")
    stem = path[:-4] if path.endswith(".npz") else path
    if os.path.isdir(path) or os.path.isdir(stem) or not os.path.basename(stem):
        raise ValueError(f"export path={path!r} is a folder; give a file path inside it, "
                         f"e.g. {os.path.join(stem.rstrip('/') or '.', 'model')!r}")
    return {"npz": stem + ".npz", "json": stem + ".json",
            "small_npz": stem + ".small.npz", "small_json": stem + ".small.json"}


def param_count(params) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def describe(params, masks=None, specs=None) -> dict:
    """Per-layer nonzeros/sparsity (from `masks` if given) with the bits per stored weight
    of the layer's spec (32 without one), parameter count, compression rate and storage
    sizes (`projections` helpers)."""
    layers = projections.sparsity_report(params, masks)
    size = projections.model_size(params, specs)
    for name, entry in layers.items():
        entry["bits"] = size["layers"][name]["bits"]
    return {"param_count": param_count(params), "layers": layers,
            "compression_rate": projections.compression_rate(params, masks=masks),
            "stored_bytes": projections.storage_bytes(params, masks), "size": size}


def _input_spec(dataset: str) -> dict:
    if dataset not in INPUTS:
        raise ValueError(f"data.name={dataset!r} has no known input shape; allowed: "
                         f"{sorted(INPUTS)}")
    shape, _ = INPUTS[dataset]
    return {"shape": [1, *shape], "layout": "NHWC", "dtype": "float32", "range": [0.0, 1.0],
            "normalisation": "inside the model (feed raw pixels scaled to [0, 1])",
            "dataset": dataset}


def _write_onnx(model, variables: dict, input_shape, npz_path: str) -> dict:
    """The ONNX file beside `npz_path`; a graph onnxruntime refuses or computes differently
    is reported (sidecar: written False and why), the other files stand."""
    from robust_admm import onnx_export
    try:
        return {"written": True, **onnx_export.write_onnx(
            model, variables, input_shape, npz_path[:-len(".npz")] + ".onnx")}
    except ValueError as e:
        return {"written": False, "reason": str(e)}


def export_state(config: dict, state: dict, path: str, source: dict | None = None,
                 specs: dict | None = None, onnx: bool = False) -> dict:
    """Writes the model in `state` (a finished stage: params, batch_stats, masks) described
    by the run `config` (config.json as a dict) to `path`, the bit widths from `specs` (the
    phase's `recipe.finished_phase_specs`); returns the sidecar. With filter
    or channel pruning of a LeNet it also writes the shrunk model (`shrink`); for models
    `shrink` does not handle, the sidecar says why none was written. With `onnx`, also
    PATH.onnx (and PATH.small.onnx) through the optional extra."""
    files = output_paths(path)
    if onnx:
        from robust_admm import onnx_export
        onnx_export.check_installed()  # before any file is written
    model_cfg, prune = config["model"], config.get("prune", {})
    dataset = config["data"]["name"]
    inp = _input_spec(dataset)
    num_classes = INPUTS[dataset][1]
    model = get_model(model_cfg["name"], num_classes, model_cfg["width"])
    params, batch_stats = state["params"], state.get("batch_stats") or {}
    masks = state.get("masks") or None
    os.makedirs(os.path.dirname(os.path.abspath(files["npz"])), exist_ok=True)
    export_npz(params, batch_stats, files["npz"])
    sidecar = {
        "format_version": FORMAT_VERSION,
        "model": {"name": model_cfg["name"], "num_classes": num_classes,
                  "width": model_cfg["width"], "builder": "robust_admm.models.get_model"},
        "input": inp, "layouts": LAYOUTS, "weights_file": os.path.basename(files["npz"]),
        "prune": {k: prune.get(k) for k in ("kind", "ratios", "to_width") if k in prune},
        "specs": specs or {},  # leaf path -> the compression set the weights lie on
        **describe(params, masks, specs), "source": source or {},
    }
    if prune.get("kind") in SHRINKABLE_KINDS:
        try:
            small, small_vars, rep = shrink(model, params, batch_stats, masks)
        except NotImplementedError as e:
            sidecar["small_model"] = {"written": False, "reason": str(e)}
        else:
            export_npz(small_vars["params"], {}, files["small_npz"])
            small_onnx = (_write_onnx(small, small_vars, inp["shape"], files["small_npz"])
                          if onnx else None)
            small_side = {
                "format_version": FORMAT_VERSION,
                "model": {"class": "robust_admm.models.LeNet", "args": lenet_args(small),
                          "shrunk_from": sidecar["model"]},
                "input": inp, "layouts": LAYOUTS,
                "weights_file": os.path.basename(files["small_npz"]),
                **describe(small_vars["params"]), "shrink": rep, "source": source or {},
                **({"onnx": small_onnx} if small_onnx else {})}
            logs.write_json(files["small_json"], small_side)
            sidecar["small_model"] = {"written": True, "weights_file": os.path.basename(
                files["small_npz"]), "sidecar": os.path.basename(files["small_json"]),
                "param_count": rep["params_after"], "shrink": rep,
                **({"onnx": small_onnx} if small_onnx else {})}
    if onnx:
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        sidecar["onnx"] = _write_onnx(model, variables, inp["shape"], files["npz"])
    sidecar = logs.to_python(sidecar)
    logs.write_json(files["json"], sidecar)
    return sidecar


def write_export(workdir: str, stage: str, path: str, onnx: bool = False) -> dict:
    """Exports the final state of the finished `stage` in `workdir` (see `export_state`)."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: workdir={workdir!r} is not a "
                                "training run's folder")
    output_paths(path)  # a bad path fails before the checkpoint is read
    with open(cfg_path, encoding="utf-8") as f:
        config = recipe.upgrade_config_dict(json.load(f))
    names = [p.name for p in recipe.parse_program(ml_collections.ConfigDict(config))]
    if stage not in names:
        raise ValueError(f"stage={stage!r} is not a phase of this run; allowed: {names}")
    state = checkpoint.load_final_state(workdir, stage)
    shape, num_classes = INPUTS[config["data"]["name"]]
    specs = recipe.finished_phase_specs(ml_collections.ConfigDict(config), stage,
                                        state["params"], num_classes, (1, *shape))
    return export_state(config, state, path,
                        source={"workdir": os.path.abspath(workdir), "stage": stage}, specs=specs,
                        onnx=onnx)


def _shapes(variables) -> dict:
    return {k: tuple(np.shape(v)) for c in COLLECTIONS
            for k, v in _flat(variables.get(c, {}), c).items()}


def rebuild(npz_path: str, sidecar_path: str):
    """(model, variables) from the exported files alone; the arrays are checked against the
    shapes the model's constructor gives."""
    with open(sidecar_path, encoding="utf-8") as f:
        side = json.load(f)
    if side.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{sidecar_path}: format_version={side.get('format_version')!r}; "
                         f"this code reads {FORMAT_VERSION}")
    m = side["model"]
    if "class" in m:
        if m["class"] != "robust_admm.models.LeNet":
            raise ValueError(f"{sidecar_path}: model class {m['class']!r}; allowed: "
                             "'robust_admm.models.LeNet'")
        a = m["args"]
        model = LeNet(features=tuple(a["features"]), hidden=a["hidden"],
                      num_classes=a["num_classes"], kernel_size=a["kernel_size"],
                      padding=a["padding"])
    else:
        model = get_model(m["name"], m["num_classes"], m["width"])
    loaded = load_npz(npz_path)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros(side["input"]["shape"], jnp.float32))
    want, got = _shapes(shapes), _shapes(loaded)
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:6]
        raise ValueError(f"{npz_path} does not fit the model in {sidecar_path}: differing "
                         f"(name, shape) entries {diff}")
    variables = {"params": jax.tree_util.tree_map(jnp.asarray, loaded["params"])}
    if loaded["batch_stats"]:
        variables["batch_stats"] = jax.tree_util.tree_map(jnp.asarray, loaded["batch_stats"])
    return model, variables


# ---------------------------------------------------------------------------------------
# Shrinking: a smaller dense LeNet whose outputs equal the masked model's


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--stage", default="retrain", help="a phase of the run's program, e.g. "
                    f"{', '.join(STAGES)}")
    ap.add_argument("--out", required=True, help="output path (stem or .npz)")
    ap.add_argument("--onnx", action="store_true", help="also write PATH.onnx, checked with "
                    "onnxruntime (optional extra: pip install -e '.[onnx]')")
    args = ap.parse_args(argv)
    try:
        side = write_export(args.workdir, args.stage, args.out, onnx=args.onnx)
    except (ValueError, FileNotFoundError, NotImplementedError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = output_paths(args.out)
    print(f"wrote {files['npz']} and {files['json']}: {side['param_count']} parameters, "
          f"compression rate {side['compression_rate']:.2f}")
    small = side.get("small_model")
    if small and small["written"]:
        print(f"wrote {files['small_npz']}: shrunk model with {small['param_count']} "
              "parameters")
    elif small:
        print(f"no shrunk model: {small['reason']}")
    for label, entry in (("", side.get("onnx")), ("shrunk model's ", (small or {}).get("onnx"))):
        if entry and entry["written"]:
            print(f"wrote the {label}ONNX file {entry['file']}: onnxruntime's logits within "
                  f"{entry['max_abs_logit_diff']:.2g} of JAX's")
        elif entry:
            print(f"no {label}ONNX file: {entry['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
