"""ImageNet models in torchvision's layout (and the ADMM robustness paper's AlexNet_BN):
parameter counts, names and shapes against the originals' definitions written out here,
and a forward and a training step.

Sizes: the full networks' parameters and 224 px outputs are checked by shape only
(`jax.eval_shape`: nothing allocated). What runs, runs small, to keep each test a few
seconds on CPU: ResNet-18 and ResNet-50 at 32 px, full width; VGG-16-BN at 32 px (its smallest input, five
halvings) and AlexNet_BN at 64 px (its smallest is 63), both with every layer of the
network but 1/8 to 1/16 of its channels and a 32-wide classifier (the full ones take a
minute to initialise and compile on CPU, most of it in fc1's 103M weights). 224 px at full
width is a benchmark's, not the suite's.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from robust_admm import attacks
from robust_admm.compression import rules as rules_lib
from robust_admm.data.batching import DATA_KEY_TAG, batch_indices, to_pixels
from robust_admm.models import (AlexNetBN, ImageNetVGG, apply_model, get_model,
                                uses_dropout)
from robust_admm.models.layers import adaptive_avg_pool
from robust_admm.models.vgg import VGG16_CFG
from robust_admm.training import objectives
from robust_admm.training import step as step_lib
from robust_admm.training.attack import make_attack
from robust_admm.training.state import TrainState


def torchvision_resnet_shapes(blocks, bottleneck, num_classes=1000):
    """{torchvision state_dict name: shape} of its ResNet's parameters (no buffers)."""
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.bias": (64,)}
    cin = 64
    for stage, n in enumerate(blocks, start=1):
        width = 64 * 2 ** (stage - 1)
        cout = width * (4 if bottleneck else 1)
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            p = f"layer{stage}.{i}."
            convs = ([(width, cin, 1), (width, width, 3), (cout, width, 1)] if bottleneck
                     else [(width, cin, 3), (width, width, 3)])
            for j, (o, c, k) in enumerate(convs, start=1):
                shapes[f"{p}conv{j}.weight"] = (o, c, k, k)
                shapes[f"{p}bn{j}.weight"] = shapes[f"{p}bn{j}.bias"] = (o,)
            if stride != 1 or cin != cout:
                shapes[f"{p}downsample.0.weight"] = (cout, cin, 1, 1)
                shapes[f"{p}downsample.1.weight"] = shapes[f"{p}downsample.1.bias"] = (cout,)
            cin = cout
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, cin), (num_classes,)
    return shapes


def ours(torch_name: str) -> str:
    """torchvision's name -> ours (`layer1.0.downsample.0.weight` ->
    `layer1_0/downsample_conv/kernel`)."""
    parts = torch_name.split(".")
    leaf = parts.pop()
    if parts[0].startswith("layer"):
        parts[:2] = [f"{parts[0]}_{parts[1]}"]
    if "downsample" in parts:
        k = parts.index("downsample")
        parts[k:k + 2] = ["downsample_conv" if parts[k + 1] == "0" else "downsample_bn"]
    module = parts[-1]
    is_conv = module.startswith("conv") or module == "downsample_conv"
    name = {"weight": "kernel" if is_conv or module == "fc" else "scale",
            "bias": "bias"}[leaf]
    return "/".join(parts + [name])


def transposed(torch_name: str, shape: tuple) -> tuple:
    if len(shape) == 4:  # OIHW -> HWIO
        return (shape[2], shape[3], shape[1], shape[0])
    if torch_name == "fc.weight":
        return (shape[1], shape[0])
    return shape


@pytest.mark.parametrize("name,blocks,bottleneck,count", [
    ("imagenet_resnet18", (2, 2, 2, 2), False, 11_689_512),
    ("imagenet_resnet50", (3, 4, 6, 3), True, 25_557_032)])
def test_resnets_have_torchvisions_parameters_names_and_shapes(name, blocks, bottleneck,
                                                               count):
    expected = torchvision_resnet_shapes(blocks, bottleneck)
    assert sum(int(np.prod(s)) for s in expected.values()) == count  # torchvision's count
    model = get_model(name, 1000)
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 224, 224, 3))),
                               jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    got = {rules_lib.leaf_path(kp): tuple(v.shape) for kp, v in flat}
    assert got == {ours(k): transposed(k, s) for k, s in expected.items()}
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 224, 224, 3))), variables)
    assert out.shape == (2, 1000) and out.dtype == jnp.float32


