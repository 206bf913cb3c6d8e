"""The CIFAR models: shapes, PyTorch-equal parameter counts, layer names, BatchNorm, padding."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.errors import ModifyScopeVariableError
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import library_fusions
from robust_admm.compression import rules as rules_lib
from robust_admm.runtime import compiler
from robust_admm.models import (VGG, BasicBlock, ResNet, WideBasicBlock, WideResNet, get_model,
                                resnet18, vgg16, wrn28_4, wrn34_10)
from robust_admm.models.layers import max_pool_2x2
from robust_admm.models.vgg import VGG16_CFG

X = jnp.zeros((2, 32, 32, 3), jnp.float32)


def _shapes(model, x=X):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


@functools.cache
def _zoo_shapes(name, width=1):
    """`_shapes` of `get_model(name, width=width)`, traced once per session."""
    return _shapes(get_model(name, width=width))


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def _paths(tree) -> set:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {rules_lib.leaf_path(kp) for kp, _ in flat}


def _vgg16_bn_torch_count(num_classes=10):
    """nn.Conv2d(3x3, bias) + nn.BatchNorm2d (weight, bias) per conv; one Linear(512, classes)."""
    total, cin = 0, 3
    for v in VGG16_CFG:
        if v != "M":
            total += 9 * cin * v + v + 2 * v
            cin = v
    return total + cin * num_classes + num_classes


def _resnet18_torch_count(num_classes=10):
    """Bias-free convs, BatchNorm (weight, bias), 1x1 projection shortcuts, Linear(512, classes)."""
    conv = lambda cin, cout, k: k * k * cin * cout
    bn = lambda c: 2 * c
    total, cin = conv(3, 64, 3) + bn(64), 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for i in range(2):
            stride = 2 if stage and i == 0 else 1
            total += conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3) + bn(cout)
            if stride != 1 or cin != cout:
                total += conv(cin, cout, 1) + bn(cout)
            cin = cout
    return total + cin * num_classes + num_classes


def _wrn_torch_count(depth, k, num_classes=10):
    """The TRADES code's WideResNet: bias-free convs, pre-activation BatchNorm (weight, bias)
    on each block's input and after its conv1, a bias-free 1x1 shortcut conv (no BatchNorm)
    where the channels or stride change, a final BatchNorm, Linear(64k, classes)."""
    conv = lambda cin, cout, kk: kk * kk * cin * cout
    bn = lambda c: 2 * c
    n = (depth - 4) // 6
    total, cin = conv(3, 16, 3), 16
    for cout, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            total += bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if s != 1 or cin != cout:
                total += conv(cin, cout, 1)
            cin = cout
    return total + bn(cin) + cin * num_classes + num_classes


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_output_shape(name):
    model = get_model(name)
    variables = _shapes(model)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, X)
    assert out.shape == (2, 10) and out.dtype == jnp.float32


def test_parameter_counts_equal_pytorch():
    assert _vgg16_bn_torch_count() == 14_728_266
    assert _resnet18_torch_count() == 11_173_962
    assert _count(_shapes(vgg16())["params"]) == _vgg16_bn_torch_count()
    assert _count(_shapes(resnet18())["params"]) == _resnet18_torch_count()


def test_wrn_parameter_counts_equal_pytorch():
    assert _wrn_torch_count(34, 10) == 46_160_474  # the TRADES / MART WRN-34-10
    assert _wrn_torch_count(28, 10) == 36_479_194
    assert _wrn_torch_count(28, 4) == 5_849_050
    assert _count(_zoo_shapes("wrn34_10")["params"]) == _wrn_torch_count(34, 10)
    assert _count(_shapes(WideResNet(depth=28, widen_factor=10))["params"]) == 36_479_194
    assert _count(_zoo_shapes("wrn28_4")["params"]) == _wrn_torch_count(28, 4)
    # Any WRN by name, the width multiplying its widen factor.
    assert _count(_zoo_shapes("wrn16_2", 2)["params"]) == _wrn_torch_count(16, 4)
    with pytest.raises(ValueError, match="model.name='wrn11_1': WideResNet depth=11"):
        get_model("wrn11_1")


def test_vgg_layer_names_and_width():
    v = _shapes(vgg16())
    paths = _paths(v["params"])
    for i in range(1, 14):
        assert {f"conv{i}/kernel", f"conv{i}/bias", f"bn{i}/scale", f"bn{i}/bias"} <= paths
        assert {f"bn{i}/mean", f"bn{i}/var"} <= _paths(v["batch_stats"])
    assert "conv14/kernel" not in paths
    assert v["params"]["conv13"]["kernel"].shape == (3, 3, 512, 512)
    assert v["params"]["fc"]["kernel"].shape == (512, 10)
    wide = _shapes(vgg16(width=2))["params"]
    assert wide["conv1"]["kernel"].shape == (3, 3, 3, 128)
    assert wide["fc"]["kernel"].shape == (1024, 10)


def test_resnet_layer_names_and_shortcuts():
    v = _shapes(resnet18())
    paths = _paths(v["params"])
    assert {"conv1/kernel", "bn1/scale", "fc/kernel", "fc/bias"} <= paths
    assert "conv1/bias" not in paths  # bias-free convs
    for stage in range(1, 5):
        for block in (1, 2):
            b = f"layer{stage}_block{block}"
            assert {f"{b}/conv1/kernel", f"{b}/bn1/scale", f"{b}/conv2/kernel",
                    f"{b}/bn2/bias"} <= paths
            has_shortcut = stage > 1 and block == 1
            assert (f"{b}/shortcut_conv/kernel" in paths) == has_shortcut
            assert (f"{b}/shortcut_bn/scale" in paths) == has_shortcut
    assert v["params"]["layer4_block2"]["conv2"]["kernel"].shape == (3, 3, 512, 512)
    assert v["params"]["layer2_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert "layer1_block1/bn1/mean" in _paths(v["batch_stats"])


def test_resnet_names_can_be_globbed_by_prune_rules():
    params = _shapes(resnet18())["params"]
    spec = {"kind": "irregular", "ratio": 0.5}
    rules = {"conv1": spec, "layer*/conv*": spec, "layer*/shortcut_conv": spec, "fc": spec}
    assert len(rules_lib.match_rules(params, rules)) == 1 + 16 + 3 + 1
    ratios = rules_lib.ratios_to_match(_shapes(resnet18(width=2))["params"], params,
                                         ["layer4_block2/conv2"])
    assert ratios == {"layer4_block2/conv2": pytest.approx(0.75)}


def test_wrn_layer_names_shortcuts_and_width():
    v = _zoo_shapes("wrn34_10")
    p, paths = v["params"], _paths(v["params"])
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 16) and "conv1/bias" not in paths
    assert p["group1_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 160)
    assert p["group2_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 160, 320)
    assert p["group2_block1"]["conv1"]["kernel"].shape == (3, 3, 160, 320)
    assert p["group3_block5"]["conv2"]["kernel"].shape == (3, 3, 640, 640)
    assert p["bn1"]["scale"].shape == (640,)  # the final BatchNorm, before the pool
    assert p["fc"]["kernel"].shape == (640, 10) and p["fc"]["bias"].shape == (10,)
    for g in (1, 2, 3):
        for b in range(1, 6):
            blk = f"group{g}_block{b}"
            assert {f"{blk}/bn1/scale", f"{blk}/conv1/kernel", f"{blk}/bn2/bias",
                    f"{blk}/conv2/kernel"} <= paths
            assert (f"{blk}/shortcut_conv/kernel" in paths) == (b == 1)
    assert "group3_block6/conv1/kernel" not in paths
    assert not [q for q in paths if "shortcut_bn" in q or q.endswith("conv1/bias")]
    assert "group1_block1/bn1/mean" in _paths(v["batch_stats"])
    # width multiplies the widen factor: wrn28_4 at w = 2 is WRN-28-8, with the same stem
    wide = _zoo_shapes("wrn28_4", width=2)["params"]
    assert wide["conv1"]["kernel"].shape == (3, 3, 3, 16)
    assert wide["group1_block1"]["conv1"]["kernel"].shape == (3, 3, 16, 128)
    assert wide["fc"]["kernel"].shape == (512, 10)
    assert _count(wide) == _wrn_torch_count(28, 8)


def test_wrn_names_can_be_globbed_by_prune_rules():
    spec = {"kind": "irregular", "ratio": 0.5}
    rules = {"conv1": spec, "group*/conv*": spec, "group*/shortcut_conv": spec, "fc": spec}
    for name, n in (("wrn34_10", 5), ("wrn28_4", 4)):
        params = _zoo_shapes(name)["params"]
        assert len(rules_lib.match_rules(params, rules)) == 1 + 3 * 2 * n + 3 + 1
        assert set(rules_lib.match_rules(params, {"group2_*/conv*": spec})) == {
            f"group2_block{i}/conv{c}/kernel" for i in range(1, n + 1) for c in (1, 2)}
        assert list(rules_lib.match_rules(params, {"group2_block1/conv1": spec})) == [
            "group2_block1/conv1/kernel"]


def _random_variables(module, x, seed=0):
    """Variables of `module` on `x` drawn in NumPy (no initialiser to compile): normal
    kernels, BatchNorm scales and variances in [0.5, 1.5], biases and means normal / 2."""
    rng = np.random.default_rng(seed)

    def draw(kp, s):
        name = rules_lib.leaf_path(kp).rsplit("/", 1)[-1]
        v = (rng.uniform(0.5, 1.5, s.shape) if name in ("scale", "var")
             else rng.standard_normal(s.shape) / (2 if name in ("bias", "mean") else 1))
        return v.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, _shapes(module, x))


def test_wrn_shortcut_takes_the_preactivated_input():
    x = np.random.default_rng(2).standard_normal((1, 6, 6, 2)).astype(np.float32)
    proj, same = WideBasicBlock(features=3, strides=2), WideBasicBlock(features=2)
    vp, vs = _random_variables(proj, x), _random_variables(same, x, seed=1)
    assert "shortcut_conv" not in vs["params"]  # equal channels, stride 1: the identity
    run = jax.jit(lambda vp, vs, x: (proj.apply(vp, x, capture_intermediates=True),
                                     same.apply(vs, x, capture_intermediates=True)))
    (out, state), (out2, state2) = run(vp, vs, x)  # eval mode: the running statistics
    inter, p = state["intermediates"], vp["params"]
    bn1 = lambda h, v: ((h - v["batch_stats"]["bn1"]["mean"])
                        / np.sqrt(v["batch_stats"]["bn1"]["var"] + 1e-5)
                        * v["params"]["bn1"]["scale"] + v["params"]["bn1"]["bias"])
    o = np.maximum(bn1(x.astype(np.float64), vp), 0)  # relu(bn1(x))
    shortcut = inter["shortcut_conv"]["__call__"][0]
    np.testing.assert_allclose(shortcut, _torch_conv_ref(o, p["shortcut_conv"]["kernel"], 2, 0),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inter["conv1"]["__call__"][0],
                               _torch_conv_ref(o, p["conv1"]["kernel"], 2, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out, inter["conv2"]["__call__"][0] + shortcut, rtol=1e-6)
    np.testing.assert_allclose(out2, state2["intermediates"]["conv2"]["__call__"][0] + x,
                               rtol=1e-6)


# Small instances of the same modules, for the tests that run them.
SMALL = {
    "vgg": VGG(cfg=(4, "M", 8, "M"), num_classes=10),
    "resnet": ResNet(stage_sizes=(1, 1), stage_features=(4, 8), stem_features=4),
}


@pytest.mark.parametrize("which", sorted(SMALL))
def test_batch_stats_change_only_in_train_mode(which):
    model = SMALL[which]
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    assert variables["batch_stats"]
    out1 = model.apply(variables, x)  # train=False: running averages, nothing mutable
    out2 = model.apply(variables, x, train=False)
    assert out1.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out1)))
    np.testing.assert_array_equal(out1, out2)
    logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                     variables["batch_stats"], new["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))
    with pytest.raises(ModifyScopeVariableError):  # train mode must be given a mutable batch_stats
        model.apply(variables, x, train=True)


def test_wrn_forward_and_batch_stats_change_only_in_train_mode():
    """The checks above on WRN-10-1 (both kinds of shortcut), without running its init or
    running it op by op: under two busy cores that test compiled for 15-19 s here, nearly
    all of it the initialisers and the per-op programs; this compiles one program."""
    model = WideResNet(depth=10, widen_factor=1)
    x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    variables = _random_variables(model, x)
    assert "shortcut_conv" not in variables["params"]["group1_block1"]
    assert "shortcut_conv" in variables["params"]["group2_block1"]
    run = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, train=False),
                                model.apply(v, x, train=True, mutable=["batch_stats"])))
    out1, out2, (logits, new) = run(variables, x)
    assert out1.shape == logits.shape == (2, 10)
    assert bool(jnp.all(jnp.isfinite(out1))) and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_array_equal(out1, out2)
    assert not np.allclose(logits, out1)  # batch statistics
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                     variables["batch_stats"], new["batch_stats"])
    assert len(jax.tree_util.tree_leaves(changed)) == 2 * (3 * 2 + 1)  # mean, var of 7 BNs
    assert all(jax.tree_util.tree_leaves(changed))
    with pytest.raises(ModifyScopeVariableError):  # train mode must be given a mutable batch_stats
        jax.eval_shape(lambda v: model.apply(v, x, train=True), variables)


def _torch_conv_ref(x, w, stride, pad):
    """float64 cross-correlation with PyTorch semantics: zero-pad `pad` on every side."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    w = np.asarray(w, np.float64)
    kh, kw = w.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
    return out


