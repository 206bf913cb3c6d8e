"""Where one PGD step's time goes on XLA:CPU: the step (forward + input gradient, with
BatchNorm in train mode as during training) is traced with the JAX profiler and the
XLA:CPU per-op events are summed by op kind.

    python benchmarks/profile_pgd_step.py --model vgg16
    python benchmarks/profile_pgd_step.py --model lenet_adv --width 4

Needs XLA's per-op trace events, so it sets `--xla_cpu_enable_xprof_traceme=true` in
XLA_FLAGS before JAX starts. It applies the host malloc mode before that too, as
`benchmarks/step.py` does (`--host-malloc`, default 'auto': 'reuse' for the CIFAR models):
under the C library's defaults every program call faults its buffers in afresh, which
makes the elementwise ops that first touch them slower than in the timed step (NOTES.md,
24). Op names are XLA's (`ynn_fusion`: library-backed convolutions and matmuls;
`*_fusion`: generated elementwise/reduction loops).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

from robust_admm.runtime import host_memory

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16", choices=["lenet_adv", "vgg16", "resnet18"])
    p.add_argument("--width", type=int, default=4, help="LeNet_adv width multiplier")
    p.add_argument("--batch", type=int, default=None, help="default 64 mnist / 128 cifar")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--cpu-convolutions", default="auto", choices=["auto", "xla", "library"],
                   help="as the config field cpu_convolutions")
    p.add_argument("--host-malloc", default="auto", choices=list(host_memory.MODES),
                   help="as benchmarks/step.py's flag ('auto': 'reuse' for vgg16/resnet18)")
    args = p.parse_args()
    print(host_memory.configure(  # before JAX starts its threads
        host_memory.resolve(args.host_malloc, args.model)))
    import jax
    import jax.numpy as jnp

    from robust_admm import attacks
    from robust_admm.models import get_model
    from robust_admm.runtime import compiler
    from robust_admm.training.step import attack_logits_fn

    mnist = args.model == "lenet_adv"
    batch = args.batch or (64 if mnist else 128)
    shape = (batch, 28, 28, 1) if mnist else (batch, 32, 32, 3)
    model = get_model(args.model, 10, args.width if mnist else 1)
    x = jax.random.uniform(jax.random.PRNGKey(0), shape)
    y = jnp.arange(batch) % 10
    variables = model.init(jax.random.PRNGKey(1), x[:1])
    pgd = attacks.Pgd(epsilon=0.3 if mnist else 8 / 255, step_size=0.01, num_steps=1)
    state = pgd.init(None, x, y, jax.random.PRNGKey(2))
    step = jax.jit(lambda v, s: pgd.step(
        attack_logits_fn(model, v["params"], v.get("batch_stats", {})), s, x, y),
        compiler_options=compiler.compiler_options(args.cpu_convolutions))
    for _ in range(3):
        jax.block_until_ready(step(variables, state))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.iters):
                jax.block_until_ready(step(variables, state))
        events = json.load(gzip.open(glob.glob(f"{d}/**/*.json.gz", recursive=True)[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_kind, count, wall = collections.Counter(), collections.Counter(), 0.0
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e["name"]
        if name == "ThunkExecutor::Execute (wait for completion)":
            wall += e["dur"]
        if name.startswith("$") or "::" in name or "PjitFunction" in name:
            continue  # host-side and runtime frames, not XLA ops
        kind = re.sub(r"[._]?\d+$", "", name)
        by_kind[kind] += e["dur"]
        count[kind] += 1
    per = 1e3 * args.iters
    print(f"{args.model}, batch {batch}: one PGD step {wall / per:.2f} ms "
          f"(ops sum {sum(by_kind.values()) / per:.2f} ms)")
    for kind, t in by_kind.most_common(args.top):
        print(f"  {t / per:8.2f} ms  {count[kind] // args.iters:4d} ops  {kind}")


if __name__ == "__main__":
    main()