# --------------------------------------------------------------------------------------
# Adaptive average pooling (torchvision's bins)
# --------------------------------------------------------------------------------------


def adaptive_pool_brute_force(x: np.ndarray, out: tuple) -> np.ndarray:
    """torchvision's AdaptiveAvgPool2d on NHWC, in float64, one output at a time: output
    (i, j) averages rows floor(i*H/oh) .. ceil((i+1)*H/oh) - 1 and the same for columns."""
    n, h, w, c = x.shape
    y = np.zeros((n, out[0], out[1], c))
    for i in range(out[0]):
        r0, r1 = math.floor(i * h / out[0]), math.ceil((i + 1) * h / out[0])
        for j in range(out[1]):
            c0, c1 = math.floor(j * w / out[1]), math.ceil((j + 1) * w / out[1])
            y[:, i, j] = x[:, r0:r1, c0:c1].astype(np.float64).mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 9), (6, 6), (13, 7), (14, 14), (15, 32)])
@pytest.mark.parametrize("out", [(7, 7), (6, 6)])
def test_adaptive_avg_pool_averages_torchvisions_bins(hw, out):
    x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
    got = adaptive_avg_pool(jnp.asarray(x), out)
    assert got.shape == (2, *out, 3)
    np.testing.assert_allclose(np.asarray(got), adaptive_pool_brute_force(x, out),
                               rtol=1e-6, atol=1e-6)


def test_adaptive_avg_pool_is_the_input_itself_at_its_output_size():
    x = jnp.ones((1, 7, 7, 2))
    assert adaptive_avg_pool(x, (7, 7)) is x


# --------------------------------------------------------------------------------------
# VGG-16-BN and AlexNet_BN: the originals' parameters
# --------------------------------------------------------------------------------------


def torchvision_vgg16_bn_shapes(num_classes=1000):
    """[(torchvision state_dict name, shape, our leaf path)] of vgg16_bn's parameters:
    `features` is conv, bn, relu per conv and one index per max-pool; `classifier` is
    Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear."""
    rows, index, cin, k = [], 0, 3, 0
    for v in VGG16_CFG:
        if v == "M":
            index += 1
            continue
        k += 1
        rows += [(f"features.{index}.weight", (v, cin, 3, 3), f"conv{k}/kernel"),
                 (f"features.{index}.bias", (v,), f"conv{k}/bias"),
                 (f"features.{index + 1}.weight", (v,), f"bn{k}/scale"),
                 (f"features.{index + 1}.bias", (v,), f"bn{k}/bias")]
        index, cin = index + 3, v
    for j, (i, o) in enumerate([(512 * 7 * 7, 4096), (4096, 4096), (4096, num_classes)]):
        rows += [(f"classifier.{3 * j}.weight", (o, i), f"fc{j + 1}/kernel"),
                 (f"classifier.{3 * j}.bias", (o,), f"fc{j + 1}/bias")]
    return rows


