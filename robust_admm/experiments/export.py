"""Export of a compressed model: an `.npz` of float32 arrays plus a JSON sidecar, enough to
rebuild the model without the workdir; for the LeNet family also a physically smaller
dense model (pruned units gone) whose outputs equal the masked model's.

Files, for an output path `PATH` (or `PATH.npz`):
  PATH.npz          every parameter and BatchNorm statistic, keyed by its '/'-joined path
                    ('params/conv1/kernel', 'batch_stats/bn1/mean'), float32
  PATH.json         the sidecar: model constructor, input, layouts, per-layer sparsity, bits
  PATH.small.npz    (filter / channel pruning, LeNets) the shrunk dense model, and
  PATH.small.json   its sidecar, with the shrink report
  PATH.onnx         with --onnx (the optional extra, experiments/onnx_export.py): the
  PATH.small.onnx   model (and the shrunk one) as ONNX, checked with onnxruntime

The shrinking itself is `experiments/shrink.py`'s; `robust_admm.export` is the command.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from robust_admm.compression import size as size_lib
from robust_admm.compression.rules import leaf_path
from robust_admm.data import DataError, input_shape
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.shrink import lenet_args, shrink
from robust_admm.models import LeNet, get_model, init_variables
from robust_admm.runtime import logs
from robust_admm.training.program import finished_phase_specs, parse_program

FORMAT_VERSION = 1
COLLECTIONS = ("params", "batch_stats")
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
    return {f"{prefix}/{leaf_path(kp)}": leaf
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


def describe(params, masks=None, specs=None) -> dict:
    """Per-layer nonzeros/sparsity (from `masks` if given) with the bits per stored weight
    of the layer's spec (32 without one), parameter count, compression rate and storage
    sizes (`compression/size.py`)."""
    layers = size_lib.sparsity_report(params, masks)
    size = size_lib.model_size(params, specs)
    for name, entry in layers.items():
        entry["bits"] = size["layers"][name]["bits"]
    return {"param_count": size_lib.param_count(params), "layers": layers,
            "compression_rate": size_lib.compression_rate(params, masks=masks),
            "stored_bytes": size_lib.storage_bytes(params, masks), "size": size}


def _data_shape(data_cfg: dict) -> tuple:
    """((H, W, C), classes) of a run's data (an npz file is read for them)."""
    dataset = data_cfg["name"]
    try:
        return input_shape(dataset, data_cfg.get("source", "tfds"), data_cfg.get("dir") or None)
    except DataError as e:
        raise ValueError(f"data.name={dataset!r}: {e}") from None


def _input_spec(dataset: str, shape) -> dict:
    return {"shape": [1, *shape], "layout": "NHWC", "dtype": "float32", "range": [0.0, 1.0],
            "normalisation": "inside the model (feed raw pixels scaled to [0, 1])",
            "dataset": dataset}


def _write_onnx(model, variables: dict, input_shape, npz_path: str) -> dict:
    """The ONNX file beside `npz_path`; a graph onnxruntime refuses or computes differently
    is reported (sidecar: written False and why), the other files stand."""
    from robust_admm.experiments import onnx_export
    try:
        return {"written": True, **onnx_export.write_onnx(
            model, variables, input_shape, npz_path[:-len(".npz")] + ".onnx")}
    except ValueError as e:
        return {"written": False, "reason": str(e)}


def export_state(config: dict, state: dict, path: str, source: dict | None = None,
                 specs: dict | None = None, onnx: bool = False) -> dict:
    """Writes the model in `state` (a finished stage: params, batch_stats, masks) described
    by the run `config` (config.json as a dict) to `path`, the bit widths from `specs` (the
    phase's `program.finished_phase_specs`); returns the sidecar. With filter
    or channel pruning of a LeNet it also writes the shrunk model (`shrink`); for models
    `shrink` does not handle, the sidecar says why none was written. With `onnx`, also
    PATH.onnx (and PATH.small.onnx) through the optional extra."""
    files = output_paths(path)
    if onnx:
        from robust_admm.experiments import onnx_export
        onnx_export.check_installed()  # before any file is written
    model_cfg, prune = config["model"], config.get("prune", {})
    dataset = config["data"]["name"]
    shape, num_classes = _data_shape(config["data"])
    inp = _input_spec(dataset, shape)
    normalize = model_cfg.get("normalize", "none")  # absent: written before the field
    kwargs = model_cfg.get("kwargs", "")  # absent: written before the field
    model = get_model(model_cfg["name"], num_classes, model_cfg["width"], normalize=normalize,
                      kwargs=kwargs)
    params, batch_stats = state["params"], state.get("batch_stats") or {}
    masks = state.get("masks") or None
    os.makedirs(os.path.dirname(os.path.abspath(files["npz"])), exist_ok=True)
    export_npz(params, batch_stats, files["npz"])
    sidecar = {
        "format_version": FORMAT_VERSION,
        "model": {"name": model_cfg["name"], "num_classes": num_classes,
                  "width": model_cfg["width"], "normalize": normalize,
                  **({"kwargs": kwargs} if kwargs else {}),
                  "builder": "robust_admm.models.get_model"},
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
    config = workdir_lib.read_config_dict(workdir)
    if config is None:
        raise FileNotFoundError(f"{workdir_lib.config_path(workdir)} not found: "
                                f"workdir={workdir!r} is not a training run's folder")
    output_paths(path)  # a bad path fails before the checkpoint is read
    names = [p.name for p in parse_program(ml_collections.ConfigDict(config))]
    if stage not in names:
        raise ValueError(f"stage={stage!r} is not a phase of this run; allowed: {names}")
    state = workdir_lib.load_final_state(workdir, stage)
    shape, num_classes = _data_shape(config["data"])
    specs = finished_phase_specs(ml_collections.ConfigDict(config), stage,
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
        model = get_model(m["name"], m["num_classes"], m["width"],
                          normalize=m.get("normalize", "none"), kwargs=m.get("kwargs", ""))
    loaded = load_npz(npz_path)
    shapes = jax.eval_shape(lambda k, x: init_variables(model, k, x), jax.random.PRNGKey(0),
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