def test_stride2_convs_match_pytorch_padding():
    block = BasicBlock(features=3, strides=2)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 6, 6, 2))
    variables = block.init(jax.random.PRNGKey(0), x)
    _, state = block.apply(variables, x, capture_intermediates=True)
    inter = state["intermediates"]
    p = variables["params"]
    conv1 = inter["conv1"]["__call__"][0]
    assert conv1.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(conv1, _torch_conv_ref(x, p["conv1"]["kernel"], 2, 1),
                               rtol=1e-5, atol=1e-5)
    shortcut = inter["shortcut_conv"]["__call__"][0]
    np.testing.assert_allclose(shortcut, _torch_conv_ref(x, p["shortcut_conv"]["kernel"], 2, 0),
                               rtol=1e-5, atol=1e-5)
    # and on CIFAR sizes: 32 -> 16 in stage 2
    shapes = jax.eval_shape(lambda: BasicBlock(8, 2).init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 32, 32, 4))))
    out = jax.eval_shape(lambda v: BasicBlock(8, 2).apply(v, jnp.zeros((1, 32, 32, 4))), shapes)
    assert out.shape == (1, 16, 16, 8)


def test_get_model_names_and_errors():
    assert isinstance(get_model("vgg16"), VGG)
    assert isinstance(get_model("resnet18", 100, 2), ResNet)
    assert get_model("wrn34_10") == WideResNet(depth=34, widen_factor=10)
    assert get_model("wrn28_4", 100, 2) == WideResNet(depth=28, widen_factor=8, num_classes=100)
    for depth in (4, 27, 28.0):
        with pytest.raises(ValueError, match="depth"):
            WideResNet(depth=depth, widen_factor=1)
    with pytest.raises(ValueError, match="resnet18") as e:
        get_model("resnet50")
    assert "vgg16" in str(e.value) and "lenet_adv" in str(e.value)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="width"):
            get_model("vgg16", width=bad)
        with pytest.raises(ValueError, match="width"):
            resnet18(width=bad)
        for builder in (wrn28_4, wrn34_10):
            with pytest.raises(ValueError, match="width"):
                builder(width=bad)


