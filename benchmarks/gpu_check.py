"""The project's speeds on one GPU in one table, within 8 minutes: what `gpu_check.sh` runs.

    benchmarks/gpu_check.sh --out DIR            # on a machine with a GPU
    benchmarks/gpu_check.sh --out DIR --shrink   # the same logic, tiny, on a CPU

Rows, each timed by the project's public pieces (no second timer: `benchmarks/step.py`'s
`measure` times every step row):
  a. ResNet-50 (`imagenet_resnet50`, 224 px, 1000 classes) natural training in bfloat16:
     from a random uint8 split kept on the device (the step's device feed), then through
     the streamed feed (`data.feed.StreamFeed`) from a folder of random JPEGs of 500 x 375
     written to a temporary folder: the reader alone (read, decode, crop, put on the
     device), then reader and step together, timed as the training loop times them
     (`runtime.logs.Progress`: img/s and the share of the time spent waiting for input).
  b. PGD-10 adversarial training (eps 8/255, step 2/255, ADMM penalty on every conv) of
     VGG-16, ResNet-18 and WRN-34-10 at 32 px, float32 (at JAX's default matmul
     precision, which lets recent NVIDIA GPUs use TensorFloat-32) and bfloat16.
  c. AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square; Linf eps 8/255) on 1,000
     random 32 px images with a ResNet-18 of random weights, the labels set to the
     model's own predictions so every image is attacked (natural accuracy 100%); a random
     model is not robust, so APGD-CE fools nearly every image and the later members run
     on the few left: the time is APGD-CE's on 1,000 images, compiles included, not what
     a robust model costs.
Each row: img/s (the median of the timed repeats, after compilation and warm-up steps),
the seconds of compilation with the first step, the input wait share (streamed row).
Below the table, the streamed rows' img/s against the on-device split's: training is
input-bound when a3 / a1 is well below 1. The wait share alone cannot say it on a GPU:
the loop dispatches steps ahead of the device, so its wait for the next batch overlaps
steps still running. JSON (gpu_check.json) and the table (gpu_check.md) are rewritten in
--out after each row.

The time budget: rows run in order while the budget (--budget-s) lasts; a row whose
expected need (ROW_NEED_S, mostly compilation) no longer fits is skipped and marked so, and
the timed repeats of a row stop after --timed-s seconds (at least one repeat runs). The
wrapper `gpu_check.sh` also stops the whole run at 8 minutes and prints the rows done.
"""
import argparse
import concurrent.futures
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("bench_step", os.path.join(HERE, "step.py"))
bench_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_step)

BUDGET_S = 440  # the Python side; gpu_check.sh stops everything at 480 s (8 minutes)
# Full sizes (a GPU) and --shrink (a CPU, seconds): the models, batches and counts of each
# section. Shrunk, every model is a small one at its own size; the logic is the same.
FULL = dict(
    natural_model="imagenet_resnet50", natural_batch=256, natural_size=224,
    pgd_models=("vgg16", "resnet18", "wrn34_10"), pgd_steps=10, pgd_batch=128,
    iters=10, repeats=3, warmup=2,
    jpegs_per_class=320, jpeg_size=(500, 375), reader_steps=24,
    aa_model="resnet18", aa_images=1000, aa_batch=500,
)
SHRINK = dict(
    natural_model="resnet8", natural_batch=4, natural_size=None,
    pgd_models=("lenet_adv",), pgd_steps=1, pgd_batch=4,
    iters=2, repeats=2, warmup=1,
    jpegs_per_class=6, jpeg_size=(60, 45), reader_steps=3,
    aa_model="lenet_adv", aa_images=8, aa_batch=8,
)
# The least time a row needs (seconds), mostly compilation, by row kind; full sizes on a
# GPU (estimates: no GPU has run this yet) and shrunk on a CPU. A row starts only if the
# budget has this much left.
ROW_NEED_S = {
    "full": {"natural": 45, "reader": 15, "streamed": 45, "pgd": 25, "autoattack": 60},
    "shrink": {"natural": 1, "reader": 1, "streamed": 1, "pgd": 1, "autoattack": 1},
}


