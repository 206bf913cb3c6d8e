"""Our FAB-T (robust_admm.attacks.fab.FabT) against AutoAttack's reference FAB-T
(`FABAttack_PT`, PyTorch) on the same small model and inputs: per-example agreement.

The model (a small conv net or MLP with fixed random weights, MNIST-shaped random
inputs) is written twice from the same numbers: flax on NHWC here, functional torch on
NCHW in the reference's venv (the flatten is done in NHWC order there too, so both
compute the same function). Two runs each:
- standard: AutoAttack's FAB-T (9 target classes, one run of 100 iterations each,
  alpha_max 0.1, eta 1.05, beta 0.9) at --eps; per example: success within eps and the
  norm of the returned perturbation;
- raw: one run at the second-largest class with no epsilon cut (L-inf 1, L2 28): the
  minimal norm each attack found for every point.
`--norm l2` runs both in L2 (the reference's `norm="L2"`, its `projection_l2`).
Some labels are made wrong on purpose (every 10th point) to check that misclassified
points are returned unchanged. Standard FAB-T has no randomness, so the results should
agree up to float rounding (different reduction orders in XLA and PyTorch).

    python benchmarks/fab_vs_reference.py [--model conv|mlp] [--n 100] [--eps 0.03]
        [--norm linf|l2]
        [--torch-python /work/torchenv/bin/python] [--autoattack /work/ref/auto-attack]

The torch side runs as a subprocess of this script in the torch venv (`--torch-side IN
OUT`, .npz files in a temporary folder); torch is never imported in the project's venv.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HW, CLASSES = 28, 10
NO_CUT = {"linf": 1.0, "l2": float(HW)}  # radii holding every image of [0, 1]^(28 x 28)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="conv", choices=["conv", "mlp"])
    p.add_argument("--n", type=int, default=100, help="examples")
    p.add_argument("--eps", type=float, default=0.03)
    p.add_argument("--norm", default="linf", choices=["linf", "l2"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--targets", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--torch-python", default="/work/torchenv/bin/python")
    p.add_argument("--autoattack", default="/work/ref/auto-attack",
                   help="folder holding the reference's `autoattack` package")
    p.add_argument("--torch-side", nargs=2, metavar=("IN", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared data

def make_weights(model: str, rng) -> dict:
    """He-normal weights, HWIO conv kernels and (in, out) dense kernels."""
    he = lambda shape, fan_in: (rng.normal(size=shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    small = lambda n: (rng.normal(size=n) * 0.05).astype(np.float32)
    if model == "mlp":
        return {"w1": he((HW * HW, 128), HW * HW), "b1": small(128),
                "w2": he((128, CLASSES), 128), "b2": small(CLASSES)}
    return {"c1": he((3, 3, 1, 8), 9), "cb1": small(8),
            "c2": he((3, 3, 8, 16), 72), "cb2": small(16),
            "w": he((14 * 14 * 16, CLASSES), 14 * 14 * 16), "b": small(CLASSES)}


# ----------------------------------------------------------------------------- JAX side

def flax_model(model: str):
    """The flax module of `make_weights`' numbers (explicit padding, as torch's)."""
    import flax.linen as nn

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="c1")(x))
            x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                                name="c2")(x))
            return nn.Dense(CLASSES, name="fc")(x.reshape(x.shape[0], -1))

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(128, name="fc1")(x.reshape(x.shape[0], -1)))
            return nn.Dense(CLASSES, name="fc2")(x)

    return Conv() if model == "conv" else Mlp()


def flax_params(model: str, w: dict) -> dict:
    if model == "mlp":
        return {"fc1": {"kernel": w["w1"], "bias": w["b1"]},
                "fc2": {"kernel": w["w2"], "bias": w["b2"]}}
    return {"c1": {"kernel": w["c1"], "bias": w["cb1"]},
            "c2": {"kernel": w["c2"], "bias": w["cb2"]},
            "fc": {"kernel": w["w"], "bias": w["b"]}}


def run_jax(args, weights, x, y):
    """Our FAB-T, standard and raw; returns ({name: x_adv}, {name: seconds})."""
    import jax
    import jax.numpy as jnp

    from robust_admm.attacks import core
    from robust_admm.attacks.fab import FabT

    module = flax_model(args.model)
    params = {"params": flax_params(args.model, weights)}
    logits_fn = lambda xx: module.apply(params, xx)
    x, y = jnp.asarray(x), jnp.asarray(y)
    attacks = {"standard": FabT(args.eps, args.steps, args.targets, restarts=args.targets,
                                norm=args.norm),
               "raw": FabT(NO_CUT[args.norm], args.steps, n_target_classes=1, restarts=1,
                           norm=args.norm)}
    out, seconds = {}, {}
    for name, attack in attacks.items():
        fn = jax.jit(lambda xx, yy, a=attack: core.run(a, logits_fn, xx, yy,
                                                       jax.random.PRNGKey(0)))
        fn(x, y).block_until_ready()  # compile
        t0 = time.perf_counter()
        out[name] = np.asarray(fn(x, y).block_until_ready())
        seconds[name] = time.perf_counter() - t0
    return out, seconds, np.asarray(logits_fn(x))


# ----------------------------------------------------------------------------- torch side

def torch_side(path_in: str, path_out: str):
    """In the torch venv: the reference FAB-T on the same model; NHWC in and out."""
    import torch
    import torch.nn.functional as F
    from autoattack.fab_pt import FABAttack_PT

    data = np.load(path_in)
    torch.set_num_threads(int(data["threads"]))
    model = str(data["model"])
    t = lambda k: torch.from_numpy(data[k])
    nhwc_flat = lambda h: h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)

    if model == "mlp":
        def predict(x):
            return F.relu(nhwc_flat(x) @ t("w1") + t("b1")) @ t("w2") + t("b2")
    else:
        oihw = lambda k: t(k).permute(3, 2, 0, 1).contiguous()
        c1, c2 = oihw("c1"), oihw("c2")

        def predict(x):
            h = F.relu(F.conv2d(x, c1, t("cb1"), padding=1))
            h = F.relu(F.conv2d(h, c2, t("cb2"), stride=2, padding=1))
            return nhwc_flat(h) @ t("w") + t("b")

    x = t("x").permute(0, 3, 1, 2).contiguous()
    y = t("y").long()
    steps, targets = int(data["steps"]), int(data["targets"])
    # AutoAttack's standard FAB-T (autoattack.py: n_restarts=1, n_target_classes=9).
    norm = str(data["norm"])
    runs = {"standard": dict(eps=float(data["eps"]), n_target_classes=targets),
            "raw": dict(eps=NO_CUT[norm], n_target_classes=1)}
    result = {"logits": predict(x).detach().numpy()}
    for name, kw in runs.items():
        fab = FABAttack_PT(predict, norm={"linf": "Linf", "l2": "L2"}[norm], n_restarts=1, n_iter=steps, alpha_max=0.1,
                           eta=1.05, beta=0.9, seed=0, targeted=True, device="cpu", **kw)
        t0 = time.perf_counter()
        adv = fab.perturb(x, y)
        result[f"seconds_{name}"] = time.perf_counter() - t0
        result[name] = adv.permute(0, 2, 3, 1).numpy()
    np.savez(path_out, **result)


def run_torch(args, weights, x, y, folder):
    path_in, path_out = os.path.join(folder, "in.npz"), os.path.join(folder, "out.npz")
    np.savez(path_in, x=x, y=y, eps=args.eps, norm=args.norm, steps=args.steps,
             targets=args.targets,
             model=args.model, threads=args.threads, **weights)
    env = {**os.environ, "PYTHONPATH": args.autoattack}
    proc = subprocess.run([args.torch_python, os.path.abspath(__file__), "--torch-side",
                           path_in, path_out], env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"torch side failed:\n{proc.stdout}\n{proc.stderr}")
    return dict(np.load(path_out))


# ----------------------------------------------------------------------------- comparison

def distance(a, b, norm):
    d = (a - b).reshape(a.shape[0], -1).astype(np.float64)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d * d).sum(1))


def compare(name, x, y, ours, ref, predict, eps, norm):
    """Agreement of success (fooled, within eps) and of the perturbation norms; the norm
    statistics are over the attacked points (those classified correctly at x)."""
    norm_o, norm_r = distance(ours, x, norm), distance(ref, x, norm)
    fooled_o = (predict(ours) != y) & (norm_o <= eps)
    fooled_r = (predict(ref) != y) & (norm_r <= eps)
    attacked = predict(x) == y
    both = fooled_o & fooled_r & attacked
    rel = np.abs(norm_o - norm_r) / np.maximum(norm_r, 1e-12)
    print(f"[{name}] eps={eps:g}: robust accuracy ours {1 - fooled_o.mean():.2%} "
          f"reference {1 - fooled_r.mean():.2%}; success agrees on "
          f"{(fooled_o == fooled_r).sum()}/{len(y)}")
    if (fooled_r & attacked).any():
        q = np.quantile(norm_r[fooled_r & attacked], [0.1, 0.5, 0.9])
        print(f"[{name}]   reference norms of its successes: 10/50/90% {q[0]:.4f} "
              f"{q[1]:.4f} {q[2]:.4f}")
    if both.any():
        print(f"[{name}]   both succeed on {both.sum()} attacked points: norm rel. diff median "
              f"{np.median(rel[both]):.2e} max {rel[both].max():.2e}; within 1e-4: "
              f"{(rel[both] <= 1e-4).sum()}, within 1e-2: {(rel[both] <= 1e-2).sum()}; "
              f"max |x_adv diff| {np.abs(ours - ref)[both].max():.2e}")
    for i in np.flatnonzero(fooled_o != fooled_r)[:10]:
        print(f"[{name}]   disagree at {i}: ours fooled={fooled_o[i]} norm={norm_o[i]:.5f}; "
              f"reference fooled={fooled_r[i]} norm={norm_r[i]:.5f}")
    print(f"[{name}]   points returned unchanged where not fooled: ours "
          f"{(norm_o[~fooled_o] == 0).all()}, reference {(norm_r[~fooled_r] == 0).all()}; "
          f"largest norm returned ours {norm_o.max():.5f} reference {norm_r.max():.5f}")


def main():
    args = parse()
    if args.torch_side:
        return torch_side(*args.torch_side)
    rng = np.random.default_rng(args.seed)
    weights = make_weights(args.model, rng)
    x = rng.uniform(0, 1, (args.n, HW, HW, 1)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        # Labels: the model's own predictions, every 10th made wrong.
        import jax.numpy as jnp
        module = flax_model(args.model)
        params = {"params": flax_params(args.model, weights)}
        predict = lambda xx: np.asarray(module.apply(params, jnp.asarray(xx)).argmax(-1))
        y = predict(x).astype(np.int64)
        y[::10] = (y[::10] + 1) % CLASSES
        ref = run_torch(args, weights, x, y, folder)
    ours, seconds, logits = run_jax(args, weights, x, y.astype(np.int32))
    print(f"model={args.model} norm={args.norm} n={args.n} steps={args.steps} "
          f"targets={args.targets}; clean "
          f"logits max |ours - reference| {np.abs(logits - ref['logits']).max():.2e}; "
          f"clean accuracy {(logits.argmax(-1) == y).mean():.2%}")
    compare("standard", x, y, ours["standard"], ref["standard"], predict, args.eps, args.norm)
    compare("raw target 2", x, y, ours["raw"], ref["raw"], predict, NO_CUT[args.norm],
            args.norm)
    for name in ("standard", "raw"):
        print(f"time {name}: ours {seconds[name]:.2f} s (compiled), reference "
              f"{float(ref['seconds_' + name]):.2f} s")


if __name__ == "__main__":
    main()
