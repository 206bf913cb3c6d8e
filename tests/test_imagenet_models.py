"""ImageNet models in torchvision's layout: parameter counts, names and shapes against
torchvision's definitions written out here, and a forward and a training step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from robust_admm.compression import rules as rules_lib
from robust_admm.models import apply_model, get_model


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


def test_resnet18_forward_and_a_training_step_at_a_small_size():
    """At 64 px (the suite's budget; 224 px is the same program at a larger shape): the
    logits are finite, a step of SGD lowers the loss on its batch, BatchNorm's running
    statistics move, and bfloat16 compute gives float32 logits close to float32's."""
    model = get_model("imagenet_resnet18", 10)
    x = jnp.asarray(np.random.default_rng(0).random((4, 64, 64, 3)), jnp.float32)
    y = jnp.arange(4) % 10
    v = model.init(jax.random.PRNGKey(0), x[:1])
    params, stats = v["params"], v["batch_stats"]

    def loss(p):
        logits, new = apply_model(model, p, stats, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    (l0, new_stats), g = jax.value_and_grad(loss, has_aux=True)(params)
    params2 = jax.tree_util.tree_map(lambda p, d: p - 0.05 * d, params, g)
    assert float(loss(params2)[0]) < float(l0)
    assert not np.allclose(new_stats["bn1"]["mean"], stats["bn1"]["mean"])
    logits32 = apply_model(model, params, stats, x, train=False)[0]
    bf16 = get_model("imagenet_resnet18", 10, dtype="bfloat16")
    logits16 = apply_model(bf16, params, stats, x, train=False)[0]
    assert logits16.dtype == jnp.float32 and np.isfinite(np.asarray(logits32)).all()
    np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), atol=0.1)
