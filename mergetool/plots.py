"""Figures (matplotlib, PNG, no display needed): the score histogram against its binomial null with the
explanatory fields binned by S ("Will it Merge?", Figures 2-3), and diagnose's HiddenSim heatmap,
metric-against-loss scatters and binned bars (the collapse paper's Figures 1-3)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_figure(records: list[dict], trials: int, level: str, fields: Sequence[str], path: str) -> None:
    """First panel: how many adapters have each S, beside Binomial(N, p) (example level; Figure 2). Then one
    panel per explanatory field: its mean ± standard error per bin of S (Figure 3, without the rescaling)."""
    from .stats import binned, binomial_fit

    plt = _plt()
    fields = [f for f in fields if any(r.get(f) is not None for r in records)]
    cols = 4
    rows_n = -(-(len(fields) + 1) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
    a = axes.flat[0]
    scores = [r["score"] for r in records]
    if level == "example":
        fit = binomial_fit(scores, trials)
        xs = [j / trials for j in range(trials + 1)]
        w = 0.35 / trials
        a.bar([x - w / 2 for x in xs], fit["observed"], width=w, label="adapters", color="tab:blue")
        a.bar([x + w / 2 for x in xs], fit["expected"], width=w, label=f"Binomial({trials}, {fit['p']:.2f})",
              color="tab:red")
        title = "S against the binomial"
        if fit["p_value"] is not None:
            title += f" (χ² p={fit['p_value']:.2g})"
        a.set_title(title, fontsize=9)
    else:
        a.hist(scores, bins=10, range=(0, 1), color="tab:blue", label="adapters")
        a.set_title("S", fontsize=9)
    a.set_xlabel("S")
    a.legend(fontsize=7)
    rows = binned(records, "score", fields, trials)
    for ax, f in zip(list(axes.flat)[1:], fields):
        xs = list(range(len(rows)))
        ax.errorbar(xs, [r[f + "_mean"] for r in rows], yerr=[r[f + "_se"] or 0 for r in rows], marker="o",
                    capsize=3)
        ax.set_xticks(xs, [r["bin"] for r in rows], fontsize=7)
        ax.set_xlabel("S")
        ax.set_title(f"{f} (mean ± s.e.)", fontsize=9)
    for ax in list(axes.flat)[len(fields) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def heatmap(names: list[str], matrix: list[list[float]], title: str, path: Path) -> None:
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)))
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save(fig, path)


def scatters(panels: list[tuple[str, list[float], list[float], str]], ylabel: str, path: Path) -> None:
    """One scatter per (metric, x, y, caption)."""
    plt = _plt()
    cols = min(4, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, x, y, caption) in zip(axes.flat, panels):
        ax.scatter(x, y, s=12)
        ax.set_xlabel(name)
        ax.set_ylabel(ylabel)
        ax.set_title(caption, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def bars(rows: list[dict], field: str, title: str, path: Path) -> None:
    """Mean ± standard error of ``field`` per bin (``binned``'s rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["bin"] for r in rows], [r[field + "_mean"] or 0 for r in rows],
           yerr=[r[field + "_se"] or 0 for r in rows], capsize=3)
    ax.set_title(title)
    ax.set_ylabel(field)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path) -> None:
    """Through the atomic writer, as every output: whole or not at all, with the mode a plain open gives."""
    from .outputs import atomic_output

    try:
        with atomic_output(str(path)) as fh:
            fig.savefig(fh, format="png", dpi=120)
    finally:
        _plt().close(fig)
