"""AutoAttack on any JAX classifier: a softmax regression in plain jax.numpy, trained on
scikit-learn's 8x8 digits, then AutoAttack's standard ensemble at L-inf radius 0.1."""
import functools

import jax
import jax.numpy as jnp
from sklearn.datasets import load_digits

import robust_admm

digits = load_digits()
x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1), in [0, 1]
y = digits.target                                         # (1797,), 0..9


def logits(params, images):  # (n, 8, 8, 1) -> (n, 10)
    return images.reshape(len(images), -1) @ params["w"] + params["b"]


def loss(params):
    log_p = jax.nn.log_softmax(logits(params, x[:1500]))
    return -log_p[jnp.arange(1500), y[:1500]].mean()


params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
step = jax.jit(lambda p: jax.tree_util.tree_map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p)))
for _ in range(300):
    params = step(params)

# Any callable from images to logits will do; a partial passes the parameters as arrays.
result = robust_admm.autoattack(functools.partial(logits, params), x[1500:1564],
                                y[1500:1564], epsilon=0.1)
print(result)
