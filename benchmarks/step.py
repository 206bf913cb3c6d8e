"""Times the project's real adversarial training step
(robust_admm.training.step.make_train_step) with the same flags as the PyTorch peer
(torch_peer.py of the shared bench tools), and prints

    RESULT impl=robust_admm model=... width=... steps=... batch=... img/s=...

One iteration = PGD with random start (k steps), CE + ADMM penalty on every conv kernel,
gradient masking, SGD-momentum (or Adam) update, on random data shaped like MNIST
(lenet_adv), CIFAR-10 (vgg16, resnet18, resnet8, wrn28_4, wrn34_10) or ImageNet
(imagenet_resnet18, imagenet_resnet50, imagenet_vgg16_bn, alexnet_bn: 1000 classes,
`--image-size` px, default 224).
BatchNorm uses batch statistics during the attack, as in the peer. `--steps 0` times
natural training (no attack); `--dtype bfloat16` runs the model in bfloat16 (model.dtype).
`--max-seconds` stops the timed repeats once that long has passed (at least one runs).
A `--model` with a ':' is a user's flax.linen model by import path, as the config's
`model.name` (e.g. `user_lenet:LeNet` of this folder, with `benchmarks` on PYTHONPATH;
`--model-kwargs` as `model.kwargs`), timed on MNIST-shaped data with LeNet_adv's attack.

    python benchmarks/step.py --model lenet_adv --width 4 --steps 40 --batch 64 --iters 5
    python benchmarks/step.py --all --torch-python ~/torchvenv/bin/python \\
        --torch-peer ../shared/bench/torch_peer.py

`--all` runs the six reference configs, each in a fresh process, and prints a table with
compile time, images/s and the achieved GFLOP/s against the float32 matmul peak measured
in the same run (before and after each config, the larger reading); with
`--torch-python`/`--torch-peer` the peer runs alternately with ours (A B A B) and the
table gives the ratio of the medians.

`--mode eval` times evaluation under attack instead
(robust_admm.evaluation.eval_step.make_eval_step: one batch = natural accuracy, PGD with
random start, accuracy under attack; BatchNorm on its running averages, no weight
gradients; (2k + 2) forward passes of FLOPs), and `--all` then runs `torch_eval_peer.py`
of this folder as the peer.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

CONFIGS = (  # (model, width, PGD steps, batch): the reference table of the speed issue
    ("lenet_adv", 1, 40, 64), ("lenet_adv", 4, 40, 64), ("lenet_adv", 16, 40, 64),
    ("vgg16", 1, 10, 128), ("resnet18", 1, 10, 128), ("wrn28_4", 1, 10, 128),
)
CIFAR_ATTACK = (8 / 255, 2 / 255, 10, 128)
IMAGENET_ATTACK = (4 / 255, 2.5 / 255, 2, 256)  # the radius and step of configs/imagenet.py
EPS = {"lenet_adv": (0.3, 0.01, 40, 64), "vgg16": CIFAR_ATTACK, "resnet18": CIFAR_ATTACK,
       "resnet8": CIFAR_ATTACK, "wrn28_4": CIFAR_ATTACK, "wrn34_10": CIFAR_ATTACK,
       "imagenet_resnet18": IMAGENET_ATTACK,
       "imagenet_resnet50": IMAGENET_ATTACK, "imagenet_vgg16_bn": IMAGENET_ATTACK,
       "alexnet_bn": IMAGENET_ATTACK}  # epsilon, step size, default k and batch
IMAGENET_MODELS = ("imagenet_resnet18", "imagenet_resnet50", "imagenet_vgg16_bn",
                   "alexnet_bn")  # 1000 classes, --image-size px


def is_import_path(model: str) -> bool:
    """Whether `--model` names a user's model ('module:Class') rather than the zoo's."""
    return ":" in model


def image_shape(model: str, image_size: int | None = None) -> tuple:
    """(H, W, C) of the random images `model` is timed on (a user's model: MNIST's)."""
    if model in IMAGENET_MODELS:
        size = 224 if image_size is None else image_size
        return (size, size, 3)
    if image_size is not None:
        raise ValueError(f"--image-size applies to {', '.join(IMAGENET_MODELS)}, not {model}")
    return (28, 28, 1) if model == "lenet_adv" or is_import_path(model) else (32, 32, 3)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="train", choices=["train", "eval"],
                   help="train: the training step; eval: evaluation under attack")
    p.add_argument("--model", default="lenet_adv",
                   help=f"one of {', '.join(EPS)}, or a user's model 'module:Class'")
    p.add_argument("--model-kwargs", default="",
                   help="a user's model: its constructor arguments, a JSON object")
    p.add_argument("--width", type=int, default=4, help="LeNet_adv width multiplier")
    p.add_argument("--steps", type=int, default=None,
                   help="PGD steps (default 40 mnist / 10 cifar / 2 imagenet; 0: natural training)")
    p.add_argument("--batch", type=int, default=None,
                   help="default 64 mnist / 128 cifar / 256 imagenet")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the model's compute dtype (model.dtype)")
    p.add_argument("--image-size", type=int, default=None,
                   help="ImageNet models: the side of the images (default 224)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop the timed repeats once this long has passed (at least one runs)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="pin the process to this many cores (default: all)")
    p.add_argument("--opt", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rho", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pgd-loop", default="auto", choices=["auto", "fori", "host"])
    p.add_argument("--unroll", type=int, default=1, help="PGD fori_loop unroll factor")
    p.add_argument("--host-malloc", default="auto", choices=["auto", "reuse", "system"],
                   help="host malloc mode, as `python -m robust_admm.train --host_malloc`")
    p.add_argument("--cpu-convolutions", default="auto", choices=["auto", "xla", "library"],
                   help="XLA:CPU convolution runtime, as the config field cpu_convolutions")
    p.add_argument("--all", action="store_true", help="run the six reference configs")
    p.add_argument("--rounds", type=int, default=2, help="--all: A B rounds per config")
    p.add_argument("--peak-n", type=int, default=4096,
                   help="--all: matrix size of the matmul peak probe (smaller: faster, lower)")
    p.add_argument("--torch-python", default=None, help="--all: a python with torch")
    p.add_argument("--torch-peer", default=None, help="--all: path of torch_peer.py")
    p.add_argument("--torch-env", default="",
                   help="--all: extra environment for the peer, e.g. the same malloc settings: "
                        "'MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=4294967296 "
                        "MALLOC_TRIM_THRESHOLD_=68719476736'")
    p.add_argument("--only", default=None,
                   help="--all: comma-separated subset, e.g. 'lenet_adv:4,vgg16'")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 0:
        p.error(f"--steps {args.steps} must be >= 0")
    if args.model not in EPS and not is_import_path(args.model):
        p.error(f"--model {args.model!r}: allowed: {', '.join(EPS)}, or 'module:Class'")
    if args.model_kwargs and not is_import_path(args.model):
        p.error("--model-kwargs is for a user's model ('module:Class')")
    if args.mode == "eval" and args.steps == 0:
        p.error("--mode eval times evaluation under attack: --steps must be >= 1")
    try:
        image_shape(args.model, args.image_size)
    except ValueError as e:
        p.error(str(e))
    if args.threads is not None:
        cpus = sorted(os.sched_getaffinity(0))
        if not 1 <= args.threads <= len(cpus):
            p.error(f"--threads {args.threads}: this process may use 1..{len(cpus)} cores")
        os.sched_setaffinity(0, cpus[:args.threads])
    if bool(args.torch_python) != bool(args.torch_peer):
        p.error("--torch-python and --torch-peer go together (the peer's python and script)")
    return args


def forward_flops(model, variables, shape) -> int:
    """2 x the multiply-adds of the conv and dense layers in one forward pass of one image,
    from each layer's kernel and output shapes (recorded while tracing), so every conv form
    counts as the direct convolution: the rows form's banded matmul does more arithmetic
    for the same result, and counting it would overstate GFLOP/s."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from robust_admm.models import apply_model

    total = 0

    def record(next_fun, args, kwargs, context):
        nonlocal total
        out = next_fun(*args, **kwargs)
        layer = context.module
        if context.method_name == "__call__" and isinstance(layer, (nn.Conv, nn.Dense)):
            kernel = layer.variables["params"]["kernel"].shape  # (..., in, out)
            total += 2 * int(np.prod(out.shape)) * int(np.prod(kernel[:-1]))
        return out

    with nn.intercept_methods(record):
        # The variables as arguments, shapes only: the timed steps have donated them by now.
        shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                        variables)
        jax.eval_shape(lambda v, x: apply_model(model, v["params"], v.get("batch_stats", {}),
                                                x, train=False)[0], shapes,
                       jax.ShapeDtypeStruct((1,) + shape, jnp.float32))
    return total