def _pool_reference(x, g):
    """Float64 loops: the 2x2/2 max-pool of NHWC `x` and its VJP with `g`, each window's
    gradient shared equally among the entries equal to its max (JAX's rule for max)."""
    n, h, w, c = x.shape
    out, dx = np.zeros((n, h // 2, w // 2, c)), np.zeros(x.shape)
    for b, i, j, k in np.ndindex(n, h // 2, w // 2, c):
        window = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k]
        out[b, i, j, k] = window.max()
        ties = window == window.max()
        dx[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k] = ties * g[b, i, j, k] / ties.sum()
    return out, dx


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(2, 5), st.integers(0, 2**31 - 1))
def test_max_pool_and_its_gradient_match_a_float64_reference(n, h2, w2, c, levels, seed):
    # Few distinct values, so windows with 2, 3 and 4 tied maxima are common.
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, (n, 2 * h2, 2 * w2, c)).astype(np.float32)
    g = rng.standard_normal((n, h2, w2, c)).astype(np.float32)
    out, vjp = jax.vjp(jax.jit(max_pool_2x2), jnp.asarray(x))
    want_out, want_dx = _pool_reference(x.astype(np.float64), g.astype(np.float64))
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], want_dx, rtol=1e-6, atol=1e-7)


def test_max_pool_odd_sizes_floor_as_pytorch():
    x = jnp.arange(2 * 5 * 3 * 1, dtype=jnp.float32).reshape(2, 5, 3, 1)
    np.testing.assert_array_equal(max_pool_2x2(x), x[:, 1:4:2, 1:2, :])


