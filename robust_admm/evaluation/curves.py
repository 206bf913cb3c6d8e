"""Robust accuracy versus epsilon, as a plot."""


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