def matmul_peak(n: int = 4096) -> float:
    """Best-of-5 float32 matmul GFLOP/s on this machine, the larger of XLA's and numpy's."""
    import jax
    import numpy as np
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    f = jax.jit(lambda a, b: a @ b)
    ja, jb = jax.device_put(a), jax.device_put(b)
    best = {}
    for name, fn in (("numpy", lambda: a @ b), ("jax", lambda: f(ja, jb).block_until_ready())):
        fn()
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        best[name] = 2 * n ** 3 / min(t) / 1e9
    return max(best.values())


def run_one(args):
    from robust_admm.runtime import host_memory
    malloc_note = host_memory.configure(  # before JAX starts its threads
        host_memory.resolve(args.host_malloc, args.model))
    import jax

    from robust_admm.runtime.compiler import resolve_pgd_loop

    r = measure(args)
    print(f"compile+first step {r['compile_s']:.1f} s; img/s per repeat "
          f"{', '.join(f'{x:.1f}' for x in r['rates'])}; backend {jax.default_backend()}, "
          f"pgd loop {resolve_pgd_loop(args.pgd_loop)}, cpu convolutions "
          f"{args.cpu_convolutions}; {malloc_note}")
    print(f"RESULT impl=robust_admm mode={args.mode} model={args.model} width={r['width']} "
          f"steps={r['steps']} batch={r['batch']} dtype={args.dtype} "
          f"compile_s={r['compile_s']:.1f} gflop_per_img={r['gflop_per_img']:.4f} "
          f"gflops={r['img_per_s'] * r['gflop_per_img']:.1f} img/s={r['img_per_s']:.2f}",
          flush=True)


