"""Evaluates a finished phase of a run again (the `robust_admm.eval` command): natural
accuracy, accuracy under each attack and under the AutoAttack ensemble, sparsity,
compression and stored size, and the gradient-masking checks
(`evaluation/masking.py`). Writes DIR/eval/<stage>.json (and, with an epsilon list,
<stage>_epsilons.json and .png). Each finished attack batch is kept in
DIR/eval/<stage>.partial.json until the end: SIGTERM stops the evaluation before the next
batch (exit status 143) and the same command, rerun, resumes (`eval_resume.py`)."""
import dataclasses
import math
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from robust_admm.attacks import suite
from robust_admm.compression import admm as admm_lib
from robust_admm.compression import size
from robust_admm.data import load_dataset
from robust_admm.data.feed import Reading
from robust_admm.data.stream import eval_local_batches
from robust_admm.data.streamed import SpreadRecords, open_streamed, streamed
from robust_admm.evaluation.curves import plot_curve
from robust_admm.evaluation.masking import masking_warnings
from robust_admm.evaluation.eval_step import EvaluationInterrupted
from robust_admm.evaluation.robustness import Evaluator, robust_accuracy
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.eval_resume import BatchJournal, params_checksum
from robust_admm.models import check_model, get_model, is_import_path
from robust_admm.runtime import logs, parallel
from robust_admm.training.loop import PREEMPTED_EXIT_CODE, Preempted, sigterm_flag
from robust_admm.training.program import finished_phase_specs

# The field's standard radius per dataset and norm; other L-inf cases use the run's own.
STANDARD_EPSILON = {("mnist", "linf"): 0.3, ("cifar10", "linf"): 8 / 255,
                    ("cifar10", "l2"): 0.5, ("cifar100", "linf"): 8 / 255,
                    ("cifar100", "l2"): 0.5, ("imagenet", "linf"): 4 / 255,
                    ("imagenet2012", "linf"): 4 / 255}
# ImageNet's common protocol: the attacks on a subset of the validation split (spread
# evenly over its classes), natural top-1 and top-5 on the same images.
IMAGENET_NAMES = ("imagenet", "imagenet2012")
IMAGENET_DEFAULT_N = 5000
DEFAULT_ATTACKS = {"linf": "fgsm,pgd40,aa-standard", "l2": "fgsm,pgd40,aa-standard"}


def parse_epsilons(text: str) -> list[float]:
    try:
        eps = sorted({float(e) for e in text.split(",") if e.strip()})
    except ValueError:
        raise ValueError(f"--epsilons={text!r} is not a comma-separated list of numbers") from None
    if not eps or eps[0] < 0 or not all(math.isfinite(e) for e in eps):
        raise ValueError(f"--epsilons={text!r}: give one or more finite epsilons >= 0")
    return eps


def model_sizes(params, masks, specs) -> dict:
    """Per-layer sparsity (by the masks), compression rate by nonzero values (as the
    run's summary counts it) and the stored size at the bit widths of `specs`; a kernel
    pruned with no rule of the stage (an inherited sparse structure) is stored sparse."""
    pruned = {p: {"kind": "irregular"} for p, m in admm_lib.leaves_by_path(masks or {}).items()
              if not np.all(m)}
    return {"sparsity": size.sparsity_report(params, masks),
            "compression_rate": size.compression_rate(params),
            "size": size.model_size(params, {**pruned, **specs})}


