"""`report.png`: each layer's bits and kept-filter fraction, drawn with matplotlib from the
report's layer rows alone."""

from __future__ import annotations

from pathlib import Path


def plot(rows: list[dict], path: Path) -> None:
    """The PNG of the report's layer rows at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(rows) + 2), 6),
                                   sharex=True)
    width = 0.4
    ax1.bar([i - width / 2 for i in x], [min(r["w_bits"], 16) for r in rows], width,
            label="weights")
    ax1.bar([i + width / 2 for i in x], [min(r["a_bits"], 16) for r in rows], width,
            label="activations")
    ax1.set_ylabel("bits (float shown as 16)")
    ax1.set_yticks([2, 4, 8, 16])
    ax1.legend(loc="upper right", fontsize=8)
    ax2.bar(list(x), [r["kept"] / r["total"] for r in rows], color="tab:green")
    ax2.set_ylabel("kept filters")
    ax2.set_ylim(0, 1.05)
    ax2.set_xticks(list(x))
    ax2.set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # the name may be a temporary one
    plt.close(fig)
