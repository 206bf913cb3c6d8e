"""Writes the report of a study or of one run: DIR/report.md, a results table, and PNG
plots made with matplotlib.

    python -m robust_admm.report DIR

A study's directory (study.json, cells/; experiments/study.py): one row per cell (natural
accuracy, accuracy under each attack of the study's evaluation, compression, stored size),
accuracy versus compression rate (a line per compression kind), the width table as a heat
map (cells labelled with `size` and `init`) and each cell's training curves. A run's
workdir (summary.json): one row per phase, accuracy versus compression over its phases, its
training curves and the evaluations in DIR/eval/.
"""
import math
import os

from robust_admm.experiments import workdir as workdir_lib
from robust_admm.experiments.study_config import CELL_INITS as INIT_ORDER  # heat map rows
from robust_admm.runtime import logs
from robust_admm.runtime.logs import read_json

FIGSIZE, DPI = (8.0, 4.5), 100  # every plot: 800 x 450 pixels


def pct(x) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def md_table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def kib(nbytes) -> str:
    return f"{nbytes / 1024:.1f}"


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str):
    """Writes the figure to `path` whole or not at all (a temporary file renamed)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fig.savefig(tmp, dpi=DPI, format="png")  # no bbox_inches='tight': one size for all
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot_curves(records: list, path: str, title: str):
    """Training loss and accuracy over the steps of every phase, with the evaluations."""
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=FIGSIZE)
    offset, bounds = 0, []
    phases = []
    for r in records:
        if r.get("stage") and r["stage"] not in phases:
            phases.append(r["stage"])
    for stage in phases:
        mine = [r for r in records if r.get("stage") == stage]
        train = [r for r in mine if r.get("kind") == "train"]
        evals = [r for r in mine if r.get("kind") == "eval"]
        last = max([r["step"] for r in mine if "step" in r] or [0])
        if train:
            xs = [offset + r["step"] for r in train]
            ax_loss.plot(xs, [r["loss"] for r in train], ".-", label=stage)
            ax_acc.plot(xs, [100 * r["train_acc"] for r in train], ".-", alpha=0.6,
                        label=f"{stage} train")
        if evals:
            xs = [offset + r["step"] for r in evals]
            ax_acc.plot(xs, [100 * r["nat_acc"] for r in evals], "o", color="tab:green")
            # Natural-only evaluations (no attack ran) have no robust point.
            attacked = [r for r in evals if "adv_acc" in r]
            ax_acc.plot([offset + r["step"] for r in attacked],
                        [100 * r["adv_acc"] for r in attacked], "s", color="tab:red")
        offset += last
        bounds.append(offset)
    for b in bounds[:-1]:
        for ax in (ax_loss, ax_acc):
            ax.axvline(b, color="grey", lw=0.8, ls=":")
    attack = next((r["adv_attack"] for r in records
                   if r.get("adv_attack") and "adv_acc" in r), "")
    ax_acc.plot([], [], "o", color="tab:green", label="test natural")
    if attack:
        ax_acc.plot([], [], "s", color="tab:red", label=f"test {attack.split(' (')[0]}")
    ax_loss.set_title("training loss (with the ADMM penalty)")
    ax_loss.set_yscale("log")  # the penalty's first steps dwarf the loss otherwise
    ax_acc.set_title("accuracy (%)")
    ax_acc.set_ylim(0, 100)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("step (phases one after another)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy_vs_compression(points: list, path: str, title: str, robust_label: str):
    """points: dicts with kind, compression, natural, robust (and optionally init); a line
    per kind, or per kind and init where a kind was obtained more than one way."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE, sharex=True)
    inits_of = {}
    for p in points:
        inits_of.setdefault(p["kind"], set()).add(p.get("init"))
    series = {}
    for p in points:
        label = (f"{p['kind']} ({p['init']})" if len(inits_of[p["kind"]]) > 1
                 else p["kind"])
        series.setdefault(label, []).append(p)
    for label, mine in series.items():
        mine = sorted(mine, key=lambda p: p["compression"])
        xs = [p["compression"] for p in mine]
        # No line through points at one rate (dense models: 1x, give or take an exact 0).
        style = "o" if max(xs) < 1.01 * min(xs) else "o-"
        for ax, key in zip(axes, ("natural", "robust")):
            ys = [100 * p[key] if p[key] is not None else math.nan for p in mine]
            ax.plot(xs, ys, style, label=label)
    axes[0].set_title("natural accuracy (%)")
    axes[1].set_title(f"robust accuracy (%)\n{robust_label}")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 2 and 4, not 2 x 10^0
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.set_xlabel("compression rate (all weights, x)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_width_heatmap(cells: list, path: str, title: str, robust_label: str):
    """Rows: how the model was obtained (scratch, pruned, inherited); columns: its size
    (as width w); colour: robust accuracy; text: natural / robust."""
    plt = _pyplot()
    sizes = sorted({c["labels"]["size"] for c in cells})
    inits = [i for i in INIT_ORDER if any(c["labels"].get("init") == i for c in cells)]
    grid = [[math.nan] * len(sizes) for _ in inits]
    text = [[""] * len(sizes) for _ in inits]
    for c in cells:
        i, j = inits.index(c["labels"]["init"]), sizes.index(c["labels"]["size"])
        grid[i][j] = 100 * c["robust"]
        text[i][j] = f"{100 * c['natural_acc']:.1f} / {100 * c['robust']:.1f}"
    fig, ax = plt.subplots(figsize=FIGSIZE)
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(inits)):
        for j in range(len(sizes)):
            ax.text(j, i, text[i][j] or "-", ha="center", va="center", color="white"
                    if not grid[i][j] > 60 else "black", fontsize=9)
    ax.set_xticks(range(len(sizes)), [f"size of w={s}" for s in sizes])
    ax.set_yticks(range(len(inits)), inits)
    fig.colorbar(im, ax=ax, label=f"robust accuracy (%): {robust_label}")
    ax.set_title(f"{title}\nnatural / robust accuracy (%)")
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- reports

