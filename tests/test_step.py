"""The compiled train step: data order, masking, no recompilation, learning."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from robust_admm import admm as admm_lib
from robust_admm.models import get_model
from robust_admm.step import TrainState, batch_indices, make_attack, make_train_step


def test_each_epoch_visits_every_example_once_in_a_new_order():
    key = jax.random.PRNGKey(0)
    n, b = 48, 8
    epoch0 = np.concatenate([np.asarray(batch_indices(key, s, n, b)) for s in range(6)])
    epoch1 = np.concatenate([np.asarray(batch_indices(key, s, n, b)) for s in range(6, 12)])
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert not np.array_equal(epoch0, epoch1)


def _setup(setting="adversarial", masks_fn=None, n=64):
    model = get_model("lenet_digits", 10, 4)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
    masks = jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)
    if masks_fn:
        masks = masks_fn(params)
        params = jax.tree_util.tree_map(lambda p, m: p * m, params, masks)
    tx = optax.adam(1e-2)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                       opt_state=tx.init(params), masks=masks, admm=admm_lib.empty(),
                       key=jax.random.PRNGKey(1))
    attack = make_attack(ml_collections.ConfigDict(dict(
        epsilon=0.1, step_size=0.05, num_steps=2, random_start=True, loss="ce", unroll=1)),
        setting)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.int32)
    # A learnable task: the label is written into the image as a bright pixel.
    images = rng.integers(0, 60, (n, 8, 8, 1)).astype(np.uint8)
    images[np.arange(n), labels % 8, labels // 8 * 4, 0] = 255
    step = make_train_step(model, tx, attack, 16)
    return state, step, jnp.asarray(images), jnp.asarray(labels)


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
        state, _ = step(state, x, y)
    after = np.asarray(state.params["conv2"]["kernel"])
    assert np.all(after[~mask] == 0.0)
    assert np.mean(after[mask] != before[mask]) > 0.9  # (a few may sit behind a dead ReLU)
    assert step._cache_size() == 1  # one compilation for all steps


def test_natural_and_adversarial_training_reduce_the_loss():
    for setting in ("natural", "adversarial"):
        state, step, x, y = _setup(setting)
        losses = []
        for _ in range(60):
            state, m = step(state, x, y)
            losses.append(float(m["ce"]))
        assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8]), (setting, losses)
