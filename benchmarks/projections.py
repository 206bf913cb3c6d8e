"""Micro-benchmark: project every kernel of a ResNet-50-sized tree (~25.5M weights).

Builds ``{layer: {"kernel": w}}`` with the kernel shapes of ResNet-50 (conv stem,
bottleneck blocks [3, 4, 6, 3] with 1x1 downsample convs, 2048x1000 fc), random normal
values, and times ``jax.jit(project_tree)`` for several compression kinds on the
default backend.  Compile time is reported separately from the median of timed runs.

    python benchmarks/projections.py [--repeats 5] [--kinds irregular filter quantize4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from robust_admm.compression.rules import project_tree

SPECS = {
    "irregular": {"kind": "irregular", "ratio": 0.9},
    "filter": {"kind": "filter", "ratio": 0.5},
    "column": {"kind": "column", "ratio": 0.5},
    "channel": {"kind": "channel", "ratio": 0.5},
    "nm24": {"kind": "nm", "n": 2, "m": 4},  # all but the stem (3 input channels)
    "quantize4": {"kind": "quantize", "bits": 4},
    "ternary": {"kind": "quantize", "bits": 2},
    "quantize4_sparse": {"kind": "quantize", "bits": 4, "sparsity": "irregular", "ratio": 0.5},
}


def resnet50_kernel_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"conv1": (7, 7, 3, 64)}
    cin = 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            name = f"layer{stage}_{b}"
            shapes[f"{name}/conv1"] = (1, 1, cin, width)
            shapes[f"{name}/conv2"] = (3, 3, width, width)
            shapes[f"{name}/conv3"] = (1, 1, width, 4 * width)
            if b == 0:
                shapes[f"{name}/downsample"] = (1, 1, cin, 4 * width)
            cin = 4 * width
    shapes["fc"] = (2048, 1000)
    return shapes


def build_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params: dict = {}
    for path, shape in resnet50_kernel_shapes().items():
        node = params
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node["kernel"] = jax.numpy.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.05)
    return params


def bench(params, spec: dict, repeats: int) -> tuple[float, float]:
    rules = {"layer*": spec, "fc": spec} if spec["kind"] == "nm" else {"*": spec}
    fn = jax.jit(lambda p: project_tree(p, rules))
    t0 = time.perf_counter()
    compiled = fn.lower(params).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", nargs="+", default=["irregular", "filter", "quantize4"], choices=list(SPECS))
    args = ap.parse_args()
    params = build_params()
    leaves = jax.tree.leaves(params)
    n = sum(x.size for x in leaves)
    print(f"backend={jax.default_backend()} devices={jax.devices()} kernels={len(leaves)} weights={n:,}")
    for kind in args.kinds:
        compile_s, run_s = bench(params, SPECS[kind], args.repeats)
        print(
            f"{kind:18s} {SPECS[kind]}\n{'':18s} compile {compile_s:7.2f} s   "
            f"median of {args.repeats} runs {run_s:7.3f} s   ({n / run_s / 1e6:.1f} M weights/s)"
        )


if __name__ == "__main__":
    main()
