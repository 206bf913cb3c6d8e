"""Evaluates a finished stage of a run again: natural accuracy, accuracy under each
attack and under the AutoAttack ensemble, sparsity, compression and stored size.

    python -m robust_admm.eval --workdir DIR [--stage NAME] [--attacks fgsm,pgd40,aa-standard]
        [--norm linf|l2] [--epsilon E] [--epsilons 0.1,0.2,0.3] [--n N] [--batch B]
        [--export PATH]

Writes DIR/eval/<stage>.json (and, with --epsilons, <stage>_epsilons.json and .png) and
prints a table. Warns, naming the numbers, on the signs of gradient masking (Carlini et
al. 2019): a weaker attack beating a stronger one, accuracy at epsilon = 1 above about 0,
accuracy that does not fall as epsilon grows.
"""
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from robust_admm import admm as admm_lib
from robust_admm import checkpoint, data, logs, parallel, projections, recipe
from robust_admm.attacks import suite
from robust_admm.config_base import STAGES
from robust_admm.models import get_model
from robust_admm.robustness import Evaluator, robust_accuracy

# The field's standard radius per dataset and norm; other L-inf cases use the run's own.
STANDARD_EPSILON = {("mnist", "linf"): 0.3, ("cifar10", "linf"): 8 / 255,
                    ("cifar10", "l2"): 0.5, ("cifar100", "linf"): 8 / 255,
                    ("cifar100", "l2"): 0.5}
DEFAULT_ATTACKS = {"linf": "fgsm,pgd40,aa-standard", "l2": "fgsm,pgd40,aa-standard"}
# Gradient-masking checks: how much a weaker attack may beat a stronger one, the most
# accuracy allowed at epsilon = 1, how much accuracy may rise as epsilon grows.
MARGIN, MAX_ACC_AT_EPS_1, RISE = 0.01, 0.02, 0.005
WEAKER_STRONGER = (("fgsm", "pgd"), ("pgd", "apgd-ce"))
BLACK_BOX = ("square",)  # attacks that use no gradients


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--workdir={workdir!r} holds no run (no config.json)")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(recipe.upgrade_config_dict(json.load(f)))


def finished_stage(workdir: str, stage: str | None, config) -> str:
    """`stage` checked, or the last phase of the run's program with checkpoints."""
    names = [p.name for p in recipe.parse_program(config)]
    if stage:
        if stage not in names:
            raise ValueError(f"--stage={stage!r}; allowed: the run's phases {', '.join(names)}")
        return stage
    for s in reversed(names):
        if os.path.isdir(checkpoint.stage_dir(workdir, s)):
            return s
    raise FileNotFoundError(f"{workdir} holds no stage's checkpoints")


def parse_epsilons(text: str) -> list[float]:
    try:
        eps = sorted({float(e) for e in text.split(",") if e.strip()})
    except ValueError:
        raise ValueError(f"--epsilons={text!r} is not a comma-separated list of numbers") from None
    if not eps or eps[0] < 0:
        raise ValueError(f"--epsilons={text!r}: give one or more epsilons >= 0")
    return eps


def _acc(result: dict, prefix: str) -> tuple[str, float] | None:
    """The accuracy of the first attack (or ensemble member) whose name starts with prefix."""
    for label, r in result["attacks"].items():
        if label.startswith(prefix) and len(r["members"]) == 1:
            return label, r["robust_acc"]
    for label, r in result["attacks"].items():
        for name, acc in r.get("after", {}).items():
            if name.startswith(prefix) and r["members"][0] == name:
                return f"{label}/{name}", acc
    return None


def masking_warnings(result: dict, at_eps_1: dict | None = None,
                     curve: list[dict] | None = None) -> list[str]:
    """The signs of gradient masking in an evaluation, as sentences naming the numbers."""
    out = []
    for weak, strong in WEAKER_STRONGER:
        a, b = _acc(result, weak), _acc(result, strong)
        if a and b and a[1] < b[1] - MARGIN:
            out.append(f"{a[0]} ({100 * a[1]:.2f}%) beats the stronger {b[0]} "
                       f"({100 * b[1]:.2f}%) by more than {100 * MARGIN:g} point: the stronger "
                       f"attack's gradients may be masked or its steps too small")
    for label, r in result["attacks"].items():
        after = list((r.get("after") or {}).items())
        for (prev, before), (name, acc) in zip(after, after[1:]):
            if name in BLACK_BOX and acc < before - MARGIN:
                out.append(f"{label}: the black-box {name} lowers accuracy from "
                           f"{100 * before:.2f}% (after {prev}) to {100 * acc:.2f}%, more than "
                           f"{100 * MARGIN:g} point: the gradient attacks before it miss "
                           f"points a search without gradients finds (masked gradients?)")
    if at_eps_1 is not None:
        for label, r in at_eps_1["attacks"].items():
            if r["robust_acc"] > MAX_ACC_AT_EPS_1:
                out.append(f"at epsilon = 1 (any image reachable) {label} leaves "
                           f"{100 * r['robust_acc']:.2f}% accuracy, not about 0: the attack "
                           f"does not reach what is reachable (masked gradients?)")
    for before, after in zip(curve or [], (curve or [])[1:]):
        for label, r in after["attacks"].items():
            prev = before["attacks"][label]["robust_acc"]
            if r["robust_acc"] > prev + RISE:
                out.append(f"{label}: accuracy rises from {100 * prev:.2f}% at epsilon "
                           f"{before['epsilon']:g} to {100 * r['robust_acc']:.2f}% at "
                           f"{after['epsilon']:g}: it should not grow with epsilon")
    return out


