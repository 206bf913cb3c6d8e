"""Compress your own Flax NNX model in your own training loop: ADMM toward the rules, then
retraining on them, with robust_admm's optax transformations. Runs offline on the 8x8
digits that ship with scikit-learn, in well under a minute on a CPU:

    python examples/compress_your_flax_model.py [compressed.npz]
"""
import sys

import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

from robust_admm import compression

# Half of conv1's filters, 80% of conv2's weights, 90% of fc1's weights on 4-bit levels,
# fc2 ternary: the rules text of the train CLI, matched against the model's leaf paths.
RULES = "conv1=filter:0.5,conv2=irregular:0.8,fc1=irregular:0.9+quantize:4,fc2=quantize:2"
BATCH = 64


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(2 * 2 * 32, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


digits = load_digits()
images, labels = (digits.images / 16.0).astype(np.float32)[..., None], digits.target
x_train, y_train, x_test, y_test = images[:1500], labels[:1500], images[1500:], labels[1500:]
steps_per_epoch = len(x_train) // BATCH


@nnx.jit
def train_step(model, optimizer, x, y):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
    optimizer.update(model, nnx.grad(loss)(model))


def train(model, tx, epochs, seed):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for i in range(steps_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            train_step(model, optimizer, x_train[idx], y_train[idx])


@nnx.jit
def accuracy(model):
    return (model(x_test).argmax(-1) == y_test).mean()


model = Net(nnx.Rngs(0))
# ADMM (here from the start; after dense training as well): the penalty rho (W - Z + U)
# pulls the weights toward the rules' sets; Z, U and rho are updated every 2 epochs,
# inside the compiled update.
admm = compression.admm_phase(optax.adam(3e-3), RULES, update_every=2 * steps_per_epoch,
                              rho=0.03, rho_growth=1.5)
train(model, admm, epochs=10, seed=1)
print(f"after ADMM: accuracy {accuracy(model):.3f}")
# Retraining: project once, then every update keeps the weights on the sets.
nnx.update(model, compression.project(nnx.state(model, nnx.Param), RULES))
print(f"projected: accuracy {accuracy(model):.3f}")
train(model, compression.retrain_phase(optax.adam(1e-3), RULES), epochs=4, seed=2)

params = nnx.state(model, nnx.Param)
report = compression.size_report(params, RULES)
for path, leaf in report["leaves"].items():
    if leaf["compressed"]:
        print(f"{path}: {leaf['nonzero']}/{leaf['size']} nonzero "
              f"({1 - leaf['nonzero'] / leaf['size']:.1%} sparse), {leaf['bits']} bits")
total = report["total"]
print(f"compressed: accuracy {accuracy(model):.3f}, {total['bytes']} bytes stored "
      f"({total['rate_by_bytes']:.1f}x smaller than float32)")
if len(sys.argv) > 1:  # the compressed weights, by leaf path
    np.savez(sys.argv[1], **{"/".join(map(str, k)): np.asarray(v)
                             for k, v in nnx.to_flat_state(params)})
