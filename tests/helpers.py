"""Shared test helpers: tiny MNIST- and CIFAR-shaped files, folders of images, running the
CLI, killing and resuming it, reading compiled HLO and jaxprs."""
import gzip
import json
import os
import re
import struct
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from robust_admm.experiments import workdir as workdir_lib

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


def write(path, payload: bytes, gz: bool = False) -> str:
    """`payload` to `path` (gzipped to `path`.gz with `gz`); the path written."""
    path = os.fspath(path) + (".gz" if gz else "")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    return path


def make_cifar(folder, counts=(3, 2, 4, 1, 2), n_test=3, seed=0, gz=False):
    """CIFAR-10 binary-version files of random records (`counts` per training batch), as
    {file name: (images NHWC, labels)}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for fname, n in zip(names, list(counts) + [n_test]):
        chw = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        records = np.concatenate([labels[:, None], chw.reshape(n, -1)], axis=1)
        write(os.path.join(folder, fname), records.tobytes(), gz=gz)
        out[fname] = (chw.transpose(0, 2, 3, 1), labels)
    return out


def cli_command(workdir, *overrides, config="configs/mnist.py:smoke"):
    return [sys.executable, "-m", "robust_admm.train", f"--config={config}",
            f"--workdir={workdir}", *overrides]


def run_cli(workdir, *overrides, config="configs/mnist.py:smoke"):
    return subprocess.run(cli_command(workdir, *overrides, config=config), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def has_checkpoint(workdir, stage) -> bool:
    """A finished (renamed to its step number) checkpoint of `stage` is on disk."""
    path = workdir_lib.stage_dir(workdir, stage)
    return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def run_and_signal(workdir, flags, stage, step, sig, after_checkpoint=False, config=PROGRAM):
    """Runs the CLI and sends `sig` once it has logged `step` of `stage`; with
    `after_checkpoint`, at the first logged step from `step` on at which a finished
    checkpoint of the stage is on disk (checkpoints are written asynchronously, so one
    may still be in flight at `step`), or at the stage's last step if none is."""
    proc = subprocess.Popen(cli_command(workdir, *flags, config=config), cwd=ROOT,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:
        out.append(line)
        logged = re.match(rf"\[{stage}\] epoch \S+ step (\d+)/(\d+) ", line)
        if logged and int(logged[1]) >= step and (
                not after_checkpoint or has_checkpoint(workdir, stage)
                or logged[1] == logged[2]):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=600)
    return proc.returncode, "".join(out) + rest


def assert_same_results(workdir, reference_dir, phases=None):
    """The final states, summary and metrics of `phases` (None: every phase the reference
    ran) equal the reference's bit for bit (the whole summary file when all phases ran)."""
    def summary(path):  # all but the measured speed
        with open(os.path.join(path, "summary.json"), "rb") as f:
            s = json.load(f)
        for r in s["stages"].values():
            r.pop("speed")
        return s
    a, b = summary(workdir), summary(reference_dir)
    if phases is None:
        phases = list(b["stages"])
        assert a == b
    else:
        a, b = a["stages"], b["stages"]
        assert list(a) == list(phases) and all(a[p] == b[p] for p in phases)
    for stage in phases:
        a = workdir_lib.load_final_state(workdir, stage)
        b = workdir_lib.load_final_state(reference_dir, stage)
        for part in ("params", "masks", "batch_stats", "opt_state", "key", "step"):
            jax.tree_util.tree_map(np.testing.assert_array_equal, a[part], b[part])

    def records(path):
        with open(os.path.join(path, "metrics.jsonl")) as f:
            lines = [json.loads(line) for line in f]
        keep = ("stage", "step", "kind", "loss", "nat_acc", "adv_acc", "rho")
        return [{k: v for k, v in r.items() if k in keep or k.startswith("primal")}
                for r in lines if r["kind"] != "done" and r["stage"] in phases]
    assert records(workdir) == records(reference_dir)


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


def primitives(fn, *args) -> list[str]:
    """The names of every primitive `fn` binds, sub-jaxprs included."""
    names = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.append(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


def rgb_noise(h, w, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_folder(root, classes=("cat", "dog", "ant"), per_class=2, fmt="PNG"):
    for split in ("train", "val"):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(per_class):
                ext = "png" if fmt == "PNG" else "jpg"
                Image.fromarray(rgb_noise(8, 8, i)).save(
                    os.path.join(root, split, c, f"{i}.{ext}"), format=fmt)
    return root


def write_images(root, per_class=(16, 6), seed=0):
    """Three classes, each showing in its colour; sizes 40-100 px, colour modes RGB, L,
    P, RGBA, CMYK, as JPEG and PNG."""
    rng = np.random.default_rng(seed)
    modes = ("RGB", "L", "P", "RGBA", "CMYK")
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(("ant", "bee", "cat")):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(40, 100)), int(rng.integers(40, 100))
                a = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
                a[..., c] = 255
                mode = modes[i % len(modes)]
                fmt = "JPEG" if mode == "CMYK" or (mode in ("RGB", "L") and i % 2) else "PNG"
                Image.fromarray(a).convert(mode).save(
                    os.path.join(root, split, name, f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"),
                    format=fmt)
    return root


def smoke_config(idx_dir, **overrides):
    """The MNIST :smoke config on IDX files in `idx_dir`, with dotted-path overrides
    (e.g. `**{"prune.ratios": "conv2=0.5"}`)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from configs import mnist as mnist_config
    cfg = mnist_config.get_config("smoke")
    cfg.data.source, cfg.data.dir = "files", idx_dir
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
