"""Export: .npz + JSON sidecar round trip (identical logits from the files alone) and the
shrunk LeNet (pruned units physically removed) equal to the masked model."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_admm.compression import size as size_lib
from robust_admm.experiments import export
from robust_admm.experiments import shrink as shrink_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.config_base import base_config
from robust_admm.models import LeNet, get_model
from robust_admm.models import apply_model
from robust_admm.runtime import checkpoint


def init(model, hw, seed=0):
    """Randomly initialised params with nonzero biases (flax starts them at zero)."""
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, *hw)))["params"]
    rng = np.random.default_rng(seed)
    return {n: {"kernel": np.array(l["kernel"]),
                "bias": rng.normal(0.0, 0.3, l["bias"].shape).astype(np.float32)}
            for n, l in params.items()}


def ones_masks(params):
    return jax.tree_util.tree_map(lambda w: np.ones(w.shape, bool), params)


def zero_filters(params, masks, layer, units):
    """Filter pruning: output units `units` of `layer` get all-zero kernels (and masks)."""
    params[layer]["kernel"][..., units] = 0.0
    masks[layer]["kernel"][..., units] = False


def logits(model, params, x):
    """Compiled (one program per model is faster here than op-by-op)."""
    fn = jax.jit(lambda p, x: apply_model(model, p, {}, x, train=False)[0])
    return np.asarray(fn(params, x))


def lenet_count(cin, f1, f2, hidden, classes, k, hw2):
    """Parameters of a 2-conv LeNet, counted by hand (hw2: positions after the 2nd pool)."""
    return (k * k * cin * f1 + f1 + k * k * f1 * f2 + f2 + hw2 * f2 * hidden + hidden
            + hidden * classes + classes)


def check_shrunk(model, params, masks, hw, seed=1):
    """Shrinks, checks the logits against the masked model's; returns (small, report)."""
    small, small_vars, rep = shrink_lib.shrink(model, params, {}, masks)
    masked = jax.tree_util.tree_map(lambda w, m: w * m, params, masks)
    x = jax.random.uniform(jax.random.PRNGKey(seed), (8, *hw))
    np.testing.assert_allclose(logits(small, small_vars["params"], x),
                               logits(model, masked, x), rtol=1e-5, atol=1e-5)
    assert rep["params_after"] == size_lib.param_count(small_vars["params"])
    assert rep["params_before"] == size_lib.param_count(params)
    return small, rep


LENET_ADV2 = get_model("lenet_adv", 10, 2)  # conv 4 -> conv 8 -> fc 128, SAME, 28x28
MNIST = (28, 28, 1)


def test_npz_round_trip_is_exact(tmp_path):
    params = init(LENET_ADV2, MNIST)
    stats = {"bn1": {"mean": np.arange(3, dtype=np.float32), "var": np.ones(3, np.float64)}}
    flat = export.export_npz(params, stats, str(tmp_path / "m.npz"))
    assert "params/conv1/kernel" in flat and "batch_stats/bn1/mean" in flat
    loaded = export.load_npz(str(tmp_path / "m.npz"))
    for a, b in ((params, loaded["params"]), (stats, loaded["batch_stats"])):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert y.dtype == np.float32 and np.array_equal(x.astype(np.float32), y)
    export.export_npz(params, {}, str(tmp_path / "p.npz"))
    assert export.load_npz(str(tmp_path / "p.npz"))["batch_stats"] == {}


def test_shrink_conv1_filters_same_padding_keeps_what_cannot_be_exact():
    params, hw = init(LENET_ADV2, MNIST), MNIST
    masks = ones_masks(params)
    zero_filters(params, masks, "conv1", [0, 2, 3])
    params["conv1"]["bias"][[0, 2, 3]] = [-0.3, 0.4, 0.0]  # 2: constant relu(0.4) > 0
    small, rep = check_shrunk(LENET_ADV2, params, masks, hw)
    assert small.features == (2, 8) and rep["layers"]["conv1"]["kept_constant"] == [2]
    assert "conv1" in rep["notes"][0] and "SAME" in rep["notes"][0]
    assert rep["params_after"] == lenet_count(1, 2, 8, 128, 10, 5, 49)


def test_shrink_conv1_filters_valid_padding_folds_into_conv2():
    model = LeNet(features=(4, 6), hidden=16, padding="VALID")  # 16 -> 12 -> 6 -> 2 -> 1
    hw = (16, 16, 1)
    params = init(model, hw)
    masks = ones_masks(params)
    zero_filters(params, masks, "conv1", [1, 3])
    params["conv1"]["bias"][[1, 3]] = [0.5, 0.2]
    small, rep = check_shrunk(model, params, masks, hw)
    assert small.features == (2, 6) and rep["layers"]["conv1"]["folded_into_next_bias"] == 2
    assert rep["params_after"] == lenet_count(1, 2, 6, 16, 10, 5, 1)