def alexnet_bn_shapes(num_classes=1000):
    """[(name, shape, our leaf path)] of AlexNet_BN's parameters as the original
    (ADMM_examples/imagenet/alexnet_bn.py of the robustness-aware ADMM pruning code)
    defines them: `features` = conv, bn, relu[, pool] per conv (conv2 in 2 groups: 48
    input channels per filter); `classifier` = Linear, BatchNorm1d, ReLU twice, Linear."""
    convs = [(0, 96, 3, 11), (4, 256, 96 // 2, 5), (8, 384, 256, 3), (11, 384, 384, 3),
             (14, 256, 384, 3)]  # (index, out, in per group, kernel)
    rows = []
    for k, (i, o, c, ks) in enumerate(convs, start=1):
        rows += [(f"features.{i}.weight", (o, c, ks, ks), f"conv{k}/kernel"),
                 (f"features.{i}.bias", (o,), f"conv{k}/bias"),
                 (f"features.{i + 1}.weight", (o,), f"bn{k}/scale"),
                 (f"features.{i + 1}.bias", (o,), f"bn{k}/bias")]
    for j, (i, o) in enumerate([(256 * 6 * 6, 4096), (4096, 4096)], start=1):
        rows += [(f"classifier.{3 * j - 3}.weight", (o, i), f"fc{j}/kernel"),
                 (f"classifier.{3 * j - 3}.bias", (o,), f"fc{j}/bias"),
                 (f"classifier.{3 * j - 2}.weight", (o,), f"fc{j}_bn/scale"),
                 (f"classifier.{3 * j - 2}.bias", (o,), f"fc{j}_bn/bias")]
    rows += [("classifier.6.weight", (num_classes, 4096), "fc3/kernel"),
             ("classifier.6.bias", (num_classes,), "fc3/bias")]
    return rows


# AlexNet_BN's count from its layer shapes: weights + biases of each conv, 2 per BN channel.
ALEXNET_BN_COUNT = (
    (96 * 3 * 11 * 11 + 96) + 2 * 96             # conv1 + bn1:      35,136
    + (256 * 48 * 5 * 5 + 256) + 2 * 256         # conv2 (2 groups) + bn2: 307,968
    + (384 * 256 * 3 * 3 + 384) + 2 * 384        # conv3 + bn3:     885,888
    + (384 * 384 * 3 * 3 + 384) + 2 * 384        # conv4 + bn4:   1,328,256
    + (256 * 384 * 3 * 3 + 256) + 2 * 256        # conv5 + bn5:     885,504
    + (9216 * 4096 + 4096) + 2 * 4096            # fc1 + fc1_bn: 37,761,024
    + (4096 * 4096 + 4096) + 2 * 4096            # fc2 + fc2_bn: 16,789,504
    + (4096 * 1000 + 1000))                      # fc3:           4,097,000


def torch_to_flax(shape: tuple) -> tuple:
    """OIHW -> HWIO for conv weights, (out, in) -> (in, out) for Linear weights."""
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return shape[::-1]


@pytest.mark.parametrize("name,rows,count,px", [
    ("imagenet_vgg16_bn", torchvision_vgg16_bn_shapes(), 138_365_992, 224),
    ("alexnet_bn", alexnet_bn_shapes(), 62_090_280, 224)])
def test_vgg16_bn_and_alexnet_bn_have_the_originals_parameters(name, rows, count, px):
    """Names and shapes (conv weights HWIO, Linear weights transposed) and counts, the
    count of AlexNet_BN also as arithmetic over its layers; logits at 224 px."""
    assert sum(int(np.prod(s)) for _, s, _ in rows) == count
    if name == "alexnet_bn":
        assert ALEXNET_BN_COUNT == count
    model = get_model(name, 1000)
    variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, px, px, 3))),
                               jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    got = {rules_lib.leaf_path(kp): tuple(v.shape) for kp, v in flat}
    assert got == {ours: torch_to_flax(s) if s[1:] else s for _, s, ours in rows}
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, px, px, 3))), variables)
    assert out.shape == (2, 1000) and out.dtype == jnp.float32
    assert uses_dropout(model) == (name == "imagenet_vgg16_bn")


def test_the_flatten_is_channel_major_as_torchvisions():
    """fc1's input is the 7x7 map flattened in (C, H, W) order: with fc1's kernel the
    identity, the features come out as the NCHW map's row (torchvision's flatten)."""
    model = ImageNetVGG(cfg=(2, "M"), num_classes=3, hidden=2 * 49)
    x = jnp.asarray(np.random.default_rng(0).random((1, 14, 14, 3)), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x)
    params = {**v["params"], "fc1": {"kernel": jnp.eye(98), "bias": jnp.zeros(98)}}
    _, seen = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                          capture_intermediates=True, mutable=["intermediates"])
    captured = {k: seen["intermediates"][k]["__call__"][0] for k in ("bn1", "fc1")}
    feature_map = np.asarray(captured["bn1"])  # (1, 14, 14, 2) before relu and the pool
    pooled = np.maximum(feature_map, 0).reshape(1, 7, 2, 7, 2, 2).max(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(captured["fc1"]),
                               pooled.transpose(0, 3, 1, 2).reshape(1, -1), rtol=1e-6)


def test_the_builders_take_width_1_only_and_small_inputs_are_refused():
    for name in ("imagenet_vgg16_bn", "alexnet_bn"):
        with pytest.raises(NotImplementedError, match="model.width=2"):
            get_model(name, 10, 2)
    with pytest.raises(ValueError, match="input of 16x16 px.*at least 32 px"):
        jax.eval_shape(get_model("imagenet_vgg16_bn", 10).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="input of 62x62 px.*at least 63 px"):
        jax.eval_shape(get_model("alexnet_bn", 10).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 62, 62, 3)))


# --------------------------------------------------------------------------------------
# A forward and a training step (narrow, small: see the module docstring)
# --------------------------------------------------------------------------------------