def setting(args) -> tuple:
    """(epsilon, step size, PGD steps, batch) of `args`, the model's defaults filled in."""
    eps, step_size, k_def, b_def = EPS["lenet_adv" if is_import_path(args.model) else args.model]
    return (eps, step_size, k_def if args.steps is None else args.steps,
            b_def if args.batch is None else args.batch)


def make_model(args):
    """(model, initial variables, image shape, width) that `args` describe: 10 classes,
    1000 for the ImageNet models."""
    import jax

    from robust_admm.models import get_model

    shape = image_shape(args.model, args.image_size)
    width = args.width if args.model == "lenet_adv" else 1
    classes = 1000 if args.model in IMAGENET_MODELS else 10
    model = get_model(args.model, classes, width, args.dtype, kwargs=args.model_kwargs)
    # One compiled program: run eagerly, the init compiles each of its small operations.
    variables = jax.jit(model.init)(jax.random.PRNGKey(args.seed),
                                    jax.numpy.zeros((1,) + shape))
    return model, variables, shape, width


def measure(args) -> dict:
    """Times the step `args` describe on a random split of 4 batches kept on the device:
    compile_s (compilation and the first step), img/s of each timed repeat (`rates`) and
    their median (`img_per_s`), the FLOPs of an image (`gflop_per_img`); width, steps and
    batch as run."""
    import jax
    import numpy as np

    eps, step_size, steps, batch = setting(args)
    model, variables, shape, width = make_model(args)
    classes = 1000 if args.model in IMAGENET_MODELS else 10
    rng = np.random.default_rng(args.seed)
    images = jax.numpy.asarray(rng.integers(0, 256, (batch * 4,) + shape, dtype=np.uint8))
    labels = jax.numpy.asarray(rng.integers(0, classes, batch * 4).astype(np.int32))
    make = _eval_iteration if args.mode == "eval" else _train_iteration
    iteration, compilations, passes = make(args, model, variables, images, labels,
                                          (eps, step_size, steps, batch))

    t = time.perf_counter()
    iteration()
    compile_s = time.perf_counter() - t
    compiled = compilations()
    for _ in range(args.warmup):
        iteration()
    rates = []
    t_timed = time.perf_counter()
    for _ in range(args.repeats):
        if (rates and args.max_seconds is not None
                and time.perf_counter() - t_timed > args.max_seconds):
            break
        t = time.perf_counter()
        for _ in range(args.iters - 1):
            iteration(block=False)
        iteration()  # waits for the last result
        rates.append(batch * args.iters / (time.perf_counter() - t))
    assert compilations() == compiled, "the step recompiled"
    flops = passes * forward_flops(model, variables, shape)
    return {"compile_s": compile_s, "rates": rates, "img_per_s": statistics.median(rates),
            "gflop_per_img": flops / 1e9, "width": width, "steps": steps, "batch": batch}


