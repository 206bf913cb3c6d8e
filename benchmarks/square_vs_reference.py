"""Our Square attack against AutoAttack's reference Square (PyTorch) on one small model.

Trains a small LeNet (the project's flax model) on MNIST in JAX, writes its weights and
a few hundred test images to an .npz, and runs the reference `SquareAttack` (L-inf, p_init 0.8, margin loss,
one restart, resc_schedule=False, as AutoAttack's standard version) on the same weights
in a PyTorch venv, in a subprocess; then our `Square` (host driver, and optionally the
fori driver) on the same images. The attacks are random (different generators), so the
robust accuracies should be statistically close, not equal; the per-point agreement
says how close. Timing: the attack only, compiled parts warmed up first, both sides
pinned to the same `--threads` cores (run one after the other). The reference queries
only the points not yet fooled; ours evaluates the whole batch at every step.

    python benchmarks/square_vs_reference.py [--n 200] [--eps 0.1] [--queries 5000]
        [--norm linf|l2]
        [--threads 1] [--drivers host,fori]
        [--torch-python /work/torchenv/bin/python] [--ref /work/ref/auto-attack]

The torch side is this file run as `--torch-side IN OUT` by that interpreter; it imports
neither JAX nor this project. Output: a table and `RESULT` lines.
"""
import argparse
import functools
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