NARROW = {
    "imagenet_vgg16_bn": (ImageNetVGG(cfg=tuple(v if v == "M" else v // 16 for v in VGG16_CFG),
                                      num_classes=10, hidden=32), 32),
    "alexnet_bn": (AlexNetBN(num_classes=10, features=(8, 16, 24, 24, 16), hidden=32), 64),
    # The ResNets at full width (their stem and stages are the same at any input size).
    "imagenet_resnet18": (get_model("imagenet_resnet18", 10), 32),
    "imagenet_resnet50": (get_model("imagenet_resnet50", 10), 32),
}


def _state(model, x, tx):
    """A train state of `model` whose weights are drawn by numpy with the fan-in scaling
    of flax's default (lecun normal), BatchNorm at its initial values: compiling the
    model's init costs more than the step on CPU."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
        return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, jnp.float32)
    v = jax.tree_util.tree_map_with_path(draw, shapes)
    params = v["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=v["batch_stats"], opt_state=tx.init(params),
                      masks=jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params),
                      key=jax.random.PRNGKey(1))


def _attack(setting="adversarial", objective="pgd_at", num_steps=1):
    return make_attack(ml_collections.ConfigDict(dict(
        epsilon=8 / 255, step_size=2 / 255, num_steps=num_steps, random_start=True,
        loss="ce", unroll=1)), setting, 0, objective)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "imagenet_resnet50"
                                  else n for n in NARROW])
def test_each_imagenet_model_forward_and_a_training_step(name):
    """The builder's layers (VGG-16-BN and AlexNet-BN at a narrow width): logits of the right shape, bfloat16 compute
    gives float32 logits close to float32's, and one step of the project's train step
    moves every parameter leaf and the BatchNorm statistics (a natural step: the attack's
    passes with a model of this zoo are the dropout tests' below)."""
    model, px = NARROW[name]
    assert type(model) is type(get_model(name, 10))
    images = np.random.default_rng(0).integers(0, 256, (8, px, px, 3), dtype=np.uint8)
    labels = jnp.arange(8, dtype=jnp.int32) % 10
    x = to_pixels(jnp.asarray(images))
    tx = optax.sgd(0.05)
    state = _state(model, x, tx)
    forward = jax.jit(lambda m, v, x: apply_model(m, *v, x, train=False)[0],
                      static_argnums=0)
    logits32 = forward(model, (state.params, state.batch_stats), x)
    assert logits32.shape == (8, 10) and np.isfinite(np.asarray(logits32)).all()
    logits16 = forward(model.clone(dtype=jnp.bfloat16), (state.params, state.batch_stats), x)
    assert logits16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.1)
    before = jax.tree_util.tree_map(np.asarray, (state.params, state.batch_stats))
    step = step_lib.make_train_step(model, tx, _attack("natural"), 4)
    state, metrics = step(state, (jnp.asarray(images), labels))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["nonfinite"]) == 0
    moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                                   before, (state.params, state.batch_stats))
    assert all(jax.tree_util.tree_leaves(moved)), moved


# --------------------------------------------------------------------------------------
# Dropout: only the training pass drops units, with a key of the step
# --------------------------------------------------------------------------------------

TINY_VGG = ImageNetVGG(cfg=(4, "M", 8, "M"), num_classes=10, hidden=16)


def test_dropout_drops_only_in_train_mode_with_a_key():
    x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 3)), jnp.float32)
    v = jax.jit(TINY_VGG.init)(jax.random.PRNGKey(0), x)
    p, s = v["params"], v["batch_stats"]
    none = TINY_VGG.clone(dropout_rate=0.0)
    assert not uses_dropout(none) and uses_dropout(TINY_VGG)
    k1, k2 = jax.random.PRNGKey(5), jax.random.PRNGKey(6)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def apply(model, train, key):
        return apply_model(model, p, s, x, train, key)[0]

    def run(model, train, key=None):
        return np.asarray(apply(model, train, key))
    plain_train, plain_eval = run(none, True), run(none, False)
    np.testing.assert_array_equal(run(TINY_VGG, True), plain_train)  # the attack's pass
    np.testing.assert_array_equal(run(TINY_VGG, False, k1), plain_eval)  # evaluation
    dropped = run(TINY_VGG, True, k1)
    assert not np.allclose(dropped, plain_train)
    np.testing.assert_array_equal(run(TINY_VGG, True, k1), dropped)
    assert not np.allclose(run(TINY_VGG, True, k2), dropped)


