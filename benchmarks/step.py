"""Times the project's real adversarial training step (robust_admm.step.make_train_step),
with the same flags as ../shared/bench/torch_peer.py, and prints

    RESULT impl=robust_admm model=... width=... steps=... batch=... img/s=...

One iteration = PGD with random start (k steps), CE + ADMM penalty on every kernel,
gradient masking, SGD-momentum (or Adam) update, on random data shaped like MNIST.
Only `lenet_adv` exists so far; VGG-16 and ResNet-18 come with the CIFAR models.

    python benchmarks/step.py --model lenet_adv --width 4 --steps 40 --batch 64 --iters 5
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from robust_admm import admm, optim, projections
from robust_admm.config_base import stage_config
from robust_admm.models import get_model
from robust_admm.step import TrainState, make_attack, make_train_step


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet_adv", choices=["lenet_adv", "vgg16", "resnet18"])
    p.add_argument("--width", type=int, default=4, help="LeNet_adv width multiplier")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 40 mnist)")
    p.add_argument("--batch", type=int, default=None, help="default 64 mnist")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--opt", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=1e-3)
    p.add_argument("--unroll", type=int, default=1, help="PGD fori_loop unroll factor")
    return p.parse_args()


def main():
    args = parse()
    if args.model != "lenet_adv":
        raise NotImplementedError(f"--model {args.model}: the CIFAR models are not written yet")
    steps = 40 if args.steps is None else args.steps
    batch = 64 if args.batch is None else args.batch
    model = get_model("lenet_adv", 10, args.width)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (batch * 8, 28, 28, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, batch * 8).astype(np.int32))
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]

    cfg = stage_config(epochs=1, lr=args.lr, optimizer=args.opt, schedule="constant")
    schedule = optim.make_schedule(cfg, 1)
    tx = optim.make_optimizer(cfg, schedule)
    specs = projections.match_rules(params, {"*": {"kind": "irregular", "ratio": 0.5}})
    attack = make_attack(ml_collections.ConfigDict(dict(
        epsilon=0.3, step_size=0.01, num_steps=steps, random_start=True, loss="ce",
        unroll=args.unroll)), "adversarial")
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                       opt_state=tx.init(params),
                       masks=jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params),
                       admm=admm.init(params, specs, args.rho), key=jax.random.PRNGKey(1))
    train_step = make_train_step(model, tx, attack, batch, schedule)

    t = time.perf_counter()
    state, _ = train_step(state, images, labels)
    jax.block_until_ready(state.params)
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup):
        state, _ = train_step(state, images, labels)
    jax.block_until_ready(state.params)
    rates = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        for _ in range(args.iters):
            state, _ = train_step(state, images, labels)
        jax.block_until_ready(state.params)
        rates.append(batch * args.iters / (time.perf_counter() - t))
    print(f"compile+first step {compile_s:.1f} s; img/s per repeat "
          f"{', '.join(f'{r:.1f}' for r in rates)}; backend {jax.default_backend()}")
    print(f"RESULT impl=robust_admm model={args.model} width={args.width} steps={steps} "
          f"batch={batch} img/s={statistics.median(rates):.1f}")


if __name__ == "__main__":
    main()