BUDGETS = (1, 10, 100, 500, 1000, 2500, 5000)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="test images attacked")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--norm", default="linf", choices=["linf", "l2"],
                   help="threat model of both sides (the reference's 'Linf' or 'L2')")
    p.add_argument("--queries", type=int, default=5000, help="the reference's n_queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "mnist"))
    p.add_argument("--torch-python", default="/work/torchenv/bin/python")
    p.add_argument("--ref", default="/work/ref/auto-attack", help="AutoAttack checkout")
    p.add_argument("--threads", type=int, default=1,
                   help="cores for both sides: this process and the torch subprocess are "
                        "pinned to the first N cores; torch uses N intra-op threads")
    p.add_argument("--drivers", default="host", help="comma list of host, fori")
    p.add_argument("--torch-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data

def read_idx(path):
    """An MNIST IDX file (gzip) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        dims = struct.unpack(">" + "I" * (magic & 0xFF), f.read(4 * (magic & 0xFF)))
        return np.frombuffer(f.read(), np.uint8).reshape(dims)


def mnist(folder, split):
    """(images NHWC float32 in [0, 1], labels int32)."""
    x = read_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"))
    y = read_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"))
    return (x[..., None] / 255.0).astype(np.float32), y.astype(np.int32)


# ----------------------------------------------------------------------------- torch side

def torch_side(path_in, path_out, threads):
    """Runs in the PyTorch venv: the same CNN from the .npz weights, then the reference
    Square exactly as AutoAttack's `perturb` runs it (one restart), keeping the
    per-point query counts of `attack_single_run`."""
    import torch
    import torch.nn.functional as F
    from autoattack.square import SquareAttack

    torch.set_num_threads(threads)
    d = np.load(path_in)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    w1, w2 = t(d["conv1"].transpose(3, 2, 0, 1)), t(d["conv2"].transpose(3, 2, 0, 1))
    b1, b2 = t(d["conv1_b"]), t(d["conv2_b"])
    w3, b3, w4, b4 = t(d["fc1"].T), t(d["fc1_b"]), t(d["fc2"].T), t(d["fc2_b"])

    def predict(x):  # NCHW, flattened in NHWC order as the flax LeNet
        h = F.max_pool2d(F.relu(F.conv2d(x, w1, b1, padding=2)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, w2, b2, padding=2)), 2)
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
        return F.linear(F.relu(F.linear(h, w3, b3)), w4, b4)

    x = t(d["x"].transpose(0, 3, 1, 2))
    y = t(d["y"]).long()
    eps, n_queries, seed = float(d["eps"]), int(d["queries"]), int(d["seed"])
    norm = str(d["norm"])
    with torch.no_grad():
        logits = predict(x)
    attack = SquareAttack(predict, norm={"linf": "Linf", "l2": "L2"}[norm],
                          n_queries=n_queries, eps=eps, p_init=0.8,
                          n_restarts=1, seed=seed, verbose=False, loss="margin",
                          resc_schedule=False)
    # `perturb` with one restart, unrolled to keep attack_single_run's query counts.
    start = time.perf_counter()
    attack.init_hyperparam(x)
    acc = logits.argmax(1) == y
    torch.random.manual_seed(attack.seed)
    adv = x.clone()
    queries = np.zeros(len(y), np.float32)
    idx = acc.nonzero().squeeze(1)
    if idx.numel():
        n_q, adv_curr = attack.attack_single_run(x[idx], y[idx])
        with torch.no_grad():
            fooled = predict(adv_curr).argmax(1) != y[idx]
        adv[idx[fooled]] = adv_curr[fooled]
        queries[idx.numpy()] = n_q.numpy()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        robust = (predict(adv).argmax(1) == y).numpy()
    np.savez(path_out, logits=logits.numpy(), robust=robust, queries=queries,
             seconds=seconds, adv=adv.numpy().transpose(0, 2, 3, 1),
             dist=float(distance(adv.numpy().transpose(0, 2, 3, 1),
                                 x.numpy().transpose(0, 2, 3, 1), norm).max()))


# ----------------------------------------------------------------------------- JAX side

def build_model():
    """The project's LeNet (its conv and pooling layers, as training runs them): 5x5
    'same' convs 1 -> 8 -> 16, each ReLU and 2x2 max-pool, dense 784 -> 64 -> 10."""
    from robust_admm.models.lenet import LeNet

    return LeNet(features=(8, 16), hidden=64)


def train(model, x, y, steps, seed):
    """Adam on cross-entropy, batches of 128: a plain (not robust) MNIST classifier."""
    import jax
    import optax

    params = model.init(jax.random.PRNGKey(seed), x[:1])
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    @jax.jit
    def update(params, opt_state, xb, yb):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, xb), yb).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        i = rng.integers(0, len(x), 128)
        params, opt_state = update(params, opt_state, x[i], y[i])
    return params


def distance(a, b, norm):
    """Per-example norm of a - b in the threat model (numpy, NHWC)."""
    d = (a - b).reshape(a.shape[0], -1).astype(np.float64)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d * d).sum(1))


def jax_square(model, params, x, y, eps, queries, seed, driver, norm="linf"):
    """Our Square on (x, y), one restart: (robust per point, queries per point, seconds,
    max |x_adv - x|). `host`: core.HostRunner's compiled init and step called from the
    host; `fori`: init, `lax.fori_loop` of steps and finish in one program (core.run's
    loop, also returning the query counts)."""
    import jax
    import jax.numpy as jnp

    from robust_admm.attacks import core
    from robust_admm.attacks.square import Square

    attack = Square(eps, num_steps=queries, norm=norm)
    apply = lambda m, xx: model.apply(m, xx)
    x, y = jnp.asarray(x), jnp.asarray(y)
    key = jax.random.PRNGKey(seed)
    if driver == "fori":
        def whole(m, xx, yy, k):
            fn = functools.partial(apply, m)
            state = core.run_steps(attack, fn, attack.init(fn, xx, yy, k), xx, yy)
            return attack.finish(fn, state, xx, yy), state["queries"]

        whole = jax.jit(whole)
        jax.block_until_ready(whole(params, x, y, key))  # compile (and one full run)
        start = time.perf_counter()
        x_adv, n_queries = jax.block_until_ready(whole(params, x, y, key))
        seconds = time.perf_counter() - start
    else:
        runner = core.HostRunner(attack, apply)
        # Warm up: compile init, step and finish (the step donates its state).
        warm = runner.step_c(params, runner.init_c(params, x, y, key, 0, 1.0), x, y)
        jax.block_until_ready(runner.finish_c(params, warm, x, y))
        start = time.perf_counter()
        state = runner.init_c(params, x, y, key, 0, 1.0)
        for _ in range(attack.num_steps):
            state = runner.step_c(params, state, x, y)
        n_queries = state["queries"]
        x_adv = runner.finish_c(params, state, x, y).block_until_ready()
        seconds = time.perf_counter() - start
    robust = np.asarray(model.apply(params, x_adv).argmax(-1) == y)
    return (robust, np.asarray(n_queries), seconds,
            float(distance(np.asarray(x_adv), np.asarray(x), norm).max()))


def robust_at(robust, queries, budgets):
    """Robust accuracy after each query budget: a point counts as fooled at budget q if it
    was fooled with at most q queries (points wrong on clean inputs spend 0)."""
    fooled = ~robust
    return [float(np.mean(~(fooled & (queries <= q)))) for q in budgets]


def main():
    args = parse()
    if args.torch_side:
        return torch_side(*args.torch_side, args.threads)
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(cpus):
        sys.exit(f"--threads {args.threads}: this process may use 1..{len(cpus)} cores")
    os.sched_setaffinity(0, cpus[:args.threads])  # before JAX starts its thread pool
    model = build_model()
    x_train, y_train = mnist(args.data, "train")
    x_test, y_test = mnist(args.data, "t10k")
    t0 = time.perf_counter()
    params = train(model, x_train, y_train, args.train_steps, args.seed)
    x, y = x_test[:args.n], y_test[:args.n]
    logits = np.asarray(model.apply(params, x))
    clean = float(np.mean(logits.argmax(-1) == y))
    print(f"model: LeNet 8-16-64 trained {args.train_steps} steps in "
          f"{time.perf_counter() - t0:.1f} s; clean accuracy on the {args.n} images "
          f"{clean:.3f}; eps={args.eps} queries={args.queries}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path_in, path_out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        flat = {k: np.asarray(v["kernel"]) for k, v in params["params"].items()}
        flat.update({k + "_b": np.asarray(v["bias"]) for k, v in params["params"].items()})
        np.savez(path_in, x=x, y=y, eps=args.eps, norm=args.norm, queries=args.queries,
                 seed=args.seed, **flat)
        env = dict(os.environ, PYTHONPATH=args.ref)
        out = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch-side",
                              path_in, path_out, "--threads", str(args.threads)], env=env,
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit("torch side failed:\n" + out.stdout[-3000:] + out.stderr[-3000:])
        ref = dict(np.load(path_out))

    print(f"logits, flax vs torch: max |diff| {np.abs(ref['logits'] - logits).max():.2e}")
    budgets = [q for q in BUDGETS if q <= args.queries + 1] + (
        [args.queries + 1] if args.queries + 1 not in BUDGETS else [])
    rows = [("reference (torch)", ref["robust"], ref["queries"], float(ref["seconds"]),
             float(ref["dist"]))]
    for driver in args.drivers.split(","):
        robust, queries, seconds, linf = jax_square(model, params, x, y, args.eps,
                                                    args.queries, args.seed, driver, args.norm)
        rows.append((f"ours ({driver})", robust, queries, seconds, linf))

    print("robust accuracy after q queries per point:")
    print("| attack | " + " | ".join(f"q<={q}" for q in budgets) +
          f" | mean queries (fooled) | max {args.norm} norm of dx | seconds |")
    print("|---" * (len(budgets) + 4) + "|")
    for name, robust, queries, seconds, linf in rows:
        accs = robust_at(robust, queries, budgets)
        fooled_q = queries[~robust & (queries > 0)]
        mean_q = float(fooled_q.mean()) if fooled_q.size else float("nan")
        print(f"| {name} | " + " | ".join(f"{a:.3f}" for a in accs) +
              f" | {mean_q:.1f} | {linf:.4f} | {seconds:.1f} |")
    ref_robust = rows[0][1]
    for name, robust, _, seconds, _ in rows[1:]:
        agree = float(np.mean(robust == ref_robust))
        print(f"RESULT impl={name.split()[1].strip('()')} n={args.n} norm={args.norm} "
              f"eps={args.eps} "
              f"queries={args.queries} robust={robust.mean():.3f} "
              f"ref_robust={ref_robust.mean():.3f} agree={agree:.3f} "
              f"seconds={seconds:.1f} ref_seconds={rows[0][3]:.1f}")


if __name__ == "__main__":
    main()
