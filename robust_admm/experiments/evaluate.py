"""Evaluates a finished phase of a run again (the `robust_admm.eval` command): natural
accuracy, accuracy under each attack and under the AutoAttack ensemble, sparsity,
compression and stored size, and the gradient-masking checks
(`evaluation/masking.py`). Writes DIR/eval/<stage>.json (and, with an epsilon list,
<stage>_epsilons.json and .png)."""
import os
import time

import jax
import numpy as np

from robust_admm.attacks import suite
from robust_admm.compression import admm as admm_lib
from robust_admm.compression import size
from robust_admm.data import load_dataset
from robust_admm.evaluation.curves import plot_curve
from robust_admm.evaluation.masking import masking_warnings
from robust_admm.evaluation.robustness import Evaluator, robust_accuracy
from robust_admm.experiments import workdir as workdir_lib
from robust_admm.models import get_model
from robust_admm.runtime import logs, parallel
from robust_admm.training.program import finished_phase_specs

# The field's standard radius per dataset and norm; other L-inf cases use the run's own.
STANDARD_EPSILON = {("mnist", "linf"): 0.3, ("cifar10", "linf"): 8 / 255,
                    ("cifar10", "l2"): 0.5, ("cifar100", "linf"): 8 / 255,
                    ("cifar100", "l2"): 0.5}
DEFAULT_ATTACKS = {"linf": "fgsm,pgd40,aa-standard", "l2": "fgsm,pgd40,aa-standard"}


def parse_epsilons(text: str) -> list[float]:
    try:
        eps = sorted({float(e) for e in text.split(",") if e.strip()})
    except ValueError:
        raise ValueError(f"--epsilons={text!r} is not a comma-separated list of numbers") from None
    if not eps or eps[0] < 0:
        raise ValueError(f"--epsilons={text!r}: give one or more epsilons >= 0")
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


def evaluate_workdir(workdir: str, stage: str | None = None, attacks: str = "",
                     epsilon: float | None = None, epsilons: str = "", n: int = 0,
                     batch: int = 500, seed: int = 0, data_dir: str = "",
                     checks: bool = True, export: str = "", loop: str | None = None,
                     norm: str = "linf") -> dict:
    """Evaluates `stage` of the run in `workdir`; returns what DIR/eval/<stage>.json holds.
    `attacks` defaults to DEFAULT_ATTACKS[norm]."""
    config = workdir_lib.read_config(workdir)
    stage = workdir_lib.finished_stage(workdir, stage, config)
    if norm not in DEFAULT_ATTACKS:
        raise ValueError(f"--norm={norm!r}; allowed: {', '.join(DEFAULT_ATTACKS)}")
    attacks = attacks or DEFAULT_ATTACKS[norm]
    items = suite.parse(attacks)
    curve_eps = parse_epsilons(epsilons) if epsilons else []
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
    ds = load_dataset(config.data.name, config.data.source,
                           data_dir or config.data.dir or None)
    test = ds.test
    count = min(n or len(test), len(test))
    x = test.images[:count].astype(np.float32) / 255.0
    y = test.labels[:count]
    model = get_model(config.model.name, ds.num_classes, config.model.width,
                      config.model.dtype)
    mesh = parallel.make_mesh()
    ev = Evaluator(model, state["params"], state.get("batch_stats") or {}, batch, mesh,
                   loop or config.attack.loop, config.cpu_convolutions)
    # PGD steps as a fraction of epsilon, as the run's own evaluation takes them.
    run_eps = run_eval_epsilon(config)
    step_ratio = config.eval.step_size / run_eps if run_eps and norm == "linf" else None
    key = jax.random.PRNGKey(seed)
    t0 = time.time()
    logs.log(f"[eval] {workdir} stage {stage}: {count} test images, attacks {attacks}, "
             f"{norm} epsilon {eps:g}, batch {batch}, {mesh.size} device(s)")
    correct = ev.correct(x, y)
    kw = dict(num_classes=ds.num_classes, pgd_step_ratio=step_ratio, correct=correct,
              norm=norm)
    result = robust_accuracy(ev, x, y, items, eps, key, **kw)
    specs = finished_phase_specs(config, stage, state["params"], ds.num_classes,
                                        (1,) + x.shape[1:])
    out = {"workdir": os.path.abspath(workdir), "stage": stage, **result,
           **model_sizes(state["params"], state.get("masks"), specs)}
    at_eps_1 = curve = None
    if checks:
        sub = slice(0, min(count, batch))
        # L-inf whatever the norm: at L-inf radius 1 every image is reachable.
        at_eps_1 = robust_accuracy(ev, x[sub], y[sub], suite.parse("pgd20"), 1.0, key,
                                   **dict(kw, correct=correct[sub], pgd_step_ratio=None,
                                          norm="linf"))
        out["check_eps_1"] = at_eps_1
    os.makedirs(workdir_lib.eval_dir(workdir), exist_ok=True)
    if curve_eps:
        curve = [{"epsilon": 0.0, "attacks": {label: {"robust_acc": result["natural_acc"]}
                                              for label, _ in items}}]
        curve += [robust_accuracy(ev, x, y, items, e, key, **kw) for e in curve_eps if e > 0]
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
    logs.log(table(result))
    for w in out["warnings"]:
        logs.log(f"WARNING: {w}")
    logs.log(f"[eval] done in {logs.fmt_duration(out['wall_time_s'])}; {result_path}")
    return out
