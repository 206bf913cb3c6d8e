"""CPU inference of a filter/channel-pruned LeNet: the masked model (full size, zeros in
place) against the shrunk dense model of `robust_admm.export.shrink` (pruned units gone).

Both are jitted and timed in the same run, alternately, on one batch of random pixels;
the median of the repeats is reported, with parameter counts and the largest logit
difference between the two.

    python benchmarks/export_speed.py --workdir runs/mnist_filter --stage retrain
    python benchmarks/export_speed.py --demo --ratio 0.5   # random LeNet_adv w=4
"""
import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from robust_admm.compression import projections
from robust_admm.compression import size as size_lib
from robust_admm.experiments import export
from robust_admm.experiments import shrink as shrink_lib
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.models import apply_model
from robust_admm.models import conv, get_model


def demo_model(width: int, ratio: float, bias_std: float, seed: int = 0):
    """A random LeNet_adv with a fraction `ratio` of the filters of conv1, conv2 and fc1
    projected away (largest-norm units kept) and random biases (trained ones are not zero)."""
    model = get_model("lenet_adv", 10, width)
    params = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 28, 28, 1)))["params"]
    rng = np.random.default_rng(seed)
    masks = {}
    out = {}
    for name, layer in params.items():
        kernel, mask = np.asarray(layer["kernel"]), np.ones(layer["kernel"].shape, bool)
        if name != "fc2":
            kernel, mask = map(np.asarray, projections.project_leaf(kernel, "filter",
                                                                    ratio=ratio))
        out[name] = {"kernel": kernel,
                     "bias": rng.normal(0, bias_std, layer["bias"].shape).astype(np.float32)}
        masks[name] = {"kernel": mask, "bias": np.ones(layer["bias"].shape, bool)}
    return model, out, masks, (28, 28, 1)


def workdir_model(workdir: str, stage: str):
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    shape, classes = export.INPUTS[cfg["data"]["name"]]
    state = workdir_lib.load_final_state(workdir, stage)
    model = get_model(cfg["model"]["name"], classes, cfg["model"]["width"])
    return model, state["params"], state["masks"], shape


def time_pair(fns: dict, x, repeats: int) -> dict:
    """Median seconds per call of each jitted fn, calls interleaved (same conditions)."""
    for fn in fns.values():
        fn(x).block_until_ready()  # compile
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x).block_until_ready()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir")
    src.add_argument("--demo", action="store_true")
    ap.add_argument("--stage", default="retrain")
    ap.add_argument("--width", type=int, default=4, help="--demo: LeNet_adv width")
    ap.add_argument("--ratio", type=float, default=0.5, help="--demo: filters removed")
    ap.add_argument("--bias-std", type=float, default=0.1, help="--demo: random biases")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--conv", choices=("auto", "native"), default="auto",
                    help="'native': XLA's convolution for every layer of both models, not "
                         "the per-shape CPU forms of robust_admm.models.conv (chosen for "
                         "training steps; the shrunk layers may fall to another form)")
    args = ap.parse_args()
    if args.conv == "native":
        conv.choose_form = lambda *a, **k: "native"  # read when the models are traced

    if args.demo:
        model, params, masks, shape = demo_model(args.width, args.ratio, args.bias_std)
        what = f"demo lenet_adv w={args.width}, filter ratio {args.ratio} on conv1, conv2, fc1"
    else:
        model, params, masks, shape = workdir_model(args.workdir, args.stage)
        what = f"{args.workdir} stage {args.stage}"
    masked = jax.tree_util.tree_map(lambda w, m: jnp.asarray(np.asarray(w) * m), params, masks)
    small, small_vars, rep = shrink_lib.shrink(model, params, {}, masks)
    x = jax.random.uniform(jax.random.PRNGKey(1), (args.batch, *shape))
    fns = {"masked": jax.jit(lambda x: apply_model(model, masked, {}, x, False)[0]),
           "shrunk": jax.jit(lambda x: apply_model(small, small_vars["params"], {}, x,
                                                   False)[0])}
    diff = float(jnp.max(jnp.abs(fns["masked"](x) - fns["shrunk"](x))))
    t = time_pair(fns, x, args.repeats)

    nonzero = size_lib.compression_rate(masked, masks=masks)
    print(f"{what}; {jax.default_backend()} ({jax.device_count()} device), batch {args.batch},"
          f" median of {args.repeats}, convolutions {args.conv}")
    for name, layer in rep["layers"].items():
        print(f"  {name}: {layer['units']} -> {layer['kept']} units "
              f"(removed {layer['removed_unused']} unused, {layer['removed_constant']} "
              f"constant; kept constant {layer['kept_constant']})")
    for note in rep["notes"]:
        print(f"  note: {note}")
    print(f"masked model: {rep['params_before']} parameters "
          f"({round(rep['params_before'] / nonzero)} nonzero), shape "
          f"{tuple(model.features)}/{model.hidden}, {t['masked'] * 1e3:.2f} ms per batch")
    print(f"shrunk model: {rep['params_after']} parameters, shape "
          f"{tuple(small.features)}/{small.hidden}, {t['shrunk'] * 1e3:.2f} ms per batch")
    print(f"RESULT params_before={rep['params_before']} params_after={rep['params_after']} "
          f"param_ratio={rep['params_before'] / rep['params_after']:.2f} "
          f"speedup={t['masked'] / t['shrunk']:.2f} max_logit_diff={diff:.2e} conv={args.conv}")


if __name__ == "__main__":
    main()
