"""The tables diagnose prints on stderr, computed from its records (the command only renders them): the pairs,
the adapters, the group of all the adapters with Theorem 1's bounds, the merges, the statistics, Theorem 1
against the merges, each fitted predictor with its baselines, the comparison of fits, the selection."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stats import format_p


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str | None = None


PAIR_COLUMNS = ("magnitude_change_ratio", "sign_change_ratio", "conflict_magnitude_ratio", "cosine",
                "subspace_overlap_col", "subspace_overlap_row", "hidden_sim", "grad_cosine")
ADAPTER_COLUMNS = ("norm_f", "sigma_max", "effective_rank", "mds", "mean_hidden_sim", "gap", "p_correct", "finetuned")
SHOWN = 40
BASELINES = 10


def fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def fmt_ci(ci) -> str:
    return "–" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def fmt_r(r, ci) -> str:
    """A correlation with its interval: 0.29 [-0.38, 0.82]."""
    return "–" if r is None else f"{r:.2f} {fmt_ci(ci)}"


def tables(records: list[dict]) -> list[Table | str]:
    """Every table (or line) of the records, in the order printed."""
    out: list[Table | str] = []
    by = {}
    for r in records:
        by.setdefault(r["kind"], []).append(r)
    pairs = by.get("pair", [])
    if pairs:
        cols = [c for c in PAIR_COLUMNS if any(p.get(c) is not None for p in pairs)]
        t = Table(f"pairs ({len(pairs)})", ["a", "b", *[c.replace("_ratio", "").replace("_", " ") for c in cols]])
        t.rows = [[p["a"], p["b"], *[fmt(p.get(c)) for c in cols]] for p in pairs[:SHOWN]]
        if len(pairs) > SHOWN:
            t.note = f"(… {len(pairs) - SHOWN} more pairs in the records)"
        out.append(t)
    ads = by.get("adapter", [])
    if ads:
        cols = [c for c in ADAPTER_COLUMNS if any(a.get(c) is not None for a in ads)]
        out.append(Table("adapters", ["adapter", *cols], [[a["adapter"], *[fmt(a.get(c)) for c in cols]] for a in ads]))
    everyone = {a["adapter"] for a in ads}
    for g in by.get("group", []):
        if set(g["adapters"]) != everyone:
            continue
        out.append(f"group of {g['n_models']} on {g['n_inputs']} inputs (d = {g['hidden_dim']}): Δ² = "
                   f"{fmt(g['diameter2'])} {tuple(g['diameter_pair'] or ())}; every merge's distortion ≥ Δ²/4 = "
                   f"{fmt(g['lower_bound'])}, ≥ r² = {fmt(g['meb_radius2'])} (smallest ball); the paper's bound "
                   f"d/(2(d+1))·Δ² = {fmt(g['upper_bound_paper'])}, Jung's (N−1)/(2N)·Δ² = {fmt(g['upper_bound_jung'])}")
        if "verdict" in g:
            out.append(f"budget {fmt(g['budget'])}: paper's test {'passes' if g['mergeable_paper'] else 'fails'}; "
                       f"verdict {g['verdict']}")
    others = len(by.get("group", [])) - sum(set(g["adapters"]) == everyone for g in by.get("group", []))
    if others:
        out.append(f"({others} merged groups, each with its members' MDS and Theorem 1's bounds, in the records)")
    merges = by.get("merge", [])
    if merges:
        t = Table(f"merges ({len(merges)}): distortion against Theorem 1",
                  ["merge", "method", "members", "δ_max", "Δ²/4", "r²", "paper", "≥ Δ²/4", "≥ r²", "≤ paper"])
        t.rows = [[m["merged"], str(m.get("method")), str(len(m["adapters"])), fmt(m["distortion_max"]),
                   fmt(m["lower_bound"]), fmt(m["meb_radius2"]), fmt(m["upper_bound_paper"]),
                   fmt(m["holds"]["lower_bound"]), fmt(m["holds"]["meb_radius2"]),
                   fmt(m["holds"]["upper_bound_paper"])] for m in merges[:SHOWN]]
        out.append(t)
    stats = by.get("stat", [])
    basic = [s for s in stats if s["test"] in ("correlation", "anova1", "anova2")]
    if basic:
        t = Table("statistics", ["test", "x", "y", "where", "r / F", "p", "p (perm.)", "ρ", "p(ρ)", "p(ρ) (perm.)",
                                 "n"])
        for s in basic:
            if s["test"] == "correlation":  # perm.: Mantel's, for pair metrics (the pairs share adapters)
                t.rows.append(["corr", s["x"], s["y"], str(s.get("method") or s.get("group") or ""), fmt(s["pearson"]),
                               format_p(s["pearson_p"]), format_p(s.get("pearson_p_mantel"), s.get("mantel_floor")),
                               fmt(s["spearman"]), format_p(s["spearman_p"]),
                               format_p(s.get("spearman_p_mantel"), s.get("mantel_floor")), str(s["n"])])
                continue
            floor = 1 / (s["permutations"] + 1) if s.get("permutations") else None
            if s["test"] == "anova1":
                t.rows.append(["anova", s["factor"], "loss", "", fmt(s["F"]), format_p(s["p_value"]),
                               format_p(s.get("p_permutation"), floor), "", "", "", str(s["n"])])
            else:
                for f in s.get("factors", []):
                    if isinstance(s.get(f), dict):
                        t.rows.append(["anova2", f, "loss", "given the other", fmt(s[f]["F"]), format_p(s[f]["p_value"]),
                                       format_p(s[f].get("p_permutation"), floor), "", "", "", str(s.get("n"))])
        t.note = ("p (perm.): ANOVA, labels permuted within each merged group (the cells of a group are not "
                  "independent); a pair metric against the pair loss, Mantel's (the adapters' labels permuted: the "
                  "pairs share adapters)")
        out.append(t)
    bounds = [s for s in stats if s["test"] == "theorem1_bounds"]
    if bounds:
        keys = list(bounds[0]["holds"])
        t = Table("Theorem 1: how often each bound holds for the measured δ_max", ["method", "merges", *keys])
        t.rows = [[s["method"], str(s["n"]), *[f"{s['holds'][k]}/{s['n']}" for k in keys]] for s in bounds]
        out.append(t)
    vs = [s for s in stats if s["test"] == "theorem1_vs_weights"]
    if vs:
        t = Table("the group's worst loss: best representation quantity against best weight-space metric (|ρ|)",
                  ["method", "size", "n", "representation", "ρ", "weight space", "ρ", "|ρ| difference [95% CI]"])
        t.rows = [[s["method"], s["size"], str(s["n"]), s["representation"], fmt(s["spearman_representation"]),
                   s["weight_space"], fmt(s["spearman_weight_space"]),
                   fmt_r(s["abs_difference"], s["abs_difference_ci"])] for s in vs]
        out.append(t)
    for m in by.get("model", []):
        out += model_tables(m)
    for c in by.get("comparison", []):
        out += comparison_tables(c)
    for s in by.get("selection", []):
        out.append(f"selected {s['group']}: worst MDS {fmt(s['worst_mds_before'])} -> {fmt(s['worst_mds_after'])} "
                   f"({'; '.join(str(x) for x in s['steps']) or 'no change lowers it'})")
    return out


def model_tables(m: dict) -> list[Table | str]:
    v = m.get("validation") or {}
    nz = {f: round(w, 4) for f, w in zip(m["features"], m["weights"]) if w}
    what = m["target"] + (f" ({m['method']})" if m.get("method") else "")
    out: list[Table | str] = [f"predictor of {what}: weights {nz}"]
    if "skipped" in v:
        return out + [f"leave-one-task-out: {v['skipped']}"]
    if not v:
        return out
    t = Table(f"leave-one-task-out, {v['n']} held-out predictions; 95% intervals: {v['bootstrap']['unit']} "
              f"bootstrap ({v['bootstrap']['resamples']})", ["model", "Pearson", "Spearman", "fold mean r",
                                                            "predictor − it (r)"])
    t.rows.append(["predictor", fmt_r(v["pearson"], v["pearson_ci"]), fmt_r(v["spearman"], v["spearman_ci"]),
                   fmt(v.get("fold_pearson_mean")), ""])
    ranked = sorted(m.get("baselines") or [], key=lambda b: -abs(b["pearson"] or 0))
    shown = ranked[:BASELINES] + [b for b in ranked[BASELINES:] if b["name"] in ("cosine", "base_knowledge")]
    for b in shown:
        t.rows.append([b["name"], fmt_r(b["pearson"], b["pearson_ci"]), fmt_r(b["spearman"], b["spearman_ci"]),
                       fmt(b.get("fold_pearson_mean")), fmt_ci(b.get("predictor_minus_pearson_ci"))])
    notes = []
    if len(ranked) > len(shown):
        notes.append(f"(… {len(ranked) - len(shown)} more baselines, each metric alone, in the model record)")
    if v.get("fits_not_converged"):
        notes.append(f"{v['fits_not_converged']} fold fits did not converge")
    t.note = "; ".join(notes) or None
    out.append(t)
    g = m.get("groups")
    if g:
        t = Table(f"a group's worst loss from its pairs ({g['n_groups']} groups; {g['holdout']}; 95% intervals: "
                  f"{g['bootstrap']['unit']})", ["model", "Pearson", "Spearman", "predictor − it (ρ)"])
        p = g["predictor"]
        t.rows.append(["predictor", fmt_r(p["pearson"], p["pearson_ci"]), fmt_r(p["spearman"], p["spearman_ci"]), ""])
        for b in sorted(g["baselines"], key=lambda b: -abs(b["spearman"] or 0))[:BASELINES]:
            t.rows.append([b["name"], fmt_r(b["pearson"], b["pearson_ci"]), fmt_r(b["spearman"], b["spearman_ci"]),
                           fmt_ci(b.get("predictor_minus_spearman_ci"))])
        out.append(t)
    return out


def comparison_tables(c: dict) -> list[Table | str]:
    t = Table(f"fits compared ({c['n_fits']})", ["fit", "top 5 metrics (mean weight)", "top is gradient",
                                                 "gradient in top 5", "LOTO Pearson"])
    for f in c["fits"]:
        t.rows.append([f["label"], ", ".join(f"{k} {w:+.3g}" for k, w in f["top5_weights"].items()) or "–",
                       fmt(f["top_is_gradient"]), str(f["gradient_in_top5"]), fmt(f["loto_pearson"])])
    p = Table("pairs of fits", ["a", "b", "top-5 overlap", "sign agreement", "signs compared"])
    p.rows = [[x["a"], x["b"], f"{x['top5_overlap']:.0%}", "–" if x["sign_agreement"] is None else
               f"{x['sign_agreement']:.1%}", str(x["signs_compared"])] for x in c["pairs"]]
    mo, ms = c["mean_top5_overlap"], c["mean_sign_agreement"]
    line = (f"mean top-5 overlap {'–' if mo is None else f'{mo:.1%}'} (paper 64.0%), mean sign agreement "
            f"{'–' if ms is None else f'{ms:.1%}'} (paper 79.3%); a gradient metric is the top metric in "
            f"{c['top_is_gradient']} of {c['n_fits']} fits")
    return [t, p, line]