class Budget:
    """Seconds left of the run's budget, from its start."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while `running` (its monitoring
    events), for a row whose first call cannot be timed apart (AutoAttack's)."""
    PREFIX = "/jax/core/compile/"

    def __init__(self):
        import jax
        self.total, self.running = 0.0, False
        jax.monitoring.register_event_duration_secs_listener(self._event)

    def _event(self, event: str, duration: float, **kwargs):
        if self.running and event.startswith(self.PREFIX) and event.endswith("_duration"):
            self.total += duration


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--shrink", action="store_true",
                   default=os.environ.get("GPU_CHECK_SHRINK", "") not in ("", "0"),
                   help="tiny models, batches and counts, for a CPU (also GPU_CHECK_SHRINK=1)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all rows (default {BUDGET_S}; shrunk: 600)")
    p.add_argument("--timed-s", type=float, default=None,
                   help="seconds of timed repeats per row at most (default 15; shrunk: 30)")
    p.add_argument("--reader-threads", type=int, default=os.cpu_count() or 1,
                   help="streamed rows: decoding threads in this process (data.num_threads; "
                        "default: one per core)")
    p.add_argument("--reader-workers", type=int, default=0,
                   help="streamed rows: reader processes (data.num_workers; 0: threads here)")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 600.0 if args.shrink else float(BUDGET_S)
    if args.timed_s is None:
        args.timed_s = 30.0 if args.shrink else 15.0
    if args.reader_threads < 1 or args.reader_workers < 0:
        p.error(f"--reader-threads {args.reader_threads} must be >= 1 and --reader-workers "
                f"{args.reader_workers} >= 0")
    return args


def step_args(model: str, steps: int, batch: int, dtype: str, sizes: dict, timed_s: float,
              image_size: int | None = None):
    """benchmarks/step.py's arguments for one row."""
    argv = ["--model", model, "--width", "1", "--steps", str(steps), "--batch", str(batch),
            "--dtype", dtype, "--iters", str(sizes["iters"]), "--repeats",
            str(sizes["repeats"]), "--warmup", str(sizes["warmup"]),
            "--max-seconds", str(timed_s)]
    if image_size is not None:
        argv += ["--image-size", str(image_size)]
    return bench_step.parse(argv)


def step_row(what: str, args) -> dict:
    r = bench_step.measure(args)
    return dict(what=what, dtype=args.dtype, batch=r["batch"], img_per_s=r["img_per_s"],
                compile_s=r["compile_s"], rates=r["rates"])


