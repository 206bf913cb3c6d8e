"""Shared test helpers: tiny MNIST-shaped IDX files, running the CLI, reading compiled HLO."""
import gzip
import os
import re
import struct
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The five-phase program the kill/resume tests and the rules tests share (conftest.py).
PROGRAM = "configs/mnist.py:smoke_program"
# Log every step (so a test can act at a chosen step), checkpoint every 3 steps, and a
# longer attack so that a step takes long enough for a signal to land inside its phase.
RUN_FLAGS = ["--config.log_every_steps=1", "--config.checkpoint.every_steps=3",
             "--config.attack.num_steps=30"]


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


def library_fusions(hlo_text: str) -> list[set[str]]:
    """The HLO opcodes inside each library (YNNPACK) fusion of a compiled XLA:CPU program's
    text, e.g. [{'parameter', 'dot'}, {'parameter', 'reduce', 'convolution', ...}]."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.-]+) .*\{$", line.rstrip())
        if head:
            current = bodies.setdefault(head.group(1), set())
        elif current is not None:
            op = re.search(r"=\s+(?:\([^)]*\)|\S+)\s+([\w-]+)\(", line)
            if op:
                current.add(op.group(1))
    return [bodies[m.group(1)] for line in hlo_text.splitlines() if "__ynn_fusion" in line
            for m in [re.search(r"calls=%([\w.-]+)", line)] if m]
