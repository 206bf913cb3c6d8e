"""Starting from torchvision's or timm's ImageNet weights: a checkpoint saved as
safetensors (a flat {name: array} dict in PyTorch's names and layouts) mapped by name onto
a model's (params, batch_stats), every name and shape checked.

Layouts: a PyTorch conv weight is (out, in, kh, kw), ours (kh, kw, in, out); a linear
weight (out, in), ours (in, out); BatchNorm's weight, bias, running_mean and running_var
are our `scale`, `bias` (params) and `mean`, `var` (batch_stats); `num_batches_tracked`
(a step counter) is ignored.

Names:
- imagenet_resnet18, imagenet_resnet50: torchvision's and timm's resnet18 / resnet50 (the
  two libraries use the same names): `layer2.0.conv1` is our `layer2_0/conv1`,
  `layer2.0.downsample.0` our `layer2_0/downsample_conv`, `.downsample.1` our
  `downsample_bn`; `conv1`, `bn1`, `fc` keep their names.
- imagenet_vgg16_bn: `features.{i}` is our conv1..conv13 in order, each conv's BatchNorm at
  `features.{i+1}` (bn1..bn13); torchvision's `classifier.0`, `.3`, `.6` are our fc1, fc2,
  fc3 (fc1 reads the features flattened channel-first, as torchvision flattens). timm's
  vgg16_bn keeps `features` and names the classifier `pre_logits.fc1` (a 7x7 convolution
  over the 512 x 7 x 7 features: the same weights, reshaped), `pre_logits.fc2` (1x1) and
  `head.fc`; a checkpoint with `pre_logits.*` or `head.*` names is read as timm's.

The classifier (HEADS) is mapped like any layer (`head='keep'`): a checkpoint with another
class count than the model is refused, saying so. `head='new'` leaves the model's own
freshly drawn classifier and ignores the checkpoint's.
"""
import os
import re
from dataclasses import dataclass

import numpy as np

# model name -> our module of the classifier (the layer whose rows are the classes).
HEADS = {
    "imagenet_resnet18": "fc",
    "imagenet_resnet50": "fc",
    "imagenet_vgg16_bn": "fc3",
}
MAPPED_MODELS = tuple(HEADS)
HEAD_MODES = ("keep", "new")  # init.pretrained_head
FORMATS = ("torchvision", "timm")  # the names a checkpoint may use

# VGG-16 (configuration D): conv widths, 'M' a max-pool; with BatchNorm each conv takes
# three `features` entries (conv, BatchNorm, ReLU) and each pool one.
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M")
_BN_SUFFIXES = {"weight": "scale", "bias": "bias"}
_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_IGNORED = "num_batches_tracked"


def _vgg_conv_indices(cfg=_VGG16) -> list:
    """The `features` index of each conv of a VGG with BatchNorm, in order."""
    out, i = [], 0
    for v in cfg:
        if v == "M":
            i += 1
        else:
            out.append(i)
            i += 3
    return out


