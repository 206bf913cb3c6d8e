"""Where a run's PGD-to-AutoAttack gap comes from: every stage under several attacks.

    python benchmarks/robustness_gap.py --workdir runs/mnist --data ../shared/data/mnist \
        --n 500 --attacks pgd40:0.01,pgd40,pgd100,apgd-ce,apgd-dlr,apgd-ce+apgd-t

For each finished stage of the run (or --stages), the natural accuracy and the robust
accuracy under each attack on the first n test images, at the dataset's standard epsilon.
`pgdN:S` is PGD-N with step S (plain `pgdN` takes 2.5 * eps / N); `a+b` is an ensemble
(b runs only on the points a left robust). Prints one table row per stage and writes the
rows as JSON lines to --out if given.
"""
import argparse
import json
import os
import time

import jax
import numpy as np

from robust_admm import data
from robust_admm.evaluation.robustness import Evaluator
from robust_admm.evaluation.robustness import robust_accuracy
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.evaluate import default_epsilon
from robust_admm.experiments.workdir import read_config as load_config
from robust_admm.models import get_model
from robust_admm.runtime import parallel
from robust_admm.training import program


def parse_spec(spec: str):
    """'pgd40:0.01' -> ('pgd40:0.01', ('pgd40',), 0.01); 'a+b' -> ('a+b', ('a', 'b'), None)."""
    name, _, step = spec.partition(":")
    return spec, tuple(name.split("+")), float(step) if step else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--stages", default="", help="comma-separated (default: every finished one)")
    p.add_argument("--data", default="")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--attacks", default="pgd40:0.01,pgd40,pgd100,apgd-ce,apgd-dlr,apgd-ce+apgd-t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    config = load_config(a.workdir)
    stages = a.stages.split(",") if a.stages else [
        p.name for p in program.parse_program(config)
        if os.path.isdir(workdir_lib.stage_dir(a.workdir, p.name))]
    ds = data.load_dataset(config.data.name, config.data.source, a.data or config.data.dir or None)
    x = ds.test.images[:a.n].astype(np.float32) / 255.0
    y = ds.test.labels[:a.n]
    eps = default_epsilon(config, "linf")
    model = get_model(config.model.name, ds.num_classes, config.model.width)
    specs = [parse_spec(s) for s in a.attacks.split(",")]
    rows = []
    for stage in stages:
        state = workdir_lib.load_final_state(a.workdir, stage)
        ev = Evaluator(model, state["params"], state.get("batch_stats") or {}, a.batch,
                       parallel.make_mesh(), config.attack.loop, config.cpu_convolutions,
                       log=lambda *_: None)
        correct = ev.correct(x, y)
        row = {"stage": stage, "n": len(y), "epsilon": eps, "natural": float(correct.mean())}
        for label, members, step in specs:
            t0 = time.perf_counter()
            r = robust_accuracy(ev, x, y, [(label, members)], eps, jax.random.PRNGKey(a.seed),
                                ds.num_classes, step / eps if step else None, correct)
            row[label] = r["attacks"][label]["robust_acc"]
            row[label + " s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(" ".join(f"{k}={100 * v:.2f}" if isinstance(v, float) and k not in ("epsilon",)
                       and not k.endswith(" s") else f"{k}={v}" for k, v in row.items()),
              flush=True)
    if a.out:
        with open(a.out, "a") as f:
            for row in rows:
                f.write(json.dumps({"workdir": a.workdir, **row}) + "\n")


if __name__ == "__main__":
    main()