def test_the_pool_backward_keeps_the_next_convolution_out_of_library_fusions():
    """Why max_pool_2x2 has a hand-written VJP: with autodiff's (a window-count reduction)
    XLA:CPU put the next conv's input gradient inside the library's reduce fusion in this
    program, as in VGG-16, where it ran at 40 GFLOP/s instead of about 100
    (benchmarks/NOTES.md, 15)."""
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    norm = lambda y: (y - y.mean((0, 1, 2))) * jax.lax.rsqrt(y.var((0, 1, 2)) + 1e-5)

    def loss(x):
        y = max_pool_2x2(jax.nn.relu(norm(conv(x, jnp.ones((3, 3, 32, 64))))))
        z = norm(conv(y, jnp.ones((3, 3, 64, 128))))
        return jnp.sum(jax.nn.relu(z) * jnp.cos(z))

    text = jax.jit(jax.grad(loss), compiler_options=compiler.compiler_options("xla")).lower(
        jnp.ones((2, 16, 16, 32))).compile().as_text()
    fusions = library_fusions(text)
    assert any("reduce" in f for f in fusions)  # the library does take reductions here
    assert not [f for f in fusions if "convolution" in f]


def test_the_pool_gradient_is_autodiffs_inside_a_large_compiled_program():
    """Two conv-BatchNorm-relu-pool blocks at 28x28 with 256 channels, compiled with the
    steps' CPU options: the gradient through max_pool_2x2 equals autodiff's through
    flax's reduce_window max-pool. Comparing each window's entries with the library's
    reduction of it found no equal entry in some windows here (0 / 0 shares, every
    gradient NaN), as in VGG-16-BN at 112 px and up (benchmarks/NOTES.md)."""
    import flax.linen as nn

    from robust_admm.models.layers import Conv

    def net(pool):
        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                for _ in range(2):
                    x = Conv(256, (3, 3), padding=((1, 1), (1, 1)))(x)
                    x = pool(nn.relu(nn.BatchNorm(use_running_average=False)(x)))
                return nn.Dense(10)(x.reshape(x.shape[0], -1))
        return Net()

    x = jnp.asarray(np.random.default_rng(0).random((4, 28, 28, 256)), jnp.float32)
    ours, reference = net(max_pool_2x2), net(lambda x: nn.max_pool(x, (2, 2), (2, 2)))
    v = jax.jit(ours.init)(jax.random.PRNGKey(0), x)

    def grad(model):
        def loss(p):
            out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                 mutable=["batch_stats"])
            return (out ** 2).mean()
        return jax.jit(jax.grad(loss), compiler_options=compiler.compiler_options("auto"))(
            v["params"])

    for got, want in zip(jax.tree_util.tree_leaves(grad(ours)),
                         jax.tree_util.tree_leaves(grad(reference))):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def _resnet_count(stem, stages, blocks, num_classes):
    """As `_resnet18_torch_count`, for any stem width, stage widths and blocks per stage."""
    conv = lambda cin, cout, k: k * k * cin * cout
    total, cin = conv(3, stem, 3) + 2 * stem, stem
    for stage, (cout, n) in enumerate(zip(stages, blocks)):
        for i in range(n):
            stride = 2 if stage and i == 0 else 1
            total += conv(cin, cout, 3) + conv(cout, cout, 3) + 4 * cout
            if stride != 1 or cin != cout:
                total += conv(cin, cout, 1) + 2 * cout
            cin = cout
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize("width,classes", [(1, 10), (2, 5)])
def test_the_small_resnet_has_its_counted_parameters_at_any_image_size(width, classes):
    model = get_model("resnet8", classes, width)
    expected = _resnet_count(16 * width, (16 * width, 32 * width, 64 * width), (1, 1, 1),
                             classes)
    assert _resnet_count(64, (64, 128, 256, 512), (2,) * 4, 10) == 11_173_962  # the formula
    for size in (32, 64):
        variables = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, size, size, 3))),
                                   jax.random.PRNGKey(0))
        assert _count(variables["params"]) == expected
        out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3))),
                             variables)
        assert out.shape == (2, classes)