def train_state_and_step(args, model, variables, attack_setting, feed="device", mesh=None):
    """The train state and `make_train_step`'s step the benchmark runs: ADMM auxiliaries
    on every conv kernel, as the peer; natural training when the setting has 0 PGD steps;
    `feed` and `mesh` as make_train_step takes them (the state is replicated on `mesh`)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from robust_admm.compression import rules as rules_lib
    from robust_admm.compression import transforms
    from robust_admm.experiments.config_base import stage_config
    from robust_admm.runtime import parallel
    from robust_admm.training import optim
    from robust_admm.training.attack import make_attack
    from robust_admm.training.state import TrainState
    from robust_admm.training.step import make_train_step

    eps, step_size, steps, batch = attack_setting
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    lr = args.lr if args.lr is not None else (0.01 if args.opt == "sgd" else 1e-3)
    cfg = stage_config(epochs=1, lr=lr, optimizer=args.opt, schedule="constant")
    schedule = optim.make_schedule(cfg, 1)
    specs = rules_lib.match_rules(params, {"*conv*": {"kind": "irregular", "ratio": 0.5}})
    # The CLI's admm phase: the optimizer inside `admm_phase` (its Z/U update not due
    # within a benchmark, as in all but one step of an interval).
    tx = transforms.admm_phase(optim.make_optimizer(cfg, schedule), specs,
                               update_every=10**9, rho=args.rho)
    attack = make_attack(ml_collections.ConfigDict(dict(
        epsilon=eps, step_size=step_size, num_steps=steps, random_start=True, loss="ce",
        unroll=args.unroll)), "adversarial" if steps else "natural")
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params),
        masks=jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params),
        key=jax.random.PRNGKey(1))
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    train_step = make_train_step(model, tx, attack, batch, schedule, mesh, pgd_loop=args.pgd_loop,
                                 cpu_convolutions=args.cpu_convolutions, feed=feed)
    return state, train_step


def _train_iteration(args, model, variables, images, labels, attack_setting):
    """One training iteration of `make_train_step` on the held state, its count of
    compiled programs, and its cost in forward passes: k PGD steps of forward + input gradient, and
    the training pass (forward, input and weight gradients), (2k + 3) in all."""
    import jax
    import numpy as np

    steps = attack_setting[2]
    state, train_step = train_state_and_step(args, model, variables, attack_setting)

    def iteration(block=True):
        nonlocal state
        state, metrics = train_step(state, (images, labels))
        if block:
            jax.block_until_ready((state, metrics))
            assert np.isfinite(float(metrics["loss"])), "the benchmark step diverged"

    return iteration, train_step.compilations, 2 * steps + 3


def _eval_iteration(args, model, variables, images, labels, attack_setting):
    """One batch of `make_eval_step` (natural accuracy, PGD with random start, accuracy
    under attack; BatchNorm on running averages, no weight gradients), its count of
    compiled programs, and its cost in forward passes: (2k + 2)."""
    import jax

    from robust_admm.attacks import Pgd
    from robust_admm.evaluation.eval_step import make_eval_step

    eps, step_size, steps, batch = attack_setting
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    eval_step = make_eval_step(model, Pgd(eps, step_size, steps), pgd_loop=args.pgd_loop,
                               cpu_convolutions=args.cpu_convolutions)
    x, y = images[:batch], labels[:batch]
    valid = jax.numpy.ones(batch, bool)
    key = jax.random.PRNGKey(1)
    done = 0

    def iteration(block=True):
        nonlocal done
        counts = eval_step(params, batch_stats, x, y, valid, jax.random.fold_in(key, done))
        done += 1
        if block:
            assert all(0 <= int(c) <= batch for c in counts.values()), counts

    return iteration, eval_step.compilations, 2 * steps + 2


def _result(cmd, env=None) -> dict:
    """Runs a benchmark command (with `env` added to the environment) and parses its
    RESULT line into a dict."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n"
                           f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return dict(re.findall(r"(\S+?)=(\S+)", lines[-1]))