def test_shrink_conv2_filters_fold_through_the_flatten():
    params, hw = init(LENET_ADV2, MNIST), MNIST
    masks = ones_masks(params)
    zero_filters(params, masks, "conv2", [1, 4, 5, 7])
    params["conv2"]["bias"][[1, 4, 5, 7]] = [0.5, 0.3, -0.2, 0.1]
    small, rep = check_shrunk(LENET_ADV2, params, masks, hw)
    assert small.features == (4, 4) and rep["layers"]["conv2"]["folded_into_next_bias"] == 3
    assert rep["params_after"] == lenet_count(1, 4, 4, 128, 10, 5, 49)


def test_shrink_fc1_units_fold_into_fc2_and_masks_are_applied():
    params, hw = init(LENET_ADV2, MNIST), MNIST
    masks = ones_masks(params)
    masks["fc1"]["kernel"][:, :64] = False  # the weights stay nonzero: shrink applies masks
    small, rep = check_shrunk(LENET_ADV2, params, masks, hw)
    assert small.hidden == 64 and rep["layers"]["fc1"]["removed_constant"] == 64
    assert rep["params_after"] == lenet_count(1, 4, 8, 64, 10, 5, 49)


def test_shrink_channel_pruning_removes_the_producers_units():
    params, hw = init(LENET_ADV2, MNIST), MNIST
    masks = ones_masks(params)
    for layer, index in (("conv2", (slice(None), slice(None), [1, 3])),
                         ("fc2", ([5, 7, 100],))):
        params[layer]["kernel"][index] = 0.0
        masks[layer]["kernel"][index] = False
    rows = np.arange(49) * 8 + 2  # every (h, w) position of conv2's channel 2
    params["fc1"]["kernel"][rows] = 0.0
    masks["fc1"]["kernel"][rows] = False
    small, rep = check_shrunk(LENET_ADV2, params, masks, hw)
    assert (small.features, small.hidden) == ((2, 7), 125)
    assert [rep["layers"][n]["removed_unused"] for n in ("conv1", "conv2", "fc1")] == [2, 1, 3]
    assert rep["params_after"] == lenet_count(1, 2, 7, 125, 10, 5, 49)


def test_shrink_keeps_one_unit_of_a_fully_pruned_layer():
    params, hw = init(LENET_ADV2, MNIST), MNIST
    masks = ones_masks(params)
    zero_filters(params, masks, "fc1", list(range(128)))
    small, rep = check_shrunk(LENET_ADV2, params, masks, hw)
    assert small.hidden == 1 and rep["layers"]["fc1"]["removed"] == 127


def test_shrink_other_models_raise_naming_the_model():
    with pytest.raises(NotImplementedError, match="VGG"):
        shrink_lib.shrink(get_model("vgg16", 10, 1), {}, {})


def fake_workdir(path, kind="filter"):
    """A workdir with config.json and a finished 'retrain' checkpoint of a filter-pruned
    LeNet_adv w=1, written as training writes them (robust_admm.runtime.checkpoint)."""
    cfg = json.loads(base_config().to_json())
    cfg["model"].update(name="lenet_adv", width=1)
    cfg["data"]["name"], cfg["prune"]["kind"] = "mnist", kind
    cfg["prune"]["ratios"] = "conv1=0.5,conv2=0.5,fc1=0.5"
    for field in ("attack", "eval"):
        cfg[field].update(epsilon=0.3, step_size=0.01)
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    model = get_model("lenet_adv", 10, 1)  # conv 2 -> conv 4 -> fc 64
    params = init(model, MNIST, seed=3)
    masks = ones_masks(params)
    for layer, units in (("conv1", [1]), ("conv2", [0, 3]), ("fc1", list(range(0, 64, 2)))):
        zero_filters(params, masks, layer, units)
    params["conv1"]["bias"][1] = -0.1  # removable under SAME padding
    state = {"params": params, "batch_stats": {}, "masks": masks, "step": np.int32(7)}
    with checkpoint.manager(workdir_lib.stage_dir(path, "retrain")) as mngr:
        checkpoint.save(mngr, 7, state, {"complete": True})
        mngr.wait_until_finished()
    return model, params, masks


