"""Figures (matplotlib, PNG, no display needed): score's S, control and contribution, the histogram against its
binomial null, the Spearman table and the explanatory fields binned by S ("Will it Merge?", Figures 2-3), and
diagnose's heat maps, scatters, binned bars and lines (the collapse paper's Figures 1-6; ``diagnose.figures``
chooses what goes in them)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_figure(records: list[dict], summary: dict, path: str) -> None:
    """A score run's figure (``score_summary.summarize`` of its records). First row: S, control and contribution
    side by side (means with their intervals); the histogram of S, and of the control, beside Binomial(N, p)
    at example level ("Will it Merge?", Figure 2); the Spearman ρ of S and of the contribution with each field,
    with intervals. Then one panel per field (and the control and contribution): its mean ± standard error per
    bin of S (Figure 3, without the rescaling)."""
    plt = _plt()
    fields = summary["bin_fields"]
    cols = 4
    rows_n = 1 + -(-len(fields) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    top = axes[0]
    means = summary["means"]
    names = list(means)
    ys = [means[m]["mean"] for m in names]
    err = [[y - (means[m]["ci"] or [y, y])[0] for m, y in zip(names, ys)],
           [(means[m]["ci"] or [y, y])[1] - y for m, y in zip(names, ys)]]
    top[0].bar(names, ys, yerr=err, capsize=4, color=["tab:blue", "tab:gray", "tab:green"][:len(names)])
    top[0].axhline(0, color="black", lw=0.5)
    top[0].set_title("mean with its interval", fontsize=9)
    N = summary["trials"]
    a = top[1]
    if summary.get("binomial") and summary["binomial"].get("n"):
        fit = summary["binomial"]
        xs = [j / N for j in range(N + 1)]
        w = 0.25 / N
        a.bar([x - w for x in xs], fit["observed"], width=w, label="S", color="tab:blue")
        ctl = [r["control"] for r in records if r.get("control") is not None]
        if ctl:  # control values at the nearest k/N (fewer control trials than N where a partition had none)
            a.bar(xs, [sum(1 for c in ctl if round(c * N) == j) for j in range(N + 1)], width=w, label="control",
                  color="tab:gray")
        a.bar([x + w for x in xs], fit["expected"], width=w, label=f"Binomial({N}, {fit['p']:.2f})", color="tab:red")
        ex = summary.get("existence") or {}
        title = "S against the binomial"
        if ex.get("p") is not None:
            from .stats import format_p

            title += f" (within-merge permutation p {format_p(ex['p'], ex['floor'])})"
        a.set_title(title, fontsize=8)
    else:
        a.hist([[r[m] for r in records if r.get(m) is not None] for m in ("score", "control") if m in means],
               bins=10, range=(0, 1), label=[m for m in ("score", "control") if m in means])
        a.set_title("S and control", fontsize=9)
    a.set_xlabel("per adapter")
    a.legend(fontsize=7)
    a = top[2]
    rows = summary["spearman"]
    measures = list(dict.fromkeys(r["measure"] for r in rows))
    fl = summary["fields"]
    for k, m in enumerate(measures):
        got = {r["field"]: r for r in rows if r["measure"] == m}
        yy = [i + (k - (len(measures) - 1) / 2) * 0.35 for i in range(len(fl))]
        rho = [got[f]["rho"] if got[f]["rho"] is not None else float("nan") for f in fl]
        lo = [r - (got[f]["ci"] or [r, r])[0] for f, r in zip(fl, rho)]
        hi = [(got[f]["ci"] or [r, r])[1] - r for f, r in zip(fl, rho)]
        a.errorbar(rho, yy, xerr=[lo, hi], fmt="o", capsize=2, ms=3, label=f"ρ({m})")
    a.set_yticks(range(len(fl)), fl, fontsize=6)
    a.axvline(0, color="black", lw=0.5)
    a.set_xlim(-1, 1)
    a.set_title("Spearman ρ with its interval", fontsize=9)
    a.legend(fontsize=7)
    top[3].axis("off")
    bins = summary["bins"]
    rest = [ax for row in axes[1:] for ax in row]
    for ax, f in zip(rest, fields):
        xs = list(range(len(bins)))
        ax.errorbar(xs, [r[f + "_mean"] for r in bins], yerr=[r[f + "_se"] or 0 for r in bins], marker="o",
                    capsize=3)
        ax.set_xticks(xs, [r["bin"] for r in bins], fontsize=7)
        ax.set_xlabel("S")
        ax.set_title(f"{f} (mean ± s.e.)", fontsize=9)
    for ax in rest[len(fields):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def heatmaps(names: list[str], panels: list[tuple[str, list[list[float | None]]]], path: Path,
             unit: tuple[float, float] | None = None) -> None:
    """One heat map per (title, n×n matrix) over the same names, side by side (None cells blank); each panel
    with its own colour range, or ``unit`` for all."""
    import math

    plt = _plt()
    n = len(names)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    side = min(4.5, max(2.6, 0.18 * n + 1.6))
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.6, side * rows), squeeze=False)
    for ax, (title, m) in zip(axes.flat, panels):
        data = [[math.nan if v is None else v for v in row] for row in m]
        lo, hi = unit or (None, None)
        im = ax.imshow(data, cmap="viridis", vmin=lo, vmax=hi)
        fs = 7 if n <= 16 else 5
        ax.set_xticks(range(n), names, rotation=70, ha="right", fontsize=fs)
        ax.set_yticks(range(n), names, fontsize=fs)
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path, dpi=72)


def lines(series: list[tuple[str, list[float], list[float]]], xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """One line per (label, x, y)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, x, y in series:
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi=90)


def scatters(panels: list[tuple[str, list[float], list[float], str]], ylabel: str, path: Path,
             refs: bool = False) -> None:
    """One scatter per (metric, x, y, caption); ``refs`` adds y = x, for x against a bound."""
    plt = _plt()
    cols = min(4, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, x, y, caption) in zip(axes.flat, panels):
        ax.scatter(x, y, s=12)
        if refs and x:
            lo, hi = min(min(x), min(y)), max(max(x), max(y))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.set_xlabel(name)
        ax.set_ylabel(ylabel)
        ax.set_title(caption, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path, dpi=90)


def bars(rows: list[dict], field: str, title: str, path: Path) -> None:
    """Mean ± standard error of ``field`` per bin (``binned``'s rows)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["bin"] for r in rows], [r[field + "_mean"] or 0 for r in rows],
           yerr=[r[field + "_se"] or 0 for r in rows], capsize=3)
    ax.set_title(title)
    ax.set_ylabel(field)
    fig.tight_layout()
    _save(fig, path, dpi=90)


def _save(fig, path, dpi: int = 120) -> None:
    """Through the atomic writer, as every output: whole or not at all, with the mode a plain open gives."""
    from .outputs import atomic_output

    try:
        with atomic_output(str(path)) as fh:
            fig.savefig(fh, format="png", dpi=dpi)
    finally:
        _plt().close(fig)