def lowest_robust(attacks: dict) -> float | None:
    """The lowest robust accuracy over a cell's attacks (None without attacks)."""
    return min((a["robust_acc"] for a in attacks.values()), default=None)


def study_report(workdir: str) -> str:
    study = read_json(workdir_lib.study_path(workdir))
    names = list(study["cells"])
    cells, missing = [], []
    for name in names:
        path = workdir_lib.cell_result_path(workdir, name)
        if os.path.exists(path):
            cells.append(read_json(path))
        else:
            missing.append(name)
    title = study.get("name") or os.path.basename(os.path.abspath(workdir))
    labels = [k for k in ("kind", "size", "init", "rate") if any(k in c["labels"]
                                                                 for c in cells)]
    attack_labels = []
    for c in cells:
        attack_labels += [a for a in c["attacks"] if a not in attack_labels]
    header = (["cell"] + labels + ["natural %"] + [f"{a} %" for a in attack_labels]
              + ["compression (all weights)", "stored KiB", "train + eval time"])
    rows = []
    for c in cells:
        rows.append([c["cell"]] + [c["labels"].get(k, "") for k in labels]
                    + [pct(c["natural_acc"])]
                    + [pct(c["attacks"].get(a, {}).get("robust_acc")) for a in attack_labels]
                    + [f"{c['compression_rate']:.2f}x", kib(c["size"]["bytes"]),
                       logs.fmt_duration(c["wall_time_s"])])
    n = {c.get("n") for c in cells}
    eps = {a["epsilon"] for c in cells for a in c["attacks"].values()}
    lines = [f"# {title}", "",
             f"{len(cells)} of {len(names)} cells finished"
             + (f" (not yet: {', '.join(missing)})" if missing else "") + ". Accuracies on "
             f"the first {', '.join(str(v) for v in sorted(n, key=str))} test images, every "
             f"attack at epsilon {', '.join(f'{e:g}' for e in sorted(eps))} "
             f"(L-inf); each cell's final model.", "", md_table(header, rows), ""]
    resumed = [f"{c['cell']} ({c['processes']})" for c in cells if c.get("processes", 1) > 1]
    if resumed:
        lines += ["A cell's time is summed over the processes that worked on it (a killed "
                  "one up to its last record); run by more than one: " + ", ".join(resumed)
                  + ".", ""]
    for c in cells:
        c["robust"] = lowest_robust(c["attacks"])
    robust_label = "lowest of " + ", ".join(attack_labels) if attack_labels else ""
    points = [{"kind": c["labels"].get("kind", "?"), "init": c["labels"].get("init"),
               "compression": c["compression_rate"], "natural": c["natural_acc"],
               "robust": c["robust"]} for c in cells]
    plots = []
    if points:
        plot_accuracy_vs_compression(points, os.path.join(workdir, "accuracy_vs_compression.png"),
                                     title, robust_label)
        plots.append(("Accuracy versus compression rate", "accuracy_vs_compression.png"))
    sized = [c for c in cells if "size" in c["labels"] and c["labels"].get("init") in INIT_ORDER]
    if sized:
        plot_width_heatmap(sized, os.path.join(workdir, "width_heatmap.png"), title,
                           robust_label)
        plots.append(("The width table", "width_heatmap.png"))
    for heading, rel in plots:
        lines += [f"## {heading}", "", f"![{heading}]({rel})", ""]
    # Each cell's own report (its phases, evaluations, training curves), linked.
    lines += ["## Cells", ""]
    for c in cells:
        own = write_report(workdir_lib.cell_dir(workdir, c["cell"]))
        rel = os.path.relpath(own, workdir)
        curves = os.path.join(os.path.dirname(rel), "curves.png")
        lines += [f"### {c['cell']} ([report]({rel}))", "", f"![{c['cell']}]({curves})", ""]
    warnings = [(c["cell"], w) for c in cells for w in c.get("warnings", [])]
    if warnings:
        lines += ["## Warnings of the evaluations (signs of gradient masking)", ""]
        lines += [f"- {name}: {w}" for name, w in warnings] + [""]
    return "\n".join(lines)