def test_write_export_rebuilds_identical_logits_and_a_matching_small_model(tmp_path):
    workdir = str(tmp_path / "run")
    model, params, masks = fake_workdir(workdir)
    side = export.write_export(workdir, "retrain", str(tmp_path / "out" / "model.npz"))
    files = export.output_paths(str(tmp_path / "out" / "model"))
    assert all(os.path.isfile(f) for f in files.values())
    with open(files["json"], encoding="utf-8") as f:
        assert json.load(f) == side
    assert side["model"] == {"name": "lenet_adv", "num_classes": 10, "width": 1,
                             "normalize": "none", "builder": "robust_admm.models.get_model"}
    assert side["input"]["shape"] == [1, 28, 28, 1] and side["input"]["range"] == [0.0, 1.0]
    assert "inside the model" in side["input"]["normalisation"]
    assert side["layouts"]["conv_kernel"] == "(kh, kw, in, out)"
    for layer in ("conv1", "conv2", "fc1", "fc2"):
        entry = side["layers"][layer]
        assert entry["nonzero"] == int(masks[layer]["kernel"].sum()) and entry["bits"] == 32
    assert side["layers"]["fc1"]["zero_filters"] == 32
    total = size_lib.param_count(params)
    nonzero = total - sum(int((~m).sum()) for m in jax.tree_util.tree_leaves(masks))
    assert side["compression_rate"] == pytest.approx(total / nonzero)
    assert side["stored_bytes"]["dense"] == 4 * total
    assert side["source"]["stage"] == "retrain" and side["prune"]["kind"] == "filter"

    x = jax.random.uniform(jax.random.PRNGKey(5), (16, 28, 28, 1))
    m2, variables = export.rebuild(files["npz"], files["json"])
    assert np.array_equal(logits(m2, variables["params"], x), logits(model, params, x))

    small, small_vars = export.rebuild(files["small_npz"], files["small_json"])
    assert (small.features, small.hidden) == ((1, 2), 32)
    np.testing.assert_allclose(logits(small, small_vars["params"], x),
                               logits(model, params, x), rtol=1e-5, atol=1e-5)
    assert side["small_model"]["param_count"] == lenet_count(1, 1, 2, 32, 10, 5, 49)


def test_irregular_pruning_writes_no_small_model(tmp_path):
    workdir = str(tmp_path / "run")
    fake_workdir(workdir, kind="irregular")
    side = export.write_export(workdir, "retrain", str(tmp_path / "m"))
    assert "small_model" not in side and not os.path.exists(tmp_path / "m.small.npz")


def test_bad_input_is_refused_clearly(tmp_path):
    workdir = str(tmp_path / "run")
    fake_workdir(workdir)
    out = str(tmp_path / "m")
    with pytest.raises(ValueError, match=r"stage='finetune'.*'pretrain', 'admm', 'retrain'"):
        export.write_export(workdir, "finetune", out)
    with pytest.raises(ValueError, match="is a folder"):
        export.write_export(workdir, "retrain", str(tmp_path))
    with pytest.raises(ValueError, match="non-empty"):
        export.write_export(workdir, "retrain", "")
    with pytest.raises(FileNotFoundError, match="'admm'"):
        export.write_export(workdir, "admm", out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        export.write_export(str(tmp_path), "retrain", out)
    export.write_export(workdir, "retrain", out)
    with open(out + ".json", encoding="utf-8") as f:
        side = json.load(f)
    side["model"]["width"] = 2
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(side, f)
    with pytest.raises(ValueError, match="does not fit"):
        export.rebuild(out + ".npz", out + ".json")


# ----------------------------------------------------------------------------- ONNX (extra)

def test_onnx_without_the_extra_is_refused_before_any_file(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    fake_workdir(workdir)
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[onnx\]'.*jax2onnx"):
        export.write_export(workdir, "retrain", str(tmp_path / "out" / "m"), onnx=True)
    assert not os.path.exists(tmp_path / "out")


def test_onnx_export_runs_in_onnxruntime_with_the_models_logits(tmp_path):
    """Needs the optional extra (`.[onnx]`); skipped where it is not installed."""
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    workdir = str(tmp_path / "run")
    model, params, _ = fake_workdir(workdir)
    side = export.write_export(workdir, "retrain", str(tmp_path / "m"), onnx=True)
    assert side["onnx"]["written"] and side["small_model"]["onnx"]["written"]
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(8), (5, 28, 28, 1)))
    small, small_vars = export.rebuild(str(tmp_path / "m.small.npz"),
                                       str(tmp_path / "m.small.json"))
    for path, want in ((tmp_path / "m.onnx", logits(model, params, x)),
                       (tmp_path / "m.small.onnx", logits(small, small_vars["params"], x))):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_onnx_file_onnxruntime_cannot_run_is_reported_and_removed(tmp_path, monkeypatch):
    """Needs the optional extra (`.[onnx]`); skipped where it is not installed."""
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")

    def refuse(*args, **kwargs):
        raise RuntimeError("Incompatible dimensions")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    model = get_model("lenet_adv", 10, 1)
    variables = {"params": init(model, MNIST)}
    entry = export._write_onnx(model, variables, (1, *MNIST), str(tmp_path / "m.npz"))
    assert not entry["written"] and "onnxruntime cannot run" in entry["reason"]
    assert "Incompatible dimensions" in entry["reason"]
    assert os.listdir(tmp_path) == []