def reference_step(model, state, images, labels, attack, lr, objective, dropout_tag):
    """The step re-derived from the attack's and the model's own functions: the batch of
    (key, data tag, step), PGD on the deterministic train-mode network with the key of
    (key, 1, step), then plain SGD on the loss of the training passes, which drop with the
    key of (key, `dropout_tag`, step) (a clean pass with its fold_in(., 1))."""
    idx = batch_indices(jax.random.fold_in(state.key, DATA_KEY_TAG), state.step,
                        labels.shape[0], 4)
    x, y = to_pixels(images[idx]), labels[idx]
    adv = attack.attack
    logits_fn = lambda z: apply_model(model, state.params, state.batch_stats, z, True)[0]
    a = adv.init(logits_fn, x, y, jax.random.fold_in(jax.random.fold_in(state.key, 1),
                                                     state.step), 0, attack.scale(state.step))
    x_adv = adv.finish(logits_fn, attacks.run_steps(adv, logits_fn, a, x, y), x, y)
    key = jax.random.fold_in(jax.random.fold_in(state.key, dropout_tag), state.step)
    obj = objectives.get(objective)

    def loss(p):
        stats = state.batch_stats
        clean = None
        if obj.needs_clean:
            clean, stats = apply_model(model, p, stats, x, True, jax.random.fold_in(key, 1))
        logits, _ = apply_model(model, p, stats, x_adv, True, key)
        return obj.batch_loss(logits if clean is None else clean, logits, y, beta=6.0)
    g = jax.grad(loss)(state.params)
    return jax.tree_util.tree_map(lambda w, d: w - lr * d, state.params, g)


def test_the_training_passes_drop_with_the_key_of_their_step_and_the_attack_does_not():
    """Two TRADES steps (a clean and an adversarial training pass) of a dropout model
    equal the re-derivation with the dropout key of (state key, DROPOUT_KEY_TAG = 4, step)
    and a deterministic attack, and not the one with another tag's key (the masks
    matter). PGD-AT's one pass is TRADES's adversarial pass."""
    objective = "trades"
    assert step_lib.DROPOUT_KEY_TAG == 4
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    tx = optax.sgd(0.5)
    attack = _attack(objective=objective)
    state = _state(TINY_VGG, to_pixels(images), tx)
    step = step_lib.make_train_step(TINY_VGG, tx, attack, 4, pgd_loop="fori",
                                    objective=objective)
    reference = jax.jit(lambda st, tag: reference_step(TINY_VGG, st, images, labels, attack,
                                                       0.5, objective, tag))
    for _ in range(2):
        want, other = reference(state, 4), reference(state, 3)
        state, _ = step(jax.tree_util.tree_map(jnp.copy, state), (images, labels))
        for got, w, o in zip(*map(jax.tree_util.tree_leaves, (state.params, want, other))):
            np.testing.assert_allclose(np.asarray(got), np.asarray(w), atol=2e-5)
        assert max(float(jnp.abs(w - o).max()) for w, o in zip(
            jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(other))) > 1e-3


@pytest.mark.parametrize("objective", ["pgd_at", "trades"])
def test_a_model_without_dropout_is_applied_without_a_key(monkeypatch, objective):
    """The step hands a dropout key to no pass of a dropout-free model (so its program
    is the one without dropout: the lowered step of such a model was compared with the
    step before dropout existed and is the same text), and to the training passes only,
    never the attack's, of a dropout model."""
    calls = []

    def spy(model, params, batch_stats, x, train, dropout_key=None):
        calls.append(dropout_key is not None)
        return apply_model(model, params, batch_stats, x, train, dropout_key)
    monkeypatch.setattr(step_lib, "apply_model", spy)
    images = jnp.zeros((8, 8, 8, 3), jnp.uint8)
    labels = jnp.zeros(8, jnp.int32)
    for model, training_passes_keyed in ((TINY_VGG.clone(dropout_rate=0.0), False),
                                         (TINY_VGG, True)):
        calls.clear()
        tx = optax.sgd(0.1)
        step = step_lib.make_train_step(model, tx, _attack(objective=objective), 4,
                                        pgd_loop="fori", objective=objective)
        step.parts[0].lower(_state(model, to_pixels(images), tx), (images, labels))
        passes = 2 if objective == "trades" else 1
        # traced once each: attack init's and step's passes, then the training passes
        assert calls[-passes:] == [training_passes_keyed] * passes
        assert not any(calls[:-passes]) and len(calls) > passes
