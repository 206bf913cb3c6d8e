"""Our AutoAttack (standard ensemble) against the reference AutoAttack on the same model.

    python benchmarks/autoattack_vs_reference.py --workdir runs/mnist --stage retrain \
        --data ../shared/data/mnist --n 1000 --epsilon 0.3 \
        --torch-python /path/to/torch-venv/bin/python --autoattack /path/to/auto-attack

Exports the stage's model (robust_admm.export), runs our `aa-standard` on the first n
test images (host-driven loops on CPU), then, in a subprocess of a separate PyTorch
environment, rebuilds the LeNet from the exported .npz alone and runs the reference
`AutoAttack(version='standard')` on the same images. Prints the natural accuracy and the
robust accuracy after each attack for both, and both wall times. PyTorch and the
reference are never dependencies of the project: they live in that other environment.
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

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


def torch_lenet(npz, data_npz):
    """In the PyTorch environment: (the LeNet rebuilt from the exported .npz alone, images
    NCHW, labels) of the saved test images."""
    import torch
    import torch.nn.functional as F

    w = np.load(npz)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    conv = lambda n: (t(w[f"params/{n}/kernel"].transpose(3, 2, 0, 1)), t(w[f"params/{n}/bias"]))
    dense = lambda n: (t(w[f"params/{n}/kernel"].T), t(w[f"params/{n}/bias"]))
    (w1, b1), (w2, b2), (w3, b3), (w4, b4) = conv("conv1"), conv("conv2"), dense("fc1"), dense("fc2")
    pad = w1.shape[-1] // 2  # 'SAME' for the odd kernels of LeNet_adv

    class LeNet(torch.nn.Module):
        def forward(self, x):  # NCHW; flattened in NHWC order as the flax LeNet
            h = F.max_pool2d(F.relu(F.conv2d(x, w1, b1, padding=pad)), 2)
            h = F.max_pool2d(F.relu(F.conv2d(h, w2, b2, padding=pad)), 2)
            h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
            return F.linear(F.relu(F.linear(h, w3, b3)), w4, b4)

    d = np.load(data_npz)
    x, y = t(d["x"].transpose(0, 3, 1, 2)), t(d["y"]).long()
    model = LeNet().eval()
    return model, x, y


def torch_side(npz, data_npz, out_json, eps, threads, seed):
    """Runs in the PyTorch environment: LeNet from the export, reference AutoAttack."""
    import torch
    from autoattack import AutoAttack

    torch.set_num_threads(threads)
    model, x, y = torch_lenet(npz, data_npz)
    with torch.no_grad():
        logits = model(x).numpy()
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
    aa.run_standard_evaluation(x, y, bs=500)
    seconds = time.perf_counter() - t0
    after = {}
    for s in lines:
        m = re.match(r"robust accuracy after (\S+): ([\d.]+)%", s)
        if m:
            after[m.group(1).lower()] = float(m.group(2)) / 100
    with open(out_json, "w") as f:
        json.dump({"after": after, "seconds": seconds, "logits": logits.tolist(),
                   "clean": float((logits.argmax(1) == y.numpy()).mean())}, f)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--stage", default="retrain")
    p.add_argument("--data", required=True, help="folder of the MNIST IDX files")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--epsilon", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (this machine's cores)")
    p.add_argument("--torch-python", required=True)
    p.add_argument("--autoattack", required=True, help="folder holding the autoattack package")
    p.add_argument("--out", default="", help="also write the comparison as JSON here")
    p.add_argument("--torch-side", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_side:
        npz, data_npz, out, eps, threads, seed = args.torch_side
        return torch_side(npz, data_npz, out, float(eps), int(threads), int(seed))

    import jax
    from robust_admm import data
    from robust_admm.attacks import suite
    from robust_admm.evaluation import robustness
    from robust_admm.experiments import export
    from robust_admm.experiments.workdir import load_final_state
    from robust_admm.experiments.workdir import read_config as load_config
    from robust_admm.models import get_model

    config = load_config(args.workdir)
    state = load_final_state(args.workdir, args.stage)
    test = data.load_dataset("mnist", "files", args.data).test
    x = test.images[:args.n].astype(np.float32) / 255.0
    y = test.labels[:args.n]
    tmp = tempfile.mkdtemp(prefix="aa-compare-")
    export.export_state(config.to_dict(), state, os.path.join(tmp, "model"))
    np.savez(os.path.join(tmp, "data.npz"), x=x, y=y)

    model = get_model(config.model.name, 10, config.model.width)
    ev = robustness.Evaluator(model, state["params"], state.get("batch_stats") or {},
                              args.batch)
    t0 = time.perf_counter()
    ours = robustness.robust_accuracy(ev, x, y, suite.parse("aa-standard"), args.epsilon,
                                      jax.random.PRNGKey(args.seed))
    ours_s = time.perf_counter() - t0

    out = os.path.join(tmp, "reference.json")
    env = dict(os.environ, PYTHONPATH=args.autoattack)
    subprocess.run([args.torch_python, os.path.abspath(__file__), "--workdir", "-", "--data",
                    "-", "--torch-python", "-", "--autoattack", "-", "--torch-side",
                    os.path.join(tmp, "model.npz"), os.path.join(tmp, "data.npz"), out,
                    str(args.epsilon), str(args.threads), str(args.seed)],
                   check=True, env=env)
    with open(out) as f:
        ref = json.load(f)
    from robust_admm.models import apply_model
    logits = np.asarray(apply_model(model, state["params"], state.get("batch_stats") or {},
                                    x, train=False)[0])
    ens = ours["attacks"]["aa-standard"]
    rows = [("", "ours", "reference", "difference (points)")]
    rows.append(("natural", f"{100 * ours['natural_acc']:.2f}%", f"{100 * ref['clean']:.2f}%",
                 f"{100 * (ours['natural_acc'] - ref['clean']):+.2f}"))
    for name in STANDARD:
        a, b = ens["after"][name], ref["after"].get(name, float("nan"))
        rows.append((f"after {name}", f"{100 * a:.2f}%", f"{100 * b:.2f}%",
                     f"{100 * (a - b):+.2f}"))
    rows.append(("wall time (s)", f"{ours_s:.0f}", f"{ref['seconds']:.0f}",
                 f"ours / reference = {ours_s / ref['seconds']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"\n{config.model.name} w={config.model.width}, stage {args.stage}, first {args.n} "
          f"MNIST test images, eps {args.epsilon}; logits max |ours - torch| "
          f"{np.abs(logits - np.asarray(ref['logits'])).max():.2e}")
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"ours": ours, "ours_seconds": ours_s,
                       "reference": {k: v for k, v in ref.items() if k != "logits"}}, f,
                      indent=2)


if __name__ == "__main__":
    sys.exit(main())
