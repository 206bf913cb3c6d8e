"""ONNX export of a model and its variables, checked by running the file with onnxruntime.

An optional extra (`pip install -e '.[onnx]'`: jax2onnx and onnxruntime), never a core
dependency: jax2onnx 0.17 requires orbax-checkpoint < 0.11.37, so installing the extra
moves orbax-checkpoint back to 0.11.36 (the project works with either). The graph is
traced from the model's inference function (`train=False`: BatchNorm reads its running
statistics) with a free batch dimension; the written file is loaded by onnxruntime and its
logits compared with JAX's on random inputs in the model's input range before the export
counts as done, so a graph onnxruntime cannot run or that computes something else is an
error, not a file left behind.
"""
import importlib.metadata
import os

import jax
import numpy as np

from robust_admm.models import takes_train

EXTRA_HINT = ("ONNX export needs the optional extra: pip install -e '.[onnx]' "
              "(jax2onnx and onnxruntime)")
# Largest |onnxruntime - JAX| logit difference accepted, relative to the largest |logit|.
TOLERANCE = 1e-4


def check_installed():
    """Raises ImportError, naming the extra, when it is not installed."""
    _modules()


def _modules():
    try:
        import jax2onnx
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"{EXTRA_HINT}; missing: {e.name}") from e
    return jax2onnx, onnx, onnxruntime


def write_onnx(model, variables: dict, input_shape, path: str, check_batch: int = 8,
               seed: int = 0) -> dict:
    """Writes `model` with `variables` to the ONNX file `path` (input NHWC float32, any
    batch: `input_shape` is (1, H, W, C)); returns what the check measured. Raises
    ImportError without the extra and ValueError when onnxruntime refuses the file or its
    logits differ from JAX's."""
    jax2onnx, onnx, ort = _modules()
    if not path.endswith(".onnx"):
        raise ValueError(f"ONNX path={path!r}: must end in '.onnx'")
    data = path + ".data"  # where the converter puts the weights: moved into the one file
    _remove(path, data)

    # train=False where __call__ takes it (the zoo's default; a user's may have none).
    mode = {"train": False} if takes_train(model) else {}

    def logits(x):
        return model.apply(variables, x, **mode)

    try:
        jax2onnx.to_onnx(logits, [("B", *input_shape[1:])], return_mode="file",
                         output_path=path)
        onnx.save_model(onnx.load(path), path)  # weights inside (under protobuf's 2 GiB)
        _remove(data)
        x = np.random.default_rng(seed).uniform(0.0, 1.0, (check_batch, *input_shape[1:]))
        x = x.astype(np.float32)
        try:
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            got = session.run(None, {session.get_inputs()[0].name: x})[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot run the exported {type(model).__name__} "
                             f"graph ({type(e).__name__}: {str(e)[:300]})") from e
        want = np.asarray(jax.jit(logits)(x))
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else np.inf
        scale = float(np.abs(want).max())
        if not diff <= TOLERANCE * max(scale, 1.0):
            raise ValueError(f"onnxruntime's logits differ from JAX's for "
                             f"{type(model).__name__} (shape {got.shape} vs {want.shape}, "
                             f"max |diff| {diff:.3g} at max |logit| {scale:.3g})")
    except BaseException:
        _remove(path, data)  # no file that does not compute the model is left behind
        raise
    return {"file": os.path.basename(path), "checked_with": f"onnxruntime {ort.__version__}",
            "converter": f"jax2onnx {importlib.metadata.version('jax2onnx')}",
            "check_batch": check_batch, "max_abs_logit_diff": diff,
            "input": ["B", *input_shape[1:]]}


def _remove(*paths):
    for p in paths:
        if os.path.exists(p):
            os.remove(p)
