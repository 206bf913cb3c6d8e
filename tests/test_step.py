"""The compiled train step: data order, masking, no recompilation, learning."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from robust_admm import attacks
from robust_admm.data.batching import batch_indices
from robust_admm.evaluation.eval_step import make_eval_step
from robust_admm.models import VGG, get_model
from robust_admm.models import apply_model
from robust_admm.runtime.compiler import resolve_pgd_loop
from robust_admm.training import augment
from robust_admm.training.attack import make_attack
from robust_admm.training.state import TrainState
from robust_admm.training.step import make_train_step


def test_each_epoch_visits_every_example_once_in_a_new_order():
    key = jax.random.PRNGKey(0)
    n, b = 48, 8
    epoch0 = np.concatenate([np.asarray(batch_indices(key, s, n, b)) for s in range(6)])
    epoch1 = np.concatenate([np.asarray(batch_indices(key, s, n, b)) for s in range(6, 12)])
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)


def _setup(setting="adversarial", masks_fn=None, n=64, pgd_loop="auto", model=None,
           channels=1, warmup_steps=0, tx=None, cpu_convolutions="auto", objective="pgd_at",
           augmentation="none", feed="device"):
    model = model or get_model("lenet_digits", 10, 4)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, channels)))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    masks = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)
    if masks_fn:
        masks = masks_fn(params)
        params = jax.tree_util.tree_map(lambda p, m: p * m, params, masks)
    tx = tx or optax.adam(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), masks=masks,
                       key=jax.random.PRNGKey(1))
    attack = make_attack(ml_collections.ConfigDict(dict(
        epsilon=0.1, step_size=0.05, num_steps=2, random_start=True, loss="ce", unroll=1)),
        setting, warmup_steps, objective)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.int32)
    # A learnable task: the label is written into the image as a bright pixel.
    images = rng.integers(0, 60, (n, 8, 8, channels)).astype(np.uint8)
    images[np.arange(n), labels % 8, labels // 8 * 4, 0] = 255
    step = make_train_step(model, tx, attack, 16, pgd_loop=pgd_loop,
                           cpu_convolutions=cpu_convolutions, objective=objective, beta=6.0,
                           augmentation=augmentation, feed=feed)
    return state, step, jnp.asarray(images), jnp.asarray(labels)


def test_augmentation_transforms_each_batch_with_a_key_of_the_step():
    """A crop_flip step equals a plain step on data whose batch was augmented beforehand
    with the key fold_in(fold_in(state key, 2), step): what a resumed run relies on."""
    state, aug_step, x, y = _setup("natural", augmentation="crop_flip")
    _, plain_step, _, _ = _setup("natural")
    copy = functools.partial(jax.tree_util.tree_map, jnp.copy)  # the steps donate the state
    for _ in range(2):  # the second step's batch and key differ from the first's
        idx = np.asarray(batch_indices(jax.random.fold_in(state.key, 0), state.step, 64, 16))
        key = jax.random.fold_in(jax.random.fold_in(state.key, 2), state.step)
        batch = np.asarray(augment.augment("crop_flip", x[idx], key))
        assert not np.array_equal(batch, np.asarray(x)[idx])
        pre_augmented = np.asarray(x).copy()
        pre_augmented[idx] = batch
        a, _ = aug_step(copy(state), (x, y))
        b, _ = plain_step(copy(state), (jnp.asarray(pre_augmented), y))
        c, _ = plain_step(copy(state), (x, y))
        leaves = [[np.asarray(p) for p in jax.tree_util.tree_leaves(s.params)]
                  for s in (a, b, c)]
        for u, v in zip(leaves[0], leaves[1]):
            np.testing.assert_array_equal(u, v)
        assert not all(np.array_equal(u, w) for u, w in zip(leaves[0], leaves[2]))
        state = a
    with pytest.raises(ValueError, match="augmentation='mixup'"):
        _setup("natural", augmentation="mixup")


def test_masked_weights_stay_exactly_zero_and_the_rest_trains():
    def masks_fn(params):
        k = params["conv2"]["kernel"]
        m = jnp.arange(k.size).reshape(k.shape) % 3 == 0
        out = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)
        out["conv2"]["kernel"] = m
        return out
    state, step, x, y = _setup(masks_fn=masks_fn)
    before = np.asarray(state.params["conv2"]["kernel"])
    mask = np.asarray(state.masks["conv2"]["kernel"])
    for _ in range(5):
        state, _ = step(state, (x, y))
    after = np.asarray(state.params["conv2"]["kernel"])
    assert np.all(after[~mask] == 0.0)
    assert np.mean(after[mask] != before[mask]) > 0.9  # (a few may sit behind a dead ReLU)
    assert step.compilations() == len(step.parts)  # each part compiled once for all steps


@pytest.mark.parametrize("setting,objective", [
    ("natural", "pgd_at"), ("adversarial", "pgd_at"), ("adversarial", "trades"),
    ("adversarial", "mart")])
def test_natural_and_adversarial_training_reduce_the_loss(setting, objective):
    state, step, x, y = _setup(setting, objective=objective)
    losses = []
    for _ in range(60):
        state, m = step(state, (x, y))
        losses.append(float(m["ce"]))
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8]), (setting, losses)


def _close(a, b, atol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), atol=atol)


@pytest.mark.parametrize("model,channels,objective", [
    (None, 1, "pgd_at"),
    # BatchNorm in train mode during the attack: the statistics must move once per step.
    (VGG(cfg=(4, "M", 8, "M")), 3, "pgd_at"),
    # TRADES's attack carries the clean logits in its state; MART's step two passes.
    (None, 1, "trades"),
    (VGG(cfg=(4, "M", 8, "M")), 3, "mart"),
])
def test_host_driven_pgd_loop_matches_the_compiled_loop(model, channels, objective):
    """'host' (a compiled call per PGD step) and 'fori' give the same training run, with an
    epsilon ramp in progress, and each compiles its parts once."""
    runs = {}
    for loop in ("fori", "host"):
        # SGD, not Adam: the gradient of a conv bias before BatchNorm is rounding noise,
        # which Adam's normalisation turns into steps of +-lr.
        state, step, x, y = _setup(pgd_loop=loop, model=model, channels=channels,
                                   warmup_steps=3, tx=optax.sgd(0.05, momentum=0.9),
                                   objective=objective)
        for _ in range(4):
            state, m = step(state, (x, y))
        assert step.compilations() == len(step.parts) == (1 if loop == "fori" else 3)
        runs[loop] = (state.params, state.batch_stats, m["ce"])
    _close(runs["fori"], runs["host"], atol=2e-5)


def test_both_cpu_convolution_runtimes_give_the_same_training_run():
    """cpu_convolutions 'xla' and 'library' compile the convolutions to different kernels:
    the same training run up to float32 rounding (the model has BatchNorm and a native
    8x8 conv of 8 -> 64 channels, which the library takes by default)."""
    runs = {}
    for runtime in ("xla", "library"):
        state, step, x, y = _setup(model=VGG(cfg=(8, 64, "M", 8, "M")), channels=3,
                                   tx=optax.sgd(0.05, momentum=0.9),
                                   cpu_convolutions=runtime)
        for _ in range(4):
            state, m = step(state, (x, y))
        runs[runtime] = (state.params, state.batch_stats, m["ce"])
    _close(runs["xla"], runs["library"], atol=2e-5)


def test_host_driven_eval_matches_the_compiled_one():
    model = get_model("lenet_digits", 10, 4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.integers(0, 256, (32, 8, 8, 1)).astype(np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 32).astype(np.int32))
    valid = jnp.asarray(np.arange(32) < 29)
    pgd = attacks.Pgd(epsilon=0.1, step_size=0.03, num_steps=3, restarts=2)
    counts = {}
    for loop in ("fori", "host"):
        step = make_eval_step(model, pgd, pgd_loop=loop)
        counts[loop] = {k: int(c) for k, c in step(params, {}, images, labels, valid,
                                                    jax.random.PRNGKey(4)).items()}
    assert counts["fori"] == counts["host"]
    assert counts["fori"]["adv"] <= counts["fori"]["nat"] <= 29 == counts["fori"]["valid"]


@pytest.mark.parametrize("loop", ["fori", "host"])
def test_top5_counts_the_label_among_the_five_largest_logits(loop):
    """With 12 classes: natural top-1 and top-5 counts against numpy on the model's own
    logits (valid entries only); under the attack, top-5 >= top-1."""
    model = get_model("lenet_digits", 12, 4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (32, 8, 8, 1)).astype(np.uint8)
    labels = rng.integers(0, 12, 32).astype(np.int32)
    valid = np.arange(32) < 27
    logits = np.asarray(apply_model(model, params, {}, jnp.asarray(images) / 255.0,
                                    train=False)[0], np.float64)
    rank = (logits > logits[np.arange(32), labels][:, None]).sum(-1)  # classes above it
    pgd = attacks.Pgd(epsilon=0.1, step_size=0.03, num_steps=2)
    step = make_eval_step(model, pgd, pgd_loop=loop, top5=True)
    c = {k: int(v) for k, v in step(params, {}, jnp.asarray(images), jnp.asarray(labels),
                                    jnp.asarray(valid), jax.random.PRNGKey(1)).items()}
    assert c["nat"] == int(((rank == 0) & valid).sum())
    assert c["nat_top5"] == int(((rank < 5) & valid).sum()) > c["nat"]
    assert c["adv"] <= c["adv_top5"] <= 27 == c["valid"]


def test_pgd_loop_resolves_by_backend():
    assert resolve_pgd_loop("auto", "cpu") == "host"
    assert resolve_pgd_loop("auto", "gpu") == "fori"
    assert resolve_pgd_loop("auto", "tpu") == "fori"
    assert resolve_pgd_loop("fori", "cpu") == "fori"
    with pytest.raises(ValueError, match="attack.loop='while'.*allowed"):
        resolve_pgd_loop("while")


@pytest.mark.parametrize("name,width,shape", [("lenet_digits", 4, (8, 8, 1)),
                                              ("wrn10_1", 1, (16, 16, 3))])
def test_bfloat16_compute_stays_close_to_float32_with_float32_parameters_and_gradients(
        name, width, shape):
    f32, bf16 = (get_model(name, 10, width, d) for d in ("float32", "bfloat16"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (16, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
    variables = jax.jit(f32.init)(jax.random.PRNGKey(0), x[:1])
    assert jax.tree_util.tree_map(lambda v: (v.shape, v.dtype), variables) == \
        jax.tree_util.tree_map(lambda v: (v.shape, v.dtype),
                               jax.eval_shape(bf16.init, jax.random.PRNGKey(0), x[:1]))
    params, stats = variables["params"], variables.get("batch_stats", {})

    def loss(model, p):
        logits, new_stats = apply_model(model, p, stats, x, train=True)
        assert logits.dtype == jnp.float32
        assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(new_stats))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grad_fns = [jax.jit(jax.value_and_grad(functools.partial(loss, m))) for m in (f32, bf16)]
    # The bfloat16 model does compute in bfloat16 (else the closeness below is trivial).
    assert ["bf16" in f.lower(params).as_text() for f in grad_fns] == [False, True]
    (l32, g32), (l16, g16) = (f(params) for f in grad_fns)
    assert abs(float(l16) - float(l32)) < 0.02 * float(l32)
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(g16))

    def cosine(a, b):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    flat = [jnp.concatenate([g.ravel() for g in jax.tree_util.tree_leaves(t)]) for t in (g32, g16)]
    assert cosine(*flat) > 0.98  # bfloat16 keeps 8 bits of mantissa: close, not equal
    assert min(map(cosine, jax.tree_util.tree_leaves(g32), jax.tree_util.tree_leaves(g16))) > 0.9


@pytest.mark.parametrize("pgd_loop", ["fori", "host"])
def test_a_streamed_batch_trains_as_the_same_batch_gathered_on_the_device(pgd_loop):
    """The 'stream' feed given the batch that the 'device' feed gathers (all valid) ends
    with the same parameters: the two feeders differ only in where the batch comes from."""
    state, device_step, x, y = _setup(pgd_loop=pgd_loop)
    _, stream_step, _, _ = _setup(pgd_loop=pgd_loop, feed="stream")
    copy = functools.partial(jax.tree_util.tree_map, jnp.copy)
    a, b = copy(state), copy(state)
    for _ in range(3):
        idx = np.asarray(batch_indices(jax.random.fold_in(a.key, 0), a.step, 64, 16))
        a, ma = device_step(a, (x, y))
        b, mb = stream_step(b, {"image": x[idx], "label": y[idx],
                                "valid": jnp.ones(16, bool)})
        assert int(mb["skipped"]) == 0 and "skipped" not in ma
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)


def test_invalid_examples_of_a_streamed_batch_are_left_out_of_the_loss():
    """A skipped image (valid False) counts in `skipped`, not in the loss or accuracy: the
    step's cross-entropy equals a float64 mean over the valid examples of the logits its
    forward pass gives, and the update ignores the invalid examples' labels."""
    state, step, x, y = _setup(objective="natural", feed="stream")
    valid = np.ones(16, bool)
    valid[[3, 11]] = False
    images, labels = x[:16], np.asarray(y[:16])
    copy = functools.partial(jax.tree_util.tree_map, jnp.copy)
    model = get_model("lenet_digits", 10, 4)
    logits, _ = apply_model(model, state.params, state.batch_stats,
                            images.astype(jnp.float32) / 255.0, train=True)
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -logp[np.arange(16), labels]
    batch = {"image": images, "label": jnp.asarray(labels), "valid": jnp.asarray(valid)}
    a, m = step(copy(state), batch)
    assert int(m["skipped"]) == 2
    np.testing.assert_allclose(float(m["ce"]), ce[valid].mean(), rtol=1e-5)
    acc = (logits.argmax(-1) == labels)[valid].mean()
    np.testing.assert_allclose(float(m["train_acc"]), acc, rtol=1e-6)
    other = labels.copy()
    other[3], other[11] = (other[3] + 1) % 10, (other[11] + 5) % 10
    b, _ = step(copy(state), dict(batch, label=jnp.asarray(other)))
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    other[0] = (other[0] + 1) % 10  # a valid example's label does count
    c, _ = step(copy(state), dict(batch, label=jnp.asarray(other)))
    assert any(not np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(
        jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(c.params)))


def test_an_unknown_feed_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="feed='disk'.*device.*stream"):
        _setup(feed="disk")


def test_an_epoch_order_given_by_the_feed_trains_as_the_step_drawing_it_itself():
    """`DeviceFeed` draws each epoch's order once and gives it to every step; the step
    then ends bit for bit where drawing the order itself at each step ends (5 steps of 4
    an epoch: across an epoch boundary)."""
    from jax.sharding import Mesh
    from robust_admm.data.feed import DeviceFeed
    state, step, x, y = _setup()
    copy = functools.partial(jax.tree_util.tree_map, jnp.copy)
    a, b = copy(state), copy(state)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    feed = DeviceFeed((x, y), 16, mesh)
    for given in feed.steps(0, 0, 5, key=jnp.copy(state.key)):
        assert len(given.data) == 3
        a, _ = step(a, given.data)
        b, _ = step(b, (x, y))
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert int(a.step) == 5
