"""diagnose's figures (``--plot DIR``), from its records and the loss records, as the collapse paper draws them:

- ``hidden_sim.png``: HiddenSim of every pair of adapters (Figure 1);
- ``pair_metrics.png``: a heat map per pair metric, adapters × adapters (the weight-space conflicts and the
  "Demystifying Mergeability" family, the hidden and gradient metrics where computed; the strict readings and
  the global cosine, near copies of others, are left out);
- ``pair_loss.png``: the measured loss of each merged pair, a heat map per method on one colour scale (Table 18 as a picture);
- ``metrics_vs_loss.png``: each pair metric against the pair's loss (Figure 2);
- ``collapse_limits.png``: how many merged groups keep their worst loss within a limit, per method (Figure 6);
- ``theorem1.png``: each merge's measured distortion against Δ²/4, r² and the paper's bound (y = x dashed);
- ``bins_<field>.png``: each per-adapter metric's mean per bin of S (with score records).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..stats import format_p
from .analysis import pair_losses

MAPPED = ("magnitude_change_ratio", "sign_change_ratio", "conflict_magnitude_ratio", "cosine", "l2_distance",
          "dot_product", "weight_space_angle", "magnitude_ratio", "pair_effective_rank", "pair_stable_rank",
          "spectral_gap", "subspace_overlap_col", "subspace_overlap_row", "singular_value_overlap", "hidden_sim",
          "grad_cosine", "grad_l2")
SCATTERED = ("magnitude_change_ratio", "sign_change_ratio", "conflict_magnitude_ratio", "cosine",
             "subspace_overlap_col", "subspace_overlap_row", "singular_value_overlap", "pair_effective_rank",
             "hidden_sim", "grad_cosine")


def write_figures(records: list[dict], losses: list[dict] | None, d: Path) -> list[Path]:
    """Every figure the records allow, into ``d`` (which exists); the paths written."""
    from .. import plots

    written: list[Path] = []
    ads = [r["adapter"] for r in records if r["kind"] == "adapter"]
    pairs = [r for r in records if r["kind"] == "pair"]
    names = ads or sorted({x for p in pairs for x in (p["a"], p["b"])})
    at = {a: i for i, a in enumerate(names)}

    def matrix(value) -> list[list[float | None]]:
        m = [[None] * len(names) for _ in names]
        for p in pairs:
            if p["a"] in at and p["b"] in at:
                v = value(p)
                m[at[p["a"]]][at[p["b"]]] = m[at[p["b"]]][at[p["a"]]] = v
        return m

    def out(name):
        written.append(d / name)
        return d / name

    if any(p.get("hidden_sim") is not None for p in pairs):
        m = matrix(lambda p: p.get("hidden_sim"))
        for i in range(len(names)):
            m[i][i] = 1.0
        plots.heatmaps(names, [("HiddenSim", m)], out("hidden_sim.png"), unit=(0, 1))
    drawn = [k for k in MAPPED if any(p.get(k) is not None for p in pairs)]
    if drawn and names:
        plots.heatmaps(names, [(k, matrix(lambda p, k=k: p.get(k))) for k in drawn], out("pair_metrics.png"))
    if losses:
        methods = list(dict.fromkeys(r["method"] for r in losses if len(r["adapters"]) == 2))
        per = {m: pair_losses(losses, m) for m in methods}
        if any(per.values()):
            every = [x for v in per.values() for x in v.values() if x is not None and math.isfinite(x)]
            # one colour scale for every method's panel, so that the same colour is the same loss across them
            plots.heatmaps(names, [(f"pair loss (%), {m}", matrix(lambda p, v=v: v.get(tuple(sorted((p["a"], p["b"]))))))
                                   for m, v in per.items() if v], out("pair_loss.png"),
                           unit=(min(every), max(every)) if every else None)
        by = {tuple(sorted((p["a"], p["b"]))): p for p in pairs}
        pts = {k: v for m in per.values() for k, v in m.items() if k in by}
        shown = [k for k in SCATTERED if any(by[x].get(k) is not None for x in pts)]
        corr = {r["x"]: r for r in records if r["kind"] == "stat" and r.get("y") == "pair_loss"}
        if pts and shown:
            mean = pair_losses(losses, None)
            keys = [x for x in mean if x in by]
            plots.scatters([(k, [by[x].get(k) for x in keys], [mean[x] for x in keys],
                             f"{k} (Pearson p {format_p(corr.get(k, {}).get('pearson_p'))})") for k in shown],
                           "pair merging loss (%, mean over methods)", out("metrics_vs_loss.png"))
        worst = _group_worst_by_method(losses)
        if worst:
            limits = list(range(0, 101, 5))
            plots.lines([(m, limits, [sum(-w <= lim for w in ws) for lim in limits]) for m, ws in worst.items()],
                        "merging drop limit (%)", "groups whose worst loss is within it",
                        "groups kept within a drop limit (the collapse paper's Figure 6)", out("collapse_limits.png"))
    merges = [r for r in records if r["kind"] == "merge"]
    if merges:
        dmax = [m["distortion_max"] for m in merges]
        plots.scatters([(b, [m[b] for m in merges], dmax, f"δ_max against {label}") for b, label in
                        (("lower_bound", "Δ²/4 (holds above the line)"), ("meb_radius2", "r² (holds above)"),
                         ("upper_bound_paper", "the paper's d/(2(d+1))Δ² (holds below)"))],
                       "measured δ_max", out("theorem1.png"), refs=True)
    binned = next((r for r in records if r["kind"] == "stat" and r["test"] == "binned"), None)
    corr = [r for r in records if r["kind"] == "stat" and r["test"] == "correlation" and r["y"] == "score"]
    if binned:
        for c in corr[:12]:
            if binned["bins"] and f"{c['x']}_mean" in binned["bins"][0]:
                rho = "–" if c["spearman"] is None else f"{c['spearman']:.2f}"
                plots.bars(binned["bins"], c["x"], f"{c['x']} by S (Spearman {rho})", out(f"bins_{c['x']}.png"))
    return written


def _group_worst_by_method(losses: list[dict]) -> dict[str, list[float]]:
    """Per method, the worst member loss of each merged group whose members all have a loss."""
    per: dict[tuple[str, str], list] = {}
    size: dict[str, int] = {}
    for r in losses:
        per.setdefault((r["method"], r["group"]), []).append(r["loss"])
        size[r["group"]] = len(set(r["adapters"]))
    out: dict[str, list[float]] = {}
    for (m, g), vals in per.items():
        if len(vals) == size[g] and all(v is not None for v in vals):
            out.setdefault(m, []).append(min(vals))
    return out