def run_report(workdir: str) -> str:
    summary = read_json(workdir_lib.summary_path(workdir))
    title = os.path.basename(os.path.abspath(workdir))
    # The attack that measured adv_acc; none where the run's evaluations ran no attack.
    attack = next((s["adv_attack"] for s in summary["stages"].values()
                   if s.get("adv_attack") and "adv_acc" in s), "")
    short = attack.split(" (")[0] or "adv"
    header = ["phase", "kind", "rules", "natural %", *([f"{short} %"] if attack else []),
              "compression (all)", "stored KiB", "train img/s"]
    rows, points = [], []
    for name, s in summary["stages"].items():
        rate = (s.get("speed") or {}).get("img_per_s")
        size = s.get("size", {}).get("total", {})
        rows.append([name, s["kind"], f"`{s['rules']}`" if s.get("rules") else "",
                     pct(s["nat_acc"]), *([pct(s.get("adv_acc"))] if attack else []),
                     f"{s['compression_rate']['all']:.2f}x",
                     kib(size["bytes"]) if size else "", f"{rate:.0f}" if rate else ""])
        if s["kind"] != "admm":  # an admm phase's weights are not yet on their sets
            points.append({"kind": "phases", "compression": s["compression_rate"]["all"],
                           "natural": s["nat_acc"], "robust": s.get("adv_acc")})
    about = (f"adversarial accuracy under {attack}" if attack else
             "natural accuracy only (the run's evaluations ran no attack)")
    lines = [f"# {title}", "", f"Per phase, its final model; {about}.", "",
             md_table(header, rows), ""]
    for path in workdir_lib.eval_results(workdir):
        e = read_json(path)
        rows = [["natural", "", pct(e["natural_acc"])]]
        rows += [[label, f"{r['epsilon']:g}", pct(r["robust_acc"])]
                 for label, r in e["attacks"].items()]
        lines += [f"## Evaluation of {e['stage']} (robust_admm.eval, first {e['n']} test "
                  f"images)", "", md_table(["attack", "epsilon", "accuracy %"], rows), ""]
    plot_accuracy_vs_compression(points, os.path.join(workdir, "accuracy_vs_compression.png"),
                                 title, short if attack else "no attack ran")
    plot_curves(logs.read_jsonl(workdir_lib.metrics_path(workdir)),
                os.path.join(workdir, "curves.png"), title)
    lines += ["## Accuracy versus compression rate (phases)", "",
              "![accuracy versus compression](accuracy_vs_compression.png)", "",
              "## Training curves", "", "![training curves](curves.png)", ""]
    return "\n".join(lines)


def write_report(workdir: str) -> str:
    """Writes DIR/report.md (and its plots) for a study or a run; returns its path."""
    if workdir_lib.holds_study(workdir):
        text = study_report(workdir)
    elif workdir_lib.holds_run(workdir):
        text = run_report(workdir)
    else:
        raise FileNotFoundError(f"{workdir} holds neither a study (study.json) nor a run "
                                f"(summary.json)")
    path = workdir_lib.report_path(workdir)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