@dataclass(frozen=True)
class _Tensor:
    """One checkpoint tensor: its PyTorch name, and where and how it lands in our tree.
    `kind`: 'conv' (OIHW <-> HWIO), 'dense' ((out, in) <-> (in, out)), 'vector' (as is),
    or 'conv_dense' (a PyTorch conv of `spatial` (kh, kw) over the flattened input of our
    dense layer: (out, in / (kh kw), kh, kw) <-> (in, out))."""
    torch: str
    collection: str  # 'params' | 'batch_stats'
    path: tuple
    kind: str
    spatial: tuple = (1, 1)

    def torch_shape(self, ours: tuple) -> tuple:
        if self.kind == "conv":
            return (ours[3], ours[2], ours[0], ours[1])
        if self.kind == "dense":
            return (ours[1], ours[0])
        if self.kind == "conv_dense":
            kh, kw = self.spatial
            return (ours[1], ours[0] // (kh * kw), kh, kw)
        return tuple(ours)

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return w.transpose(2, 3, 1, 0)
        if self.kind == "dense":
            return w.T
        if self.kind == "conv_dense":
            return w.reshape(w.shape[0], -1).T
        return w

    def to_torch(self, k: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return k.transpose(3, 2, 0, 1)
        if self.kind == "dense":
            return k.T
        if self.kind == "conv_dense":
            return k.T.reshape(self.torch_shape(k.shape))
        return k


def _resnet_module(path: tuple, flavour: str):
    """(PyTorch module name, None) of our ResNet module (the same in both libraries)."""
    parts = []
    for p in path:
        block = re.fullmatch(r"layer(\d+)_(\d+)", p)
        parts.append(f"layer{block.group(1)}.{block.group(2)}" if block else
                     {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(p, p))
    return ".".join(parts), None


def _vgg_module(path: tuple, flavour: str):
    """(PyTorch module name, None or the (kh, kw) of timm's conv form) of our VGG module."""
    convs = _vgg_conv_indices()
    m = re.fullmatch(r"(conv|bn|fc)(\d+)", path[0]) if len(path) == 1 else None
    if m is None:
        return None, None
    kind, i = m.group(1), int(m.group(2))
    if kind in ("conv", "bn") and 1 <= i <= len(convs):
        return f"features.{convs[i - 1] + (kind == 'bn')}", None
    if kind == "fc" and 1 <= i <= 3:
        if flavour == "timm":
            return ("pre_logits.fc1", (7, 7)) if i == 1 else (
                ("pre_logits.fc2", (1, 1)) if i == 2 else ("head.fc", None))
        return f"classifier.{3 * (i - 1)}", None
    return None, None


_MODULES = {"imagenet_resnet18": _resnet_module, "imagenet_resnet50": _resnet_module,
            "imagenet_vgg16_bn": _vgg_module}


def _check_model(model_name: str):
    if model_name not in HEADS:
        raise ValueError(f"model.name={model_name!r} has no mapping from torchvision's or "
                         f"timm's names; models with one: {', '.join(MAPPED_MODELS)}")


def _flat(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = tuple(np.shape(v))
    return out


def layout(model_name: str, params, batch_stats, flavour: str = "torchvision") -> list:
    """The checkpoint tensors (`_Tensor`) that hold the variables of `model_name` whose
    (params, batch_stats) are given (arrays or shapes), in the names of `flavour`."""
    _check_model(model_name)
    if flavour not in FORMATS:
        raise ValueError(f"flavour={flavour!r}; allowed: {', '.join(FORMATS)}")
    shapes, stats = _flat(params), _flat(batch_stats or {})
    modules = {}
    for path, shape in shapes.items():
        modules.setdefault(path[:-1], {})[path[-1]] = shape
    out = []
    for module, leaves in modules.items():
        torch_name, spatial = _MODULES[model_name](module, flavour)
        if torch_name is None:
            raise NotImplementedError(f"{model_name}: no PyTorch name for our module "
                                      f"{'/'.join(module)!r}")
        if "scale" in leaves:  # BatchNorm
            for theirs, ours in _BN_SUFFIXES.items():
                out.append(_Tensor(f"{torch_name}.{theirs}", "params", module + (ours,),
                                   "vector"))
            for theirs, ours in _BN_STATS.items():
                if module + (ours,) not in stats:
                    raise NotImplementedError(f"{model_name}: BatchNorm {'/'.join(module)!r} "
                                              f"has no batch_stats {ours!r}")
                out.append(_Tensor(f"{torch_name}.{theirs}", "batch_stats", module + (ours,),
                                   "vector"))
        elif "kernel" in leaves:
            kind = ("conv" if len(leaves["kernel"]) == 4 else
                    "conv_dense" if spatial is not None else "dense")
            out.append(_Tensor(f"{torch_name}.weight", "params", module + ("kernel",), kind,
                               spatial or (1, 1)))
            if "bias" in leaves:
                out.append(_Tensor(f"{torch_name}.bias", "params", module + ("bias",),
                                   "vector"))
        else:
            raise NotImplementedError(f"{model_name}: our module {'/'.join(module)!r} with "
                                      f"variables {sorted(leaves)} has no PyTorch form")
    return out


def checkpoint_format(model_name: str, names) -> str:
    """'timm' for a VGG checkpoint with timm's classifier names, else 'torchvision' (the
    ResNets' names are the same in both)."""
    _check_model(model_name)
    timm = model_name == "imagenet_vgg16_bn" and any(
        n.startswith(("pre_logits.", "head.")) for n in names)
    return "timm" if timm else "torchvision"


def checkpoint_classes(model_name: str, shapes: dict):
    """The class count of the checkpoint's classifier (rows of its weight), None if the
    checkpoint has none."""
    head = _MODULES[model_name]((HEADS[model_name],), checkpoint_format(model_name, shapes))[0]
    shape = shapes.get(f"{head}.weight")
    return int(shape[0]) if shape else None


def check_fit(model_name: str, shapes: dict, params, batch_stats, head: str = "keep",
              source: str = "the checkpoint"):
    """Raises ValueError naming every missing name, every unexpected name and every shape
    mismatch (both shapes) between a checkpoint's {name: shape} and the model's variables
    (arrays or shapes); says so when only the class count differs. Returns the layout."""
    if head not in HEAD_MODES:
        raise ValueError(f"init.pretrained_head={head!r}; allowed: {', '.join(HEAD_MODES)}")
    flavour = checkpoint_format(model_name, shapes)
    tensors = layout(model_name, params, batch_stats, flavour)
    ours = {**{("params",) + p: s for p, s in _flat(params).items()},
            **{("batch_stats",) + p: s for p, s in _flat(batch_stats or {}).items()}}
    head_module = HEADS[model_name]
    is_head = {t.torch: t.path[0] == head_module for t in tensors}
    bn_modules = {t.torch.rsplit(".", 1)[0] for t in tensors if t.collection == "batch_stats"}
    ignored = {f"{m}.{_IGNORED}" for m in bn_modules}
    if head == "new":
        ignored |= {n for n, h in is_head.items() if h}
    expected = {t.torch: t for t in tensors if not (head == "new" and is_head[t.torch])}
    missing = [n for n in expected if n not in shapes]
    unexpected = sorted(n for n in shapes if n not in expected and n not in ignored)
    mismatched, head_rows = [], None
    for name, t in expected.items():
        if name not in shapes:
            continue
        want = t.torch_shape(ours[(t.collection,) + t.path])
        got = tuple(shapes[name])
        if got != want:
            mismatched.append(f"{name}: checkpoint {got} vs model {want}")
            if is_head[name] and len(got) == len(want) and got[1:] == want[1:]:
                head_rows = (got[0], want[0])
    if not (missing or unexpected or mismatched):
        return tensors
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {', '.join(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape (PyTorch's layout): "
                     f"{'; '.join(mismatched)}")
    message = (f"{source} does not fit {model_name} (read as {flavour}'s names): "
               + ". ".join(parts))
    if head_rows:
        message += (f". The checkpoint's classifier has {head_rows[0]} classes, the model "
                    f"{head_rows[1]}: set init.pretrained_head='new' to start from a freshly "
                    f"drawn {head_module} (everything else pretrained)")
    raise ValueError(message)


def from_torch(model_name: str, state: dict, params, batch_stats, head: str = "keep",
               source: str = "the checkpoint"):
    """(params, batch_stats) of `model_name` from the checkpoint `state` ({PyTorch name:
    array}); `params` and `batch_stats` are the model's own (from `model.init`): their
    shapes are checked (`check_fit`) and, with `head='new'`, their classifier is kept."""
    tensors = check_fit(model_name, {k: np.shape(v) for k, v in state.items()}, params,
                        batch_stats, head, source)
    out = {"params": _unfreeze(params), "batch_stats": _unfreeze(batch_stats or {})}
    for t in tensors:
        if head == "new" and t.path[0] == HEADS[model_name]:
            continue
        node = out[t.collection]
        for k in t.path[:-1]:
            node = node[k]
        node[t.path[-1]] = np.ascontiguousarray(
            t.to_ours(np.asarray(state[t.torch])), dtype=np.float32)
    return out["params"], out["batch_stats"]


def to_torch(model_name: str, params, batch_stats, flavour: str = "torchvision") -> dict:
    """The checkpoint ({PyTorch name: float32 array}) that `from_torch` reads back as
    (params, batch_stats), with each BatchNorm's `num_batches_tracked` (0) so that
    PyTorch's strict loading accepts it."""
    flat = {"params": _flat_arrays(params), "batch_stats": _flat_arrays(batch_stats or {})}
    out = {}
    for t in layout(model_name, params, batch_stats, flavour):
        out[t.torch] = np.ascontiguousarray(t.to_torch(np.asarray(flat[t.collection][t.path])),
                                            dtype=np.float32)
        if t.torch.endswith(".running_mean"):
            out[t.torch.rsplit(".", 1)[0] + "." + _IGNORED] = np.zeros((), np.int64)
    return out


def _flat_arrays(tree, prefix: tuple = ()) -> dict:
    out = {}
    for k, v in tree.items():
        if hasattr(v, "items"):
            out.update(_flat_arrays(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unfreeze(tree):
    return {k: _unfreeze(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def read_shapes(path: str) -> dict:
    """{name: shape} of the safetensors file `path`, from its header alone."""
    from safetensors import safe_open
    _exists(path)
    try:
        with safe_open(path, framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"init.pretrained={path!r} is not a readable safetensors file: "
                         f"{e}") from None


def read_state(path: str) -> dict:
    """{name: numpy array} of the safetensors file `path`."""
    from safetensors.numpy import load_file
    _exists(path)
    try:
        return load_file(path)
    except Exception as e:  # a bad header, a truncated file, a dtype numpy lacks
        raise ValueError(f"init.pretrained={path!r} is not a readable safetensors file: "
                         f"{e}") from None


def _exists(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init.pretrained={path!r}: no such file")
