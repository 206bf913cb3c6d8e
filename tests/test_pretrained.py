"""`init.pretrained`: torchvision's and timm's checkpoints (safetensors) mapped onto our
models. Checkpoints are made here with random arrays under torchvision's names and shapes
(written out from torchvision's definitions in test_imagenet_models); each block's output
is checked against a float64 numpy forward written from torchvision's definitions, on the
checkpoint's own arrays."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from test_imagenet_models import torchvision_resnet_shapes

from robust_admm.experiments import migrate
from robust_admm.experiments.config_base import base_config
from robust_admm.experiments.validation import config_differences, validate_config
from robust_admm.models import get_model
from robust_admm.models import pretrained as P
from robust_admm.models.imagenet_resnet import Block, ImageNetResNet
from robust_admm.models.layers import NORMALIZATIONS
from robust_admm.training import initialization

RESNETS = {"imagenet_resnet18": ((2, 2, 2, 2), False), "imagenet_resnet50": ((3, 4, 6, 3), True)}


def torchvision_state(name, num_classes=1000, seed=0):
    """A torchvision state_dict of `name` with random values at sensible scales: every
    parameter and buffer (BatchNorm's running averages and `num_batches_tracked`)."""
    blocks, bottleneck = RESNETS[name]
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in torchvision_resnet_shapes(blocks, bottleneck, num_classes).items():
        if len(shape) == 4:
            w = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif k.endswith("weight") and k != "fc.weight":  # a BatchNorm scale
            w = rng.uniform(0.5, 1.5, shape)
        else:
            w = rng.normal(0, 0.1 if k.endswith("bias") else 1 / np.sqrt(shape[-1]), shape)
        out[k] = w.astype(np.float32)
        if k.endswith(".bias") and not k.startswith("fc"):  # a BatchNorm's buffers
            bn = k[:-len(".bias")]
            out[f"{bn}.running_mean"] = rng.normal(0, 0.2, shape).astype(np.float32)
            out[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
            out[f"{bn}.num_batches_tracked"] = np.array(1000, np.int64)
    return out


def shapes_of(name, num_classes=1000):
    """The model's (params, batch_stats) as shapes, without initialising it."""
    v = jax.eval_shape(get_model(name, num_classes).init, jax.random.PRNGKey(0),
                       jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    return v["params"], v["batch_stats"]


# float64 numpy, NCHW, from torchvision's definitions.
def np_conv(x, w, stride, pad):
    """out[n, o, y, x] = sum_{c, i, j} xpad[n, c, y s + i, x s + j] w[o, c, i, j]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    out = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def np_bn(x, s, name):
    """Eval-mode BatchNorm2d (eps 1e-5) with the checkpoint's running averages."""
    g = lambda k: s[f"{name}.{k}"].astype(np.float64)[None, :, None, None]  # noqa: E731
    return (x - g("running_mean")) / np.sqrt(g("running_var") + 1e-5) * g("weight") + g("bias")


def np_block(x, s, p, stride, bottleneck):
    """torchvision's BasicBlock / Bottleneck `p` (e.g. 'layer2.0') in eval mode."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    w = lambda k: s[f"{p}.{k}.weight"].astype(np.float64)  # noqa: E731
    if bottleneck:
        h = relu(np_bn(np_conv(x, w("conv1"), 1, 0), s, f"{p}.bn1"))
        h = relu(np_bn(np_conv(h, w("conv2"), stride, 1), s, f"{p}.bn2"))
        h = np_bn(np_conv(h, w("conv3"), 1, 0), s, f"{p}.bn3")
    else:
        h = relu(np_bn(np_conv(x, w("conv1"), stride, 1), s, f"{p}.bn1"))
        h = np_bn(np_conv(h, w("conv2"), 1, 1), s, f"{p}.bn2")
    if f"{p}.downsample.0.weight" in s:
        x = np_bn(np_conv(x, w("downsample.0"), stride, 0), s, f"{p}.downsample.1")
    return relu(h + x)


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """ResNet-18's torchvision checkpoint at 1,000 classes, as a safetensors file."""
    path = str(tmp_path_factory.mktemp("pretrained") / "resnet18.safetensors")
    save_file(torchvision_state("imagenet_resnet18"), path)
    return path


@pytest.mark.parametrize("name, block, width, cin", [
    ("imagenet_resnet18", "layer2_0", 128, 64),    # BasicBlock with its projection
    ("imagenet_resnet50", "layer2_0", 128, 256)])  # Bottleneck, stride in the 3x3
def test_each_block_computes_what_torchvision_computes_with_the_checkpoint(
        tmp_path, name, block, width, cin):
    """The file's arrays land where they should: the flax block given the imported
    variables equals torchvision's block (float64 numpy) given the file's arrays, and the
    classifier is torchvision's Linear on the same features."""
    state = torchvision_state(name)
    path = str(tmp_path / "model.safetensors")
    save_file(state, path)
    params, stats = P.from_torch(name, P.read_state(path), *shapes_of(name))
    bottleneck = RESNETS[name][1]
    x = np.random.default_rng(1).uniform(0, 1, (2, cin, 8, 8))
    want = np_block(x, state, block.replace("_", "."), 2, bottleneck)
    got = jax.jit(lambda v, x: Block(width, 2, bottleneck).apply(v, x))(
        {"params": params[block], "batch_stats": stats[block]},
        jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32))
    got = np.asarray(got, np.float64).transpose(0, 3, 1, 2)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    feats = np.random.default_rng(2).normal(size=(3, state["fc.weight"].shape[1]))
    logits = jax.numpy.dot(feats, params["fc"]["kernel"]) + params["fc"]["bias"]
    np.testing.assert_allclose(logits, feats @ state["fc.weight"].T + state["fc.bias"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(RESNETS))
def test_names_and_shapes_are_torchvisions_and_the_round_trip_is_exact(name):
    """Our tree -> torchvision's names -> our tree gives every array back bit for bit, and
    the names and shapes are those of torchvision's state_dict."""
    like_p, like_s = shapes_of(name)
    rng = np.random.default_rng(0)
    draw = lambda t: rng.normal(size=t.shape).astype(np.float32)  # noqa: E731
    params, stats = jax.tree_util.tree_map(draw, like_p), jax.tree_util.tree_map(draw, like_s)
    state = P.to_torch(name, params, stats)
    want = {k: v.shape for k, v in torchvision_state(name).items()}
    assert {k: v.shape for k, v in state.items()} == want
    back_p, back_s = P.from_torch(name, state, like_p, like_s)
    for a, b in ((params, back_p), (stats, back_s)):
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert y.dtype == np.float32 and np.array_equal(x, y)


def vgg16_bn_tree(channels=(4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32), hidden=64,
                  classes=10):
    """Our VGG-16-BN's layout (conv1..conv13 with bias, bn1..bn13, fc1..fc3; fc1 reads the
    last 7x7 map) at small widths, as random arrays."""
    rng = np.random.default_rng(0)
    r = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    params, stats, cin = {}, {}, 3
    for i, c in enumerate(channels, start=1):
        params[f"conv{i}"] = {"kernel": r(3, 3, cin, c), "bias": r(c)}
        params[f"bn{i}"] = {"scale": r(c), "bias": r(c)}
        stats[f"bn{i}"] = {"mean": r(c), "var": r(c)}
        cin = c
    for i, (a, b) in enumerate([(cin * 49, hidden), (hidden, hidden), (hidden, classes)], 1):
        params[f"fc{i}"] = {"kernel": r(a, b), "bias": r(b)}
    return params, stats


def test_vgg16_bn_takes_torchvisions_and_timms_names():
    """torchvision's features.{i} (conv, BatchNorm at i + 1; the pools and ReLUs between)
    and classifier.{0,3,6}; timm's pre_logits.fc1 as a 7x7 conv over the 7x7 map (which
    computes torchvision's classifier.0 on the channel-first flattening), pre_logits.fc2
    as a 1x1 conv, head.fc. Both read back bit for bit."""
    params, stats = vgg16_bn_tree()
    tv = P.to_torch("imagenet_vgg16_bn", params, stats)
    convs = [0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40]  # torchvision's vgg16_bn
    for i, f in enumerate(convs, start=1):
        assert tv[f"features.{f}.weight"].shape == params[f"conv{i}"]["kernel"].shape[::-1][
            :2] + (3, 3)
        np.testing.assert_array_equal(tv[f"features.{f + 1}.running_var"],
                                      stats[f"bn{i}"]["var"])
    assert {k for k in tv if k.startswith("classifier")} == {
        f"classifier.{i}.{w}" for i in (0, 3, 6) for w in ("weight", "bias")}
    timm = P.to_torch("imagenet_vgg16_bn", params, stats, flavour="timm")
    assert set(timm) - set(tv) == {"pre_logits.fc1.weight", "pre_logits.fc1.bias",
                                   "pre_logits.fc2.weight", "pre_logits.fc2.bias",
                                   "head.fc.weight", "head.fc.bias"}
    assert timm["pre_logits.fc1.weight"].shape == (64, 32, 7, 7)
    assert timm["pre_logits.fc2.weight"].shape == (64, 64, 1, 1)
    fmap = np.random.default_rng(3).normal(size=(1, 32, 7, 7))
    as_conv = np_conv(fmap, timm["pre_logits.fc1.weight"].astype(np.float64), 1, 0)
    np.testing.assert_allclose(as_conv.reshape(-1),
                               tv["classifier.0.weight"] @ fmap.reshape(-1), rtol=1e-10)
    for state in (tv, timm):
        assert P.checkpoint_format("imagenet_vgg16_bn", state) == (
            "timm" if state is timm else "torchvision")
        back = P.from_torch("imagenet_vgg16_bn", state, params, stats)
        for a, b in zip(jax.tree_util.tree_leaves((params, stats)),
                        jax.tree_util.tree_leaves(back)):
            assert np.array_equal(a, b)


def test_one_error_names_every_missing_unexpected_and_misshapen_tensor():
    state = {k: v.shape for k, v in torchvision_state("imagenet_resnet18").items()}
    del state["layer3.1.bn2.running_var"], state["layer1.0.conv2.weight"]
    state["module.fc.weight"] = state["extra.bias"] = (3,)
    state["layer2.0.downsample.0.weight"] = (128, 64, 3, 3)
    with pytest.raises(ValueError) as e:
        P.check_fit("imagenet_resnet18", state, *shapes_of("imagenet_resnet18"),
                    source="init.pretrained='r.safetensors'")
    msg = str(e.value)
    assert msg.startswith("init.pretrained='r.safetensors' does not fit imagenet_resnet18")
    assert "2 missing: layer1.0.conv2.weight, layer3.1.bn2.running_var" in msg
    assert "2 unexpected: extra.bias, module.fc.weight" in msg
    assert ("1 of another shape (PyTorch's layout): layer2.0.downsample.0.weight: checkpoint "
            "(128, 64, 3, 3) vs model (128, 64, 1, 1)") in msg
    assert "classes" not in msg


def test_another_class_count_is_refused_unless_the_head_is_drawn_afresh():
    state = torchvision_state("imagenet_resnet18")  # 1,000 classes
    params, stats = shapes_of("imagenet_resnet18", num_classes=10)
    with pytest.raises(ValueError, match=r"fc.weight: checkpoint \(1000, 512\) vs model "
                       r"\(10, 512\).*fc.bias.*classifier has 1000 classes, the model 10: "
                       r"set init.pretrained_head='new'"):
        P.from_torch("imagenet_resnet18", state, params, stats)
    fresh = {"kernel": np.full((512, 10), 7.0, np.float32), "bias": np.ones(10, np.float32)}
    params = dict(params, fc=fresh)
    got, got_stats = P.from_torch("imagenet_resnet18", state, params, stats, head="new")
    assert got["fc"] is not None and np.array_equal(got["fc"]["kernel"], fresh["kernel"])
    np.testing.assert_array_equal(got["layer4_1"]["conv2"]["kernel"],
                                  state["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(got_stats["bn1"]["var"], state["bn1.running_var"])
    with pytest.raises(ValueError, match="init.pretrained_head='drop'; allowed: keep, new"):
        P.check_fit("imagenet_resnet18", {}, params, stats, head="drop")


def pretrained_config(path, **fields):
    c = base_config()
    c.model.name, c.model.normalize, c.init.pretrained = "imagenet_resnet18", "imagenet", path
    for k, v in fields.items():
        section, field = k.split("__")
        c[section][field] = v
    return c


@pytest.mark.parametrize("fields, message", [
    ({"init__scheme": "kaiming_normal"},
     "init.pretrained='{}' with init.scheme='kaiming_normal'"),
    ({"init__inherit_from": "/runs/a"},
     "init.pretrained='{}' with init.inherit_from='/runs/a': a run starts from one"),
    ({"model__name": "resnet18"}, "model.name='resnet18' has no mapping from torchvision's "
     "or timm's names; models with one: imagenet_resnet18, imagenet_resnet50, "
     "imagenet_vgg16_bn"),
    ({"model__normalize": "none"}, "with model.normalize='none': torchvision's and timm's"),
])
def test_the_config_is_refused_naming_what_cannot_go_with_pretrained(r18_file, fields,
                                                                      message):
    with pytest.raises(ValueError) as e:
        initialization.check_pretrained(pretrained_config(r18_file, **fields), (1, 32, 32, 3))
    assert message.format(r18_file) in str(e.value)


def test_a_missing_or_unreadable_file_and_a_wrong_class_count_are_refused(tmp_path, r18_file):
    with pytest.raises(FileNotFoundError, match="init.pretrained='/no/such.safetensors': no "
                       "such file"):
        initialization.check_pretrained(pretrained_config("/no/such.safetensors"),
                                        (1, 32, 32, 3))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    for read in (P.read_shapes, P.read_state):
        with pytest.raises(ValueError, match="is not a readable safetensors file"):
            read(str(bad))
    config = pretrained_config(r18_file)
    initialization.check_pretrained(config, (1, 32, 32, 3))  # data's classes not known yet
    initialization.check_pretrained(config, (1, 32, 32, 3), 1000)
    with pytest.raises(ValueError, match="classifier has 1000 classes, the model 10"):
        initialization.check_pretrained(config, (1, 32, 32, 3), 10)
    config.init.pretrained_head = "new"
    initialization.check_pretrained(config, (1, 32, 32, 3), 10)


def test_validation_refuses_pretrained_with_a_scheme_before_anything_runs(r18_file):
    from configs import mnist as mnist_config
    c = mnist_config.get_config("cpu")
    c.model.name, c.model.normalize = "imagenet_resnet18", "imagenet"
    c.init.pretrained, c.init.scheme = r18_file, "orthogonal"
    with pytest.raises(ValueError, match="with init.scheme='orthogonal'"):
        validate_config(c, device_count=1)


def test_initial_variables_are_the_checkpoints(r18_file):
    """The run's initial variables are the file's arrays in our layouts (the model is
    only traced for its shapes)."""
    config = pretrained_config(r18_file)
    model = get_model("imagenet_resnet18", 1000, normalize="imagenet")
    params, stats = initialization.initial_variables(config, model, (1, 32, 32, 3))
    state = P.read_state(r18_file)
    assert isinstance(params["conv1"]["kernel"], jax.Array)
    np.testing.assert_array_equal(params["conv1"]["kernel"],
                                  state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["fc"]["kernel"], state["fc.weight"].T)
    np.testing.assert_array_equal(stats["layer3_0"]["downsample_bn"]["mean"],
                                  state["layer3.0.downsample.1.running_mean"])


def test_imagenet_normalisation_is_the_models_first_operation():
    """normalize='imagenet' on pixels computes what 'none' computes on (x - mean) / std;
    a model without the option refuses it, naming those with it."""
    model = ImageNetResNet(blocks=(), bottleneck=False, num_classes=5)  # the stem, fc
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    v = jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32),
                               shapes)
    mean, std = (np.asarray(a, np.float32) for a in NORMALIZATIONS["imagenet"])
    normalized, on_normalized = jax.jit(lambda v, x, xn: (
        model.clone(normalize="imagenet").apply(v, x), model.apply(v, xn)))(
        v, x, (x - mean) / std)
    np.testing.assert_allclose(normalized, on_normalized, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="model.name='resnet18' has no normalisation layer; "
                       "models with one: .*'imagenet_resnet18', 'imagenet_resnet50'"):
        get_model("resnet18", 10, normalize="imagenet")


def test_an_old_config_json_reads_without_pretrained_weights_or_normalisation():
    new = base_config().to_dict()
    old = json.loads(json.dumps(new))
    del old["init"]["pretrained"], old["init"]["pretrained_head"], old["model"]["normalize"]
    old["init"]["scheme"] = "orthogonal"  # a field it has keeps its value
    upgraded = migrate.upgrade_config_dict(old)
    assert upgraded["init"]["pretrained"] == "" and upgraded["model"]["normalize"] == "none"
    assert config_differences(upgraded, new) == ["init.scheme: 'orthogonal' -> 'default'"]
    assert len(config_differences(old, new)) == 4


def torchvision_vgg16_bn_shapes(num_classes=1000):
    """{torchvision vgg16_bn state_dict name: shape}, parameters and buffers."""
    shapes, i, cin = {}, 0, 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"):
        if v == "M":
            i += 1
            continue
        shapes[f"features.{i}.weight"], shapes[f"features.{i}.bias"] = (v, cin, 3, 3), (v,)
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"features.{i + 1}.{k}"] = (v,)
        shapes[f"features.{i + 1}.num_batches_tracked"] = ()
        i, cin = i + 3, v
    for j, (o, c) in zip((0, 3, 6), ((4096, 512 * 49), (4096, 4096), (num_classes, 4096))):
        shapes[f"classifier.{j}.weight"], shapes[f"classifier.{j}.bias"] = (o, c), (o,)
    return shapes


def test_the_vgg16_bn_model_takes_torchvisions_names_and_shapes():
    """The model itself (where this tree has it): the checkpoint it reads is torchvision's
    vgg16_bn, name for name and shape for shape."""
    try:
        model = get_model("imagenet_vgg16_bn", 1000)
    except ValueError:
        pytest.skip("imagenet_vgg16_bn is not in this tree")
    v = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                       jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    shapes = torchvision_vgg16_bn_shapes()
    assert P.check_fit("imagenet_vgg16_bn", shapes, v["params"], v["batch_stats"])
