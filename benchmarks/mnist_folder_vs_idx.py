"""MNIST through the streamed path (a folder of PNGs) against the IDX files kept on the
device, same recipe: natural and PGD-40 accuracy (training's own evaluation, all 10,000
test images), AutoAttack and PGD-40 by the eval command on the first --n, and the
training speed of each.

    python benchmarks/mnist_folder_vs_idx.py --idx ../shared/data/mnist --work /tmp/cmp \
        [--epochs 2] [--n 1000] [--recipes natural,cpu_pgd_at]

Writes the PNG folder (benchmarks/mnist_to_folder.py) under --work if it is not there,
then for each recipe of configs/mnist.py trains its pretrain phase for --epochs from each
source and prints one table. The folder is read with `data.crops=resize` and
`data.channels=1`: the digits unchanged at 28 px in one channel (the PNGs hold the IDX
pixels exactly), so the two runs differ only in the order the records are drawn (the
device feed's permutation against the streamed sampler's). A run or evaluation already
in --work is reused (delete its folder to redo it).
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idx", required=True, help="folder of the four MNIST IDX files")
    p.add_argument("--work", required=True, help="folder for the PNGs and the runs")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n", type=int, default=1000, help="test images for the eval command")
    p.add_argument("--recipes", default="natural,cpu_pgd_at")
    args = p.parse_args()
    png = os.path.join(args.work, "png")
    if not os.path.isdir(png):
        run([sys.executable, "benchmarks/mnist_to_folder.py", "--idx", args.idx, "--out", png])
    sources = {
        "idx": ["--config.data.source=files", f"--config.data.dir={args.idx}"],
        "folder": ["--config.data.source=folder", f"--config.data.dir={png}",
                   "--config.data.image_size=28", "--config.data.crops=resize",
                   "--config.data.channels=1"],
    }
    rows = []
    for recipe in args.recipes.split(","):
        for source, flags in sources.items():
            workdir = os.path.join(args.work, f"{recipe}_{source}")
            run([sys.executable, "-m", "robust_admm.train",
                 f"--config=configs/mnist.py:{recipe}", f"--workdir={workdir}",
                 "--config.stages=pretrain", f"--config.pretrain.epochs={args.epochs}",
                 *flags])
            done = os.path.join(workdir, "eval", "pretrain.json")
            if not (os.path.exists(done) and json.load(open(done))["n"] == args.n):
                run([sys.executable, "-m", "robust_admm.eval", f"--workdir={workdir}",
                     "--stage=pretrain", "--attacks=pgd40,aa-standard", f"--n={args.n}",
                     "--checks=false"])
            with open(os.path.join(workdir, "summary.json")) as f:
                stage = json.load(f)["stages"]["pretrain"]
            with open(os.path.join(workdir, "eval", "pretrain.json")) as f:
                ev = json.load(f)
            rows.append((recipe, source, stage["nat_acc"], stage["adv_acc"],
                         stage["adv_attack"], ev["n"], ev["natural_acc"],
                         ev["attacks"]["pgd40"]["robust_acc"],
                         ev["attacks"]["aa-standard"]["robust_acc"], ev["epsilon"],
                         stage["speed"]["img_per_s"]))
    print("\nrecipe  source  train-eval natural  train-eval adv (attack)  | eval n  natural  "
          "PGD-40  AutoAttack (eps)  | train img/s")
    for r in rows:
        print(f"RESULT recipe={r[0]} source={r[1]} nat={100 * r[2]:.2f}% adv={100 * r[3]:.2f}% "
              f"({r[4]}) | n={r[5]} nat={100 * r[6]:.2f}% pgd40={100 * r[7]:.2f}% "
              f"aa={100 * r[8]:.2f}% eps={r[9]:g} | img/s={r[10]:.0f}")


if __name__ == "__main__":
    main()