def model_sizes(params, masks, specs) -> dict:
    """Per-layer sparsity (by the masks), compression rate by nonzero values (as the
    run's summary counts it) and the stored size at the bit widths of `specs`; a kernel
    pruned with no rule of the stage (an inherited sparse structure) is stored sparse."""
    pruned = {p: {"kind": "irregular"} for p, m in admm_lib.leaves_by_path(masks or {}).items()
              if not np.all(m)}
    return {"sparsity": projections.sparsity_report(params, masks),
            "compression_rate": projections.compression_rate(params),
            "size": projections.model_size(params, {**pruned, **specs})}


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


def plot_curve(curve: list[dict], path: str, title: str, norm: str = "linf"):
    """Robust accuracy versus epsilon, one line per attack, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    eps = [c["epsilon"] for c in curve]
    for label in curve[0]["attacks"]:
        ax.plot(eps, [100 * c["attacks"][label]["robust_acc"] for c in curve], "o-",
                label=label)
    ax.set_xlabel(f"epsilon ({'L-inf' if norm == 'linf' else 'L2'}, pixels in [0, 1])")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate_workdir(workdir: str, stage: str | None = None, attacks: str = "",
                     epsilon: float | None = None, epsilons: str = "", n: int = 0,
                     batch: int = 500, seed: int = 0, data_dir: str = "",
                     checks: bool = True, export: str = "", loop: str | None = None,
                     norm: str = "linf") -> dict:
    """Evaluates `stage` of the run in `workdir`; returns what DIR/eval/<stage>.json holds.
    `attacks` defaults to DEFAULT_ATTACKS[norm]."""
    config = load_config(workdir)
    stage = finished_stage(workdir, stage, config)
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
    state = checkpoint.load_final_state(workdir, stage)
    ds = data.load_dataset(config.data.name, config.data.source,
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
    specs = recipe.finished_phase_specs(config, stage, state["params"], ds.num_classes,
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
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    if curve_eps:
        curve = [{"epsilon": 0.0, "attacks": {label: {"robust_acc": result["natural_acc"]}
                                              for label, _ in items}}]
        curve += [robust_accuracy(ev, x, y, items, e, key, **kw) for e in curve_eps if e > 0]
        base = os.path.join(workdir, "eval", f"{stage}_epsilons")
        logs.write_json(base + ".json", {"stage": stage, "n": count, "curve": curve})
        if logs.is_main_process():
            plot_curve(curve, base + ".png", f"{config.model.name}, {stage}, {count} images",
                       norm)
        out["epsilon_curve"] = base + ".json"
    out["warnings"] = masking_warnings(result, at_eps_1, curve)
    out["wall_time_s"] = time.time() - t0
    if export:
        from robust_admm import export as export_lib
        out["export"] = export_lib.export_state(
            config.to_dict(), state, export, source={"workdir": os.path.abspath(workdir),
                                                     "stage": stage}, specs=specs)
    logs.write_json(os.path.join(workdir, "eval", f"{stage}.json"), out)
    logs.log(table(result))
    for w in out["warnings"]:
        logs.log(f"WARNING: {w}")
    logs.log(f"[eval] done in {logs.fmt_duration(out['wall_time_s'])}; "
             f"{os.path.join(workdir, 'eval', stage + '.json')}")
    return out


def define_flags():
    from absl import flags
    flags.DEFINE_string("workdir", None, "The run's directory (holds config.json, checkpoints).")
    flags.DEFINE_string("stage", "", "Stage to evaluate (default: the last one with "
                        "checkpoints), one of the run's program, e.g. "
                        + ", ".join(STAGES))
    flags.DEFINE_string("attacks", "",
                        "Comma-separated attacks and ensembles: " + ", ".join(suite.SINGLE)
                        + ", " + ", ".join(suite.ENSEMBLES) + " (default: L-inf "
                        + DEFAULT_ATTACKS["linf"] + "; L2 " + DEFAULT_ATTACKS["l2"] + ")")
    flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model. L2 has fgsm, pgd<N>, "
                      "apgd-ce, apgd-dlr, apgd-t, fab-t, square and aa-standard, as L-inf.")
    flags.DEFINE_float("epsilon", None, "Radius in pixels of [0, 1] (default: L-inf MNIST "
                       "0.3, CIFAR-10 8/255, else the run's eval.epsilon; L2 CIFAR-10 0.5).")
    flags.DEFINE_string("epsilons", "", "Also a robust-accuracy-versus-epsilon curve at "
                        "these radii, e.g. 0.1,0.2,0.3 (JSON and PNG in DIR/eval).")
    flags.DEFINE_integer("n", 0, "Evaluate the first n test images (0 = all).")
    flags.DEFINE_integer("batch", 500, "Global batch of the attacks (a multiple of the "
                         "device count).")
    flags.DEFINE_integer("seed", 0, "Seed of the attacks' random starts and queries.")
    flags.DEFINE_string("data_dir", "", "Data folder, if not the run's data.dir.")
    flags.DEFINE_bool("checks", True, "Run the gradient-masking checks (a PGD-20 at "
                      "epsilon = 1 on one batch).")
    flags.DEFINE_string("export", "", "Also export the model to PATH.npz + PATH.json "
                        "(and a physically smaller model for filter/channel pruning).")
    flags.DEFINE_enum("loop", None, ["auto", "fori", "host"], "How attack loops run "
                      "(default: the run's attack.loop).")
    flags.mark_flags_as_required(["workdir"])


def main(argv):
    from absl import flags, logging
    f = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    parallel.initialize_distributed()
    try:
        evaluate_workdir(f.workdir, f.stage or None, f.attacks, f.epsilon, f.epsilons, f.n,
                         f.batch, f.seed, f.data_dir, f.checks, f.export, f.loop, f.norm)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
