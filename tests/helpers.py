"""Shared test helpers: tiny MNIST-shaped IDX files and running the CLI."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(folder, rng, n_train=160, n_test=48):
    """Small random MNIST-shaped IDX files (gzip), to run the pipeline without real data."""
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        with gzip.open(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return folder


def cli_command(workdir, *overrides, config="configs/mnist.py:smoke"):
    return [sys.executable, "-m", "robust_admm.train", f"--config={config}",
            f"--workdir={workdir}", *overrides]


def run_cli(workdir, *overrides, config="configs/mnist.py:smoke"):
    return subprocess.run(cli_command(workdir, *overrides, config=config), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