def write_jpegs(root: str, per_class: int, size: tuple, threads: int) -> int:
    """An image folder of random photo-like JPEGs (noise upscaled 2x, quality 90, as
    benchmarks/decode_speed.py writes them) at `size` (width, height): 2 classes of
    `per_class` training images and 2 validation images each. Returns the bytes written."""
    from PIL import Image

    jobs = [(split, c, i) for c in range(2) for split, n in (("train", per_class), ("val", 2))
            for i in range(n)]
    for split, c, _ in jobs:
        os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
    w, h = size

    def one(job):
        split, c, i = job
        rng = np.random.default_rng([c, i, split == "val"])
        small = rng.integers(0, 256, (h // 2, w // 2, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.BICUBIC).save(buf, "JPEG", quality=90)
        with open(os.path.join(root, split, f"class{c}", f"{i:05d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        return len(buf.getvalue())

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, jobs))


def open_feed(root: str, batch: int, size: int, channels: int, args):
    """The streamed training feed over the folder at `root`, on the first device."""
    import jax

    from robust_admm.data import streamed
    from robust_admm.data.feed import Reading, StreamFeed
    from robust_admm.runtime import parallel

    ds = streamed.open_streamed("jpegs", "folder", root, log=lambda s: None)
    mesh = parallel.make_mesh(jax.devices()[:1])
    reading = Reading(size=size, mesh=mesh, num_workers=args.reader_workers,
                      num_threads=args.reader_threads, channels=channels)
    return StreamFeed(ds.train, batch, reading), mesh


def reader_row(feed, steps: int) -> dict:
    """The streamed feed alone: global batches read, decoded, cropped and put on the
    device, img/s after the first batch."""
    import jax

    it = feed.steps(seed=1, start_step=0, num_steps=steps)
    try:
        jax.block_until_ready(next(it).data)
        t = time.perf_counter()
        last = None
        for given in it:
            last = given.data
        jax.block_until_ready(last)
        rate = feed.global_batch * (steps - 1) / (time.perf_counter() - t)
    finally:
        it.close()
    return dict(img_per_s=rate, compile_s=None, rates=[rate])


def streamed_row(feed, mesh, args, sizes: dict, timed_s: float) -> dict:
    """Natural training through the streamed feed, timed as the training loop times it
    (`runtime.logs.Progress`): the step's first call (compiling) apart, then warm-up steps
    that empty the batches read ahead during the compilation, then intervals of `iters`
    steps (each ended by waiting for its last step) until `repeats` intervals or `timed_s`
    seconds: img/s and input wait share of each interval, medians reported."""
    import jax

    from robust_admm.runtime import logs

    setting = bench_step.setting(args)
    model, variables, _, _ = bench_step.make_model(args)
    state, train_step = bench_step.train_state_and_step(args, model, variables, setting,
                                                        feed="stream", mesh=mesh)
    warmup = feed.reading.prefetch + sizes["warmup"]
    total = 1 + warmup + sizes["repeats"] * sizes["iters"]
    progress = logs.Progress(total, feed.global_batch)
    speeds, t_timed = [], None
    it = feed.steps(seed=0, start_step=0, num_steps=total)
    try:
        for step in range(1, total + 1):
            t = time.perf_counter()
            given = next(it)
            progress.waited(time.perf_counter() - t)
            state, metrics = train_step(state, given.data)
            if step == 1:
                jax.block_until_ready((state, metrics))
                progress.compiled(step)
            elif step == 1 + warmup:
                jax.block_until_ready((state, metrics))
                progress.update(step)  # the warm-up interval, not kept
                t_timed = time.perf_counter()
            elif step > 1 + warmup and (step - 1 - warmup) % sizes["iters"] == 0:
                jax.block_until_ready((state, metrics))
                speeds.append(progress.update(step))
                if time.perf_counter() - t_timed > timed_s:
                    break
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(f"the streamed step diverged: loss {loss}")
    finally:
        it.close()
    rates = [s["img_per_s"] for s in speeds]
    return dict(img_per_s=statistics.median(rates), compile_s=progress.compile_s, rates=rates,
                input_wait_share=statistics.median(s["input_wait_share"] for s in speeds),
                input_wait_shares=[s["input_wait_share"] for s in speeds])


def autoattack_row(sizes: dict, clock: CompileClock) -> dict:
    """AutoAttack (standard, Linf 8/255) through `evaluation.robust_accuracy` on random
    images, the model's random weights, its own predictions as the labels."""
    import jax

    from robust_admm.attacks import suite
    from robust_admm.evaluation import robustness
    from robust_admm.models import apply_model

    args = bench_step.parse(["--model", sizes["aa_model"], "--width", "1"])
    model, variables, shape, _ = bench_step.make_model(args)
    params, stats = variables["params"], variables.get("batch_stats", {})
    n = sizes["aa_images"]
    x = np.random.default_rng(0).random((n,) + shape, dtype=np.float32)
    predict = jax.jit(lambda p, s, x: apply_model(model, p, s, x, train=False)[0].argmax(-1))
    y = np.asarray(predict(params, stats, x)).astype(np.int32)
    ev = robustness.Evaluator(model, params, stats, sizes["aa_batch"], log=lambda s: None)
    clock.total, clock.running = 0.0, True
    t = time.perf_counter()
    try:
        result = robustness.robust_accuracy(ev, x, y, suite.parse("aa-standard"), 8 / 255,
                                            jax.random.PRNGKey(0))
    finally:
        clock.running = False
    seconds = time.perf_counter() - t
    aa = result["attacks"]["aa-standard"]
    # The share of the images each member attacks: those still robust before it.
    before = [result["natural_acc"]] + [aa["after"][m] for m in suite.STANDARD[:-1]]
    return dict(img_per_s=n / seconds, compile_s=clock.total, seconds=seconds,
                natural_acc=result["natural_acc"], robust_acc=aa["robust_acc"],
                member_seconds=aa["member_seconds"],
                member_points={m: round(a * n) for m, a in zip(suite.STANDARD, before)})


def device_line() -> dict:
    import jax
    import jaxlib
    devices = jax.devices()
    return {"devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
            "backend": jax.default_backend(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "python": sys.version.split()[0]}


def fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(report: dict) -> str:
    d = report["device"]
    lines = [f"device: {', '.join(d['devices'])} ({d['device_kind']}, backend {d['backend']});"
             f" jax {d['jax']}, jaxlib {d['jaxlib']}, python {d['python']}"
             + ("; SHRUNK (CPU test sizes: the numbers mean nothing)" if report["shrink"]
                else ""),
             f"elapsed {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget",
             "",
             "| row | what | dtype | batch | img/s | compile s | input wait | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        wait = r.get("input_wait_share")
        lines.append(
            f"| {r['row']} | {r['what']} | {r.get('dtype') or '—'} | {r.get('batch') or '—'} | "
            f"{fmt(r.get('img_per_s'), '.1f')} | {fmt(r.get('compile_s'), '.1f')} | "
            f"{'—' if wait is None else f'{100 * wait:.0f}%'} | {r['status']} |")
    rows = {r["row"]: r for r in report["rows"] if r["status"] == "ok"}
    if "a1" in rows and ("a2" in rows or "a3" in rows):
        lines.append("")
        for name, role in (("a2", "the reader alone"), ("a3", "training through it")):
            if name in rows:
                lines.append(f"{name} / a1 = {rows[name]['img_per_s'] / rows['a1']['img_per_s']:.2f}"
                             f" ({role} against the on-device split)")
        lines.append("Input-bound when a3 / a1 is well below 1. The input wait share is the "
                     "training loop's (time in next(feed) / interval): where dispatch runs "
                     "ahead of the device it also counts waits the device spent busy.")
    return "\n".join(lines)


def save(report: dict, out: str, budget: Budget):
    report["elapsed_s"] = budget.elapsed()
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "gpu_check.md"), "w") as f:
        f.write(table(report) + "\n")


def main(argv=None) -> int:
    args = parse(argv)
    budget = Budget(args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    import jax
    mode = "shrink" if args.shrink else "full"
    sizes = SHRINK if args.shrink else FULL
    if jax.default_backend() == "cpu" and not args.shrink:
        print("gpu_check: JAX sees no GPU (backend cpu); the full check is sized for a GPU. "
              "--shrink (or GPU_CHECK_SHRINK=1) runs the same logic at CPU sizes.",
              file=sys.stderr)
        return 2
    report = {"device": device_line(), "shrink": args.shrink, "budget_s": args.budget_s,
              "timed_s": args.timed_s, "reader_threads": args.reader_threads,
              "reader_workers": args.reader_workers, "rows": []}
    d = report["device"]
    print(f"device: {d['devices']} ({d['device_kind']}); jax {d['jax']}, jaxlib {d['jaxlib']}",
          flush=True)
    if len(jax.devices()) > 1:
        print(f"gpu_check: {len(jax.devices())} devices; every row runs on the first",
              flush=True)
    clock = CompileClock()
    errors = 0

    def run(row: str, kind: str, what: str, fn, **fixed):
        nonlocal errors
        entry = dict(row=row, what=what, **fixed)
        need = ROW_NEED_S[mode][kind]
        if budget.left() < need:
            entry["status"] = (f"skipped: {budget.left():.0f} s of the budget left, the row "
                               f"needs about {need} s")
        else:
            t = time.perf_counter()
            try:
                entry.update(fn(min(args.timed_s, max(budget.left() - need, 1.0))))
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001 (a row's failure is reported in the table)
                traceback.print_exc()
                entry["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                errors += 1
            entry["row_s"] = time.perf_counter() - t
        report["rows"].append(entry)
        save(report, args.out, budget)
        print(f"[{budget.elapsed():.0f} s] {row} {what}: {entry['status']}"
              + (f", {entry['img_per_s']:.1f} img/s" if entry.get("img_per_s") else ""),
              flush=True)

    # a. Natural training of ResNet-50 in bfloat16: device feed, then streamed.
    nat_args = lambda timed: step_args(sizes["natural_model"], 0, sizes["natural_batch"],  # noqa: E731
                                       "bfloat16", sizes, timed, sizes["natural_size"])
    shape = bench_step.image_shape(sizes["natural_model"], sizes["natural_size"])
    nat = f"{sizes['natural_model']} {shape[0]} px natural training"
    what = f"{nat}, on-device random split"
    run("a1", "natural", what, lambda timed: step_row(what, nat_args(timed)))
    with tempfile.TemporaryDirectory(prefix="gpu-check-jpegs-") as root:
        t = time.perf_counter()
        written = write_jpegs(root, sizes["jpegs_per_class"], sizes["jpeg_size"],
                              args.reader_threads)
        n_jpegs = 2 * sizes["jpegs_per_class"]
        report["jpegs"] = {"train": n_jpegs, "size": sizes["jpeg_size"],
                           "mean_bytes": written / (n_jpegs + 4),
                           "seconds": time.perf_counter() - t}
        print(f"wrote {n_jpegs} + 4 JPEGs of {sizes['jpeg_size']} px, mean "
              f"{written / (n_jpegs + 4) / 1024:.0f} KiB, in {report['jpegs']['seconds']:.1f} s",
              flush=True)
        feed, mesh = open_feed(root, sizes["natural_batch"], shape[0], shape[2], args)
        reading = (f"{args.reader_threads} threads"
                   + (f" in each of {args.reader_workers} worker processes"
                      if args.reader_workers else " in this process"))
        run("a2", "reader", f"streamed feed alone: {n_jpegs} JPEGs, RandomResizedCrop to "
            f"{shape[0]} px, {reading}",
            lambda timed: reader_row(feed, sizes["reader_steps"]),
            batch=sizes["natural_batch"])
        run("a3", "streamed", f"{nat}, streamed feed ({reading})",
            lambda timed: streamed_row(feed, mesh, nat_args(timed), sizes, timed),
            dtype="bfloat16", batch=sizes["natural_batch"])

    # b. PGD-10 adversarial training at 32 px, float32 and bfloat16.
    i = 0
    for model in sizes["pgd_models"]:
        for dtype in ("float32", "bfloat16"):
            i += 1
            what = f"{model} PGD-{sizes['pgd_steps']} training"
            run(f"b{i}", "pgd", what, lambda timed, m=model, dt=dtype, w=what: step_row(
                w, step_args(m, sizes["pgd_steps"], sizes["pgd_batch"], dt, sizes, timed)))

    # c. AutoAttack on random images, the model's random weights.
    run("c1", "autoattack", f"AutoAttack standard (Linf 8/255), {sizes['aa_images']} images, "
        f"{sizes['aa_model']} random weights, labels = its predictions; time incl. compiles",
        lambda timed: autoattack_row(sizes, clock), dtype="float32", batch=sizes["aa_batch"])

    save(report, args.out, budget)
    print("\n" + table(report), flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
