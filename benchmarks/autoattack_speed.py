"""AutoAttack on the same weights four ways: ours on a Flax NNX and on a pure-jnp model, the
original AutoAttack code and torchattacks' AutoAttack, in one command.

    python benchmarks/autoattack_speed.py --workdir runs/lenet --stage pretrain \
        --data ../shared/data/mnist --n 1000 --epsilon 0.1 \
        --torch-python /path/to/torch-venv/bin/python --autoattack /path/to/auto-attack \
        --out benchmarks/autoattack_speed.txt

Exports the stage's LeNet (robust_admm.export) and rebuilds it from the exported .npz
alone as a Flax NNX module (nnx.Conv, nnx.Linear, nnx.max_pool: a user's model) and as a
plain jnp function of (params, x), then runs `robust_admm.autoattack` (standard version)
on each on the first n test images. In a subprocess of a separate PyTorch environment it
rebuilds the same network in torch and runs the original `AutoAttack(version='standard')`
(fra31/auto-attack, on --autoattack's path) and torchattacks' `AutoAttack` (its four
members in order, each on the points still robust, in batches of --batch as the original
runs them). Prints, and writes to --out, the natural accuracy, the robust accuracy after
each member, each member's and the whole wall time of every side, one side at a time on
the same machine. PyTorch, the original code and torchattacks are never dependencies of the
project. `--sides` picks some of nnx, jnp, nnx-own-ops, jnp-own-ops, original,
torchattacks, torchattacks-100 (e.g. `--n 50 --sides jnp` for a quick check without
torch); the `-own-ops` sides run ours with `cpu_forms=False` (the model's own convolutions
and max-pools: the A B of `robust_admm.with_cpu_forms`). torchattacks' AutoAttack runs its
APGD-CE, APGD-T and FAB-T at 10 iterations (its classes' default), where the original and
ours run 100: `torchattacks-100` is it at 100, the same work as the others.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from autoattack_vs_reference import STANDARD, torch_lenet  # this folder: the same LeNet

# Ours on each model form, with the model's convolutions and max-pools in the project's CPU
# forms (robust_admm.with_cpu_forms, the default) and, "-own-ops", with the model's own ops.
OURS = ("nnx", "jnp", "nnx-own-ops", "jnp-own-ops")
SIDES = (*OURS, "original", "torchattacks", "torchattacks-100")
DEFAULT_SIDES = ("nnx", "jnp", "original", "torchattacks")
# torchattacks' AutoAttack builds APGD-CE, APGD-T and FAB-T at its own default of 10
# iterations (the original runs 100): "torchattacks-100" is it at the original's 100.
TORCHATTACKS_STEPS = {"torchattacks": None, "torchattacks-100": 100}


# ----------------------------------------------------------------------------- torch side

def torch_side(npz, data_npz, out_json, eps, threads, seed, batch, sides):
    """Runs in the PyTorch environment: the LeNet from the export, then each torch side."""
    import torch

    torch.set_num_threads(threads)
    model, x, y = torch_lenet(npz, data_npz)  # the same net as the reference benchmark's
    with torch.no_grad():
        logits = model(x)
    clean = (logits.argmax(1) == y).numpy()
    result = {"logits": logits.numpy().tolist(), "clean": float(clean.mean())}
    if "original" in sides:
        result["original"] = run_original(model, x, y, eps, seed, batch)
    for side, steps in TORCHATTACKS_STEPS.items():
        if side in sides:
            result[side] = run_torchattacks(model, x, y, clean, eps, seed, batch, steps)
    with open(out_json, "w") as f:
        json.dump(result, f)


def run_original(model, x, y, eps, seed, batch):
    """The original AutoAttack; each member's time from its log's cumulative times."""
    from autoattack import AutoAttack

    lines = []

    class Log:
        def log(self, s):
            lines.append(s)
            print(s, flush=True)

    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device="cpu")
    aa.logger = Log()
    for a in (aa.apgd, aa.apgd_targeted):
        a.logger = aa.logger
    t0 = time.perf_counter()
    aa.run_standard_evaluation(x, y, bs=batch)
    seconds = time.perf_counter() - t0
    after, member_seconds, last = {}, {}, 0.0
    for s in lines:
        m = re.match(r"robust accuracy after (\S+): ([\d.]+)% \(total time ([\d.]+) s\)", s)
        if m:
            name = m.group(1).lower()
            after[name] = float(m.group(2)) / 100
            member_seconds[name] = float(m.group(3)) - last
            last = float(m.group(3))
    return {"after": after, "member_seconds": member_seconds, "seconds": seconds}


def run_torchattacks(model, x, y, clean, eps, seed, batch, steps=None):
    """torchattacks' AutoAttack(version='standard'): its members in order, each on the
    points still robust (as its MultiAttack), in batches of `batch` points; `steps`, if
    given, the iterations of its APGD-CE, APGD-T and FAB-T (its default: 10)."""
    import torch
    import torchattacks

    aa = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                 n_classes=10, seed=seed)
    members = aa._autoattack.attacks
    if steps is not None:
        for attack in members[:3]:
            attack.steps = steps
    robust = torch.from_numpy(clean.copy())
    after, member_seconds = {}, {}
    t_all = time.perf_counter()
    for name, attack in zip(STANDARD, members):
        t0 = time.perf_counter()
        idx = robust.nonzero()[:, 0]
        for chunk in idx.split(batch):
            adv = attack(x[chunk], y[chunk])
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[chunk]
            robust[chunk[fooled]] = False
        member_seconds[name] = time.perf_counter() - t0
        after[name] = float(robust.float().mean())
        print(f"torchattacks (steps {steps or 'default'}): robust accuracy after {name}: "
              f"{100 * after[name]:.2f}% ({member_seconds[name]:.1f} s)", flush=True)
    return {"after": after, "member_seconds": member_seconds,
            "seconds": time.perf_counter() - t_all}


# ----------------------------------------------------------------------------- JAX side

def jax_models(npz):
    """(NNX module, pure-jnp function of (params, x), its params) from the exported .npz."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    w = np.load(npz)
    p = {k.split("/")[1] + "/" + k.split("/")[2]: jnp.asarray(w[k]) for k in w.files
         if k.startswith("params/")}
    k1, k2 = p["conv1/kernel"], p["conv2/kernel"]

    class LeNet(nnx.Module):
        def __init__(self, rngs):
            size = k1.shape[:2]
            self.conv1 = nnx.Conv(k1.shape[2], k1.shape[3], size, padding="SAME", rngs=rngs)
            self.conv2 = nnx.Conv(k2.shape[2], k2.shape[3], size, padding="SAME", rngs=rngs)
            self.fc1 = nnx.Linear(*p["fc1/kernel"].shape, rngs=rngs)
            self.fc2 = nnx.Linear(*p["fc2/kernel"].shape, rngs=rngs)

        def __call__(self, x):
            x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
            x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
            x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
            return self.fc2(x)

    net = LeNet(nnx.Rngs(0))
    for name in ("conv1", "conv2", "fc1", "fc2"):
        layer = getattr(net, name)
        layer.kernel.value = p[f"{name}/kernel"]
        layer.bias.value = p[f"{name}/bias"]

    def pool(h):  # 2x2 max-pool, stride 2, on an even NHWC map
        n, hh, ww, c = h.shape
        return h.reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))

    def logits(params, x):
        for name in ("conv1", "conv2"):
            x = jax.lax.conv_general_dilated(x, params[f"{name}/kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = pool(jax.nn.relu(x + params[f"{name}/bias"]))
        x = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["fc1/kernel"] + params["fc1/bias"])
        return x @ params["fc2/kernel"] + params["fc2/bias"]

    return net, logits, p


def run_ours(form, net, logits, params, x, y, eps, batch, seed):
    import functools

    import robust_admm

    fn = net if form.startswith("nnx") else functools.partial(logits, params)
    r = robust_admm.autoattack(fn, x, y, epsilon=eps, batch_size=batch, key=seed,
                               cpu_forms=not form.endswith("-own-ops"))
    print(f"ours ({form}):\n{r}", flush=True)
    return {"after": r.accuracy_after, "member_seconds": r.member_seconds,
            "seconds": r.seconds, "clean": r.clean_accuracy}


# ----------------------------------------------------------------------------- report

def table(results, clean_torch, n, eps, logits_diff, header):
    names = list(results)
    rows = [[""] + names]
    clean = lambda k: results[k].get("clean", clean_torch)
    rows.append(["natural"] + [f"{100 * clean(k):.2f}%" for k in names])
    for m in STANDARD:
        rows.append([f"after {m}"] + [
            f"{100 * results[k]['after'].get(m, float('nan')):.2f}% "
            f"({results[k]['member_seconds'].get(m, float('nan')):.1f} s)" for k in names])
    rows.append(["wall (s)"] + [f"{results[k]['seconds']:.1f}" for k in names])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [header, f"first {n} MNIST test images, L-inf eps {eps}; logits max |jax - torch| "
             f"{logits_diff:.2e}"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    for form in ("nnx", "jnp"):
        own = form + "-own-ops"
        if form in results and own in results:
            a, b = results[form], results[own]
            per = ", ".join(f"{m} {b['member_seconds'][m] / a['member_seconds'][m]:.2f}x"
                            for m in STANDARD)
            lines.append(f"ours ({own}) / ours ({form}): {b['seconds'] / a['seconds']:.2f}x "
                         f"in all ({per}); robust accuracy {100 * a['after']['square']:.2f}% "
                         f"and {100 * b['after']['square']:.2f}%")
    for ours in OURS:
        for ref in SIDES[len(OURS):]:
            if ours in results and ref in results:
                a, b = results[ours], results[ref]
                per = ", ".join(f"{m} {b['member_seconds'][m] / a['member_seconds'][m]:.2f}x"
                                for m in STANDARD if m in a["member_seconds"]
                                and m in b["member_seconds"])
                lines.append(f"{ref} / ours ({ours}): {b['seconds'] / a['seconds']:.2f}x in all"
                             f" ({per}); robust accuracy ours - {ref}: "
                             f"{100 * (a['after']['square'] - b['after']['square']):+.2f} "
                             f"points")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--stage", default="pretrain")
    p.add_argument("--data", required=True, help="folder of the MNIST IDX files")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--jax-batch", type=int, default=0,
                   help="ours' batch_size where it differs from --batch (0: --batch): each "
                        "side at the batch it runs best at (on 2 CPU cores torch's LeNet "
                        "runs best at 500, the JAX one at 250: NOTES.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (this machine's cores)")
    p.add_argument("--sides", default=",".join(DEFAULT_SIDES),
                   help=f"some of {', '.join(SIDES)}")
    p.add_argument("--torch-python", default="")
    p.add_argument("--autoattack", default="", help="folder holding the autoattack package")
    p.add_argument("--out", default="", help="append the report to this file (and JSON to "
                                              "the same name with .json)")
    p.add_argument("--torch-side", nargs=8, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_side:
        npz, data_npz, out, eps, threads, seed, batch, sides = args.torch_side
        return torch_side(npz, data_npz, out, float(eps), int(threads), int(seed), int(batch),
                          sides.split(","))
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        p.error(f"--sides={args.sides!r}: {bad or 'none'}; allowed: {', '.join(SIDES)}")
    torch_sides = [s for s in sides if s not in OURS]
    if torch_sides and not args.torch_python:
        p.error("--torch-python is needed for the original and torchattacks sides")
    if "original" in torch_sides and not args.autoattack:
        p.error("--autoattack is needed for the original side")

    from robust_admm import data
    from robust_admm.experiments import export
    from robust_admm.experiments.workdir import load_final_state
    from robust_admm.experiments.workdir import read_config as load_config

    config = load_config(args.workdir)
    if not config.model.name.startswith("lenet"):
        p.error(f"--workdir holds a {config.model.name}; this benchmark rebuilds LeNets only")
    state = load_final_state(args.workdir, args.stage)
    test = data.load_dataset("mnist", "files", args.data).test
    x = test.images[:args.n].astype(np.float32) / 255.0
    y = test.labels[:args.n].astype(np.int32)
    tmp = tempfile.mkdtemp(prefix="aa-speed-")
    npz = os.path.join(tmp, "model.npz")
    export.export_state(config.to_dict(), state, os.path.join(tmp, "model"))
    np.savez(os.path.join(tmp, "data.npz"), x=x, y=y)

    net, logits, params = jax_models(npz)
    jnp_logits = np.asarray(logits(params, x))
    nnx_diff = float(np.abs(np.asarray(net(x)) - jnp_logits).max())
    results = {}
    for form in OURS:
        if form in sides:
            results[form] = run_ours(form, net, logits, params, x, y, args.epsilon,
                                     args.jax_batch or args.batch, args.seed)
    ref = {"clean": float((jnp_logits.argmax(1) == y).mean())}
    logits_diff = float("nan")
    if torch_sides:
        out = os.path.join(tmp, "torch.json")
        env = dict(os.environ, PYTHONPATH=args.autoattack)
        done = subprocess.run([args.torch_python, os.path.abspath(__file__), "--workdir", "-",
                               "--data", "-", "--torch-side", npz, os.path.join(tmp, "data.npz"),
                               out, str(args.epsilon), str(args.threads), str(args.seed),
                               str(args.batch), ",".join(torch_sides)], env=env)
        if done.returncode == 0:  # else report the JAX sides alone
            with open(out) as f:
                ref = json.load(f)
            logits_diff = float(np.abs(jnp_logits - np.asarray(ref["logits"])).max())
            for s in torch_sides:
                results[s] = ref[s]
        else:
            print(f"the torch side failed (exit {done.returncode}); reporting ours only",
                  file=sys.stderr)
    load = os.getloadavg()
    header = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} {config.model.name} w={config.model.width} "
              f"({args.workdir}, stage {args.stage}), batch {args.batch} (ours "
              f"{args.jax_batch or args.batch}), seed {args.seed}, "
              f"torch threads {args.threads}, {os.cpu_count()} cores, load average at the end "
              f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; logits max |nnx - jnp| {nnx_diff:.2e}")
    report = table(results, ref["clean"], args.n, args.epsilon, logits_diff, header)
    print("\n" + report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n\n")
        with open(os.path.splitext(args.out)[0] + ".json", "a") as f:
            f.write(json.dumps({"args": vars(args), "results": results}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