def table(result: dict) -> str:
    rows = [("attack", "epsilon", "robust accuracy", "seconds"),
            ("natural", "0", f"{100 * result['natural_acc']:.2f}%", "")]
    if "natural_top5" in result:
        rows.append(("natural (top-5)", "0", f"{100 * result['natural_top5']:.2f}%", ""))
    for label, r in result["attacks"].items():
        for name, acc in (r.get("after") or {}).items():
            rows.append((f"  {label}: after {name}", f"{r['epsilon']:g}", f"{100 * acc:.2f}%",
                         f"{r['member_seconds'][name]:.0f}"))
        rows.append((label, f"{r['epsilon']:g}", f"{100 * r['robust_acc']:.2f}%",
                     f"{r['seconds']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def default_count(config) -> int:
    """How many test images `--n` means when not given: IMAGENET_DEFAULT_N for ImageNet,
    else 0 (the whole split)."""
    return IMAGENET_DEFAULT_N if config.data.name in IMAGENET_NAMES else 0


def run_eval_epsilon(config) -> float:
    """The epsilon of the run's own evaluation (runs written before eval.epsilon existed
    evaluated at the training epsilon)."""
    return config.eval.get("epsilon", config.attack.epsilon)


def default_epsilon(config, norm: str) -> float:
    """The dataset's standard radius in `norm`; for L-inf without one, the run's own."""
    if (config.data.name, norm) in STANDARD_EPSILON:
        return STANDARD_EPSILON[config.data.name, norm]
    if norm == "linf":
        return run_eval_epsilon(config)
    raise ValueError(f"--norm={norm}: {config.data.name} has no standard L2 radius here; "
                     f"give --epsilon")


CHUNK_BYTES = 1 << 30  # a streamed test split is evaluated in chunks of about this much


@dataclasses.dataclass
class TestSplit:
    """The test images of a run: `chunks()` gives (pixels float32 in [0, 1], labels) of
    `count` images in order, all at once for a split kept in memory, in chunks of about
    CHUNK_BYTES (whole attack batches) for a streamed one."""
    num_classes: int
    input_shape: tuple
    count: int
    chunks: Callable
    about: str = ""


def open_test_split(config, data_dir: str, n: int, batch: int) -> TestSplit:
    """`n` (0: all) test images of the run's data (`data_dir`: another folder): the first
    n of a split kept in memory, n spread evenly over a streamed one (whose records are
    in class order)."""
    d = config.data
    root = data_dir or d.dir or None
    if not streamed(d.source, d.name):
        ds = load_dataset(d.name, d.source, root)
        count = min(n or len(ds.test), len(ds.test))
        x = ds.test.images[:count].astype(np.float32) / 255.0
        y = ds.test.labels[:count]
        return TestSplit(ds.num_classes, (1,) + x.shape[1:], count, lambda: iter([(x, y)]))
    ds = open_streamed(d.name, d.source, root, check_headers=False, max_pixels=d.max_pixels)
    count = min(n or len(ds.test), len(ds.test))
    size = d.image_size
    chunk = max(1, CHUNK_BYTES // (size * size * d.channels * 4) // batch) * batch
    pre = Reading.of_config(d, mesh=None).preprocess(train=False)
    source = SpreadRecords(ds.test, count)

    def chunks():
        # Every process reads every image: the attacks take host arrays of all of them.
        for b in eval_local_batches(source, pre, chunk, 0, 1, d.num_workers, d.num_threads):
            for name in b["bad"]:
                logs.log(f"[eval] skipped an unreadable image (data.bad_images='skip'): "
                         f"{name}")
            keep = b["valid"]
            yield b["image"][keep].astype(np.float32) / 255.0, b["label"][keep]

    return TestSplit(ds.num_classes, (1, size, size, d.channels), count, chunks,
                     f" of {ds.root} ({d.source}, read in chunks of {chunk})")


def merge_results(parts: list) -> dict:
    """`robust_accuracy` results of consecutive chunks as one over all their images
    (accuracies from the counts, seconds summed); one part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    n = sum(p["n"] for p in parts)
    if n == 0:
        raise ValueError("the evaluation read no valid test image")

    def acc(get) -> float:
        return sum(int(round(get(p) * p["n"])) for p in parts) / n

    out = dict(parts[0], n=n, natural_acc=acc(lambda p: p["natural_acc"]), attacks={})
    if "natural_top5" in out:
        out["natural_top5"] = acc(lambda p: p["natural_top5"])
    for label, first in parts[0]["attacks"].items():
        entry = dict(first, robust_acc=acc(lambda p: p["attacks"][label]["robust_acc"]),
                     seconds=sum(p["attacks"][label]["seconds"] for p in parts))
        if "after" in first:
            entry["after"] = {m: acc(lambda p: p["attacks"][label]["after"][m])
                              for m in first["after"]}
            entry["member_seconds"] = {m: sum(p["attacks"][label]["member_seconds"][m]
                                              for p in parts) for m in first["after"]}
        out["attacks"][label] = entry
    return out


def evaluate_workdir(workdir: str, stage: str | None = None, attacks: str = "",
                     epsilon: float | None = None, epsilons: str = "", n: int | None = None,
                     batch: int = 500, seed: int = 0, data_dir: str = "",
                     checks: bool = True, export: str = "", loop: str | None = None,
                     norm: str = "linf") -> dict:
    """Evaluates `stage` of the run in `workdir`; returns what DIR/eval/<stage>.json holds.
    `attacks` defaults to DEFAULT_ATTACKS[norm]; `n` (None: `default_count`) test images,
    0 for all."""
    config = workdir_lib.read_config(workdir)
    stage = workdir_lib.finished_stage(workdir, stage, config)
    if norm not in DEFAULT_ATTACKS:
        raise ValueError(f"--norm={norm!r}; allowed: {', '.join(DEFAULT_ATTACKS)}")
    attacks = attacks or DEFAULT_ATTACKS[norm]
    items = suite.parse(attacks)
    curve_eps = parse_epsilons(epsilons) if epsilons else []
    n = default_count(config) if n is None else n
    if n < 0:
        raise ValueError(f"--n={n} must be >= 0 (0 = the whole test split)")
    eps = default_epsilon(config, norm) if epsilon is None else float(epsilon)
    if norm == "linf" and not 0 <= eps <= 1:
        raise ValueError(f"--epsilon={eps} must be in [0, 1] (pixels are in [0, 1])")
    if not eps >= 0:
        raise ValueError(f"--epsilon={eps} must be >= 0")
    for _, members in items:  # refuse an attack the norm lacks before any work
        for name in members:
            suite.make(name, eps, norm=norm)
    state = workdir_lib.load_final_state(workdir, stage)
    test = open_test_split(config, data_dir, n, batch)
    count = test.count
    model = get_model(config.model.name, test.num_classes, config.model.width,
                      config.model.dtype, config.model.normalize, config.model.kwargs)
    if is_import_path(config.model.name):  # a user's model, imported again
        check_model(model, config.model.name, test.input_shape, test.num_classes)
    mesh = parallel.make_mesh()
    ev = Evaluator(model, state["params"], state.get("batch_stats") or {}, batch, mesh,
                   loop or config.attack.loop, config.cpu_convolutions)
    # PGD steps as a fraction of epsilon, as the run's own evaluation takes them.
    run_eps = run_eval_epsilon(config)
    step_ratio = config.eval.step_size / run_eps if run_eps and norm == "linf" else None
    key = jax.random.PRNGKey(seed)
    t0 = time.time()
    logs.log(f"[eval] {workdir} stage {stage}: {count} test images{test.about}, attacks "
             f"{attacks}, {norm} epsilon {eps:g}, batch {batch}, {mesh.size} device(s)")
    kw = dict(num_classes=test.num_classes, pgd_step_ratio=step_ratio, norm=norm)
    parts, at_eps_1, curve = [], None, None
    curve_parts = [[] for e in curve_eps if e > 0]
    os.makedirs(workdir_lib.eval_dir(workdir), exist_ok=True)
    # One evaluation of a stage at a time: a second would write the same journal and
    # result files (each process of a multi-process evaluation holds its own lock).
    with workdir_lib.hold_eval(workdir, stage, jax.process_index()):
        partial = workdir_lib.eval_partial_path(workdir, stage)
        identity = dict(stage=stage, model=params_checksum((state["params"],
                                                            state.get("batch_stats") or {})),
                        attacks=attacks, epsilon=eps, epsilons=curve_eps, n=count, batch=batch,
                        seed=seed, norm=norm, data_dir=data_dir, checks=checks,
                        loop=loop or config.attack.loop, devices=mesh.size)
        with sigterm_flag() as preempted:
            ev.journal = BatchJournal(partial, identity, stop=lambda: bool(preempted))
            try:
                for i, (x, y) in enumerate(test.chunks()):
                    # One chunk (a split kept in memory) draws with `key` itself.
                    chunk_key = key if i == 0 else jax.random.fold_in(key, i)
                    correct = ev.correct(x, y)
                    ev.journal.scope = f"chunk {i}, epsilon {eps!r}"
                    parts.append(robust_accuracy(ev, x, y, items, eps, chunk_key, correct=correct,
                                                 **kw))
                    if checks and i == 0:
                        sub = slice(0, min(count, batch))
                        # L-inf whatever the norm: at L-inf radius 1 every image is reachable.
                        ev.journal.scope = "check at L-inf epsilon 1"
                        at_eps_1 = robust_accuracy(ev, x[sub], y[sub], suite.parse("pgd20"), 1.0,
                                                   key, **dict(kw, correct=correct[sub],
                                                               pgd_step_ratio=None, norm="linf"))
                    for e, part in zip([e for e in curve_eps if e > 0], curve_parts):
                        ev.journal.scope = f"chunk {i}, curve epsilon {e!r}"
                        part.append(robust_accuracy(ev, x, y, items, e, chunk_key,
                                                    correct=correct, **kw))
            except EvaluationInterrupted:
                j = ev.journal
                logs.log(f"[eval] SIGTERM: {len(j.batches)} attack batches saved in {partial} "
                         f"({j.computed} computed in this run, {j.reused} reused); rerun the "
                         f"same command to resume")
                raise Preempted(PREEMPTED_EXIT_CODE) from None
        result = merge_results(parts)
        specs = finished_phase_specs(config, stage, state["params"], test.num_classes,
                                     test.input_shape)
        out = {"workdir": os.path.abspath(workdir), "stage": stage, **result,
               **model_sizes(state["params"], state.get("masks"), specs)}
        if at_eps_1 is not None:
            out["check_eps_1"] = at_eps_1
        if curve_eps:
            curve = [{"epsilon": 0.0, "attacks": {label: {"robust_acc": result["natural_acc"]}
                                                  for label, _ in items}}]
            curve += [merge_results(part) for part in curve_parts]
            base = workdir_lib.epsilon_curve_base(workdir, stage)
            logs.write_json(base + ".json", {"stage": stage, "n": count, "curve": curve})
            if logs.is_main_process():
                plot_curve(curve, base + ".png", f"{config.model.name}, {stage}, {count} images",
                           norm)
            out["epsilon_curve"] = base + ".json"
        out["warnings"] = masking_warnings(result, at_eps_1, curve)
        out["wall_time_s"] = time.time() - t0
        if export:
            from robust_admm.experiments import export as export_lib
            out["export"] = export_lib.export_state(
                config.to_dict(), state, export, source={"workdir": os.path.abspath(workdir),
                                                         "stage": stage}, specs=specs)
        result_path = workdir_lib.eval_path(workdir, stage)
        logs.write_json(result_path, out)
        ev.journal.finish()
        logs.log(table(result))
        for w in out["warnings"]:
            logs.log(f"WARNING: {w}")
        logs.log(f"[eval] done in {logs.fmt_duration(out['wall_time_s'])}; {result_path}")
        return out