def run_all(args):
    configs = CONFIGS
    if args.only:
        wanted = set(args.only.split(","))
        configs = [c for c in CONFIGS if c[0] in wanted or f"{c[0]}:{c[1]}" in wanted]
        if not configs:
            raise SystemExit(f"--only {args.only!r} matches none of "
                             f"{[f'{m}:{w}' for m, w, _, _ in CONFIGS]}")
    print(f"mode {args.mode}; the float32 matmul peak (best of 5, n={args.peak_n}, max of "
          "numpy and XLA) is measured before and after each config's runs and the larger reading "
          "used: the machine's speed drifts", flush=True)
    me = [sys.executable, os.path.abspath(__file__), "--mode", args.mode, "--iters", str(args.iters),
          "--repeats", str(args.repeats), "--warmup", str(args.warmup),
          "--pgd-loop", args.pgd_loop, "--opt", args.opt, "--rho", str(args.rho),
          "--host-malloc", args.host_malloc, "--cpu-convolutions", args.cpu_convolutions]
    try:
        torch_env = dict(kv.split("=", 1) for kv in args.torch_env.split())
    except ValueError:
        raise SystemExit(f"--torch-env {args.torch_env!r}: expected KEY=VALUE pairs") from None
    timing = ["--iters", str(args.iters), "--warmup", str(args.warmup)]
    if args.mode == "eval":
        peer_cmd = [args.torch_python, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "torch_eval_peer.py"), "--torch-peer", args.torch_peer, *timing]
    else:
        peer_cmd = [args.torch_python, args.torch_peer, *timing, "--opt", args.opt,
                    "--rho", str(args.rho)]
    rows = []
    for model, width, steps, batch in configs:
        flags = ["--model", model, "--width", str(width), "--steps", str(steps),
                 "--batch", str(batch)]
        before = matmul_peak(args.peak_n)
        print(f"  {model} w={width}: matmul peak before {before:.1f} GFLOP/s", flush=True)
        ours, peer = [], []
        for _ in range(args.rounds):  # A B A B
            ours.append(_result(me + flags))
            print(f"  {model} w={width}: robust_admm {ours[-1]['img/s']} img/s", flush=True)
            if args.torch_python:
                peer.append(_result(peer_cmd + flags, torch_env))
                print(f"  {model} w={width}: {peer[-1]['impl']} {peer[-1]['img/s']} img/s",
                      flush=True)
        after = matmul_peak(args.peak_n)
        # The larger reading: one taken in a slow moment would overstate "% of peak"
        # (a VGG-16 eval row once read 108% of a peak measured low just before it).
        peak = max(before, after)
        print(f"  {model} w={width}: matmul peak after {after:.1f} GFLOP/s", flush=True)
        rate = statistics.median(float(r["img/s"]) for r in ours)
        gflop = float(ours[0]["gflop_per_img"])
        row = dict(config=f"{model} w={width} PGD-{steps} b={batch}", rate=rate, peak=peak,
                   compile_s=statistics.median(float(r["compile_s"]) for r in ours),
                   gflops=rate * gflop)
        if peer:
            row["torch"] = statistics.median(float(r["img/s"]) for r in peer)
        rows.append(row)
    head = "| config | compile s | img/s | GFLOP/s | peak | % of peak |"
    sep = "|---|---|---|---|---|---|"
    if args.torch_python:
        head += " torch img/s | torch % of peak | ratio |"
        sep += "---|---|---|"
    print("\n" + head + "\n" + sep)
    for r in rows:
        line = (f"| {r['config']} | {r['compile_s']:.1f} | {r['rate']:.2f} | {r['gflops']:.1f} |"
                f" {r['peak']:.1f} | {100 * r['gflops'] / r['peak']:.0f}% |")
        if "torch" in r:
            tg = r["torch"] * r["gflops"] / r["rate"]
            line += f" {r['torch']:.2f} | {100 * tg / r['peak']:.0f}% | {r['rate'] / r['torch']:.2f}x |"
        print(line)


if __name__ == "__main__":
    a = parse()
    run_all(a) if a.all else run_one(a)
