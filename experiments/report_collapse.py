"""The tables of EXPERIMENTS.md's collapse section (stages ``merges`` and ``collapse``), from their records.

Registered into ``report.TABLES`` when ``report`` is imported. The merging loss of a (group, method, task) cell is
100·(acc_merged/acc_alone − 1) on the task's dev examples; a group's cells share its merge, and every task is in
many groups, so cells are not independent: the tables give means and worst values as descriptions, and the
tests are the ones diagnose runs with their design said (ANOVA permutations within merged groups, Mantel tests for
pair metrics, task bootstraps for the fits).
"""

from __future__ import annotations

import math
from pathlib import Path

from mergetool.stats import format_p

from .harness import read_jsonl
from .report import ci, num, table

SIZES_NOTE = "pairs with every method, groups of 3-8 with the collapse paper's Table 3 methods"


def _methods(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _stats(records: Path, test: str) -> list[dict]:
    return [r for r in read_jsonl(records / "collapse-stats.jsonl")
            if r.get("kind") == "stat" and r.get("test") == test and r.get("fitted_on") == "all"]


def _models(records: Path) -> list[dict]:
    return [r for r in read_jsonl(records / "collapse-stats.jsonl") if r.get("kind") == "model"]


@table("collapse-loss-size", ["merges.jsonl"])
def loss_by_size(records: Path) -> str:
    rows = [r for r in read_jsonl(records / "merges.jsonl") if r["loss"] is not None]
    methods = _methods(rows)
    sizes = sorted({r["size"] for r in rows})
    lines = ["| group size | groups | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for k in sizes:
        cells = []
        for m in methods:
            xs = [r["loss"] for r in rows if r["size"] == k and r["method"] == m]
            cells.append(f"{_mean(xs):+.1f} / {min(xs):+.1f}" if xs else "–")
        n = len({r["group"] for r in rows if r["size"] == k})
        lines.append(f"| {k} | {n} | " + " | ".join(cells) + " |")
    lines.append(f"\nMerging loss in %, mean over the (group, task) cells / the worst cell; {SIZES_NOTE} (–: not "
                 f"merged).")
    return "\n".join(lines)


@table("collapse-loss-task", ["merges.jsonl", "accuracy.jsonl"])
def loss_by_task(records: Path) -> str:
    rows = [r for r in read_jsonl(records / "merges.jsonl") if r["size"] == 2]
    acc = {r["task"]: r for r in read_jsonl(records / "accuracy.jsonl")}
    methods = _methods(rows)
    tasks = sorted({r["task"] for r in rows})
    lines = ["| task | n | alone | " + " | ".join(methods) + " | worst pair (method, loss) |",
             "|---|---|---|" + "---|" * (len(methods) + 1)]
    order = []
    for t in tasks:
        mine = [r for r in rows if r["task"] == t and r["loss"] is not None]
        means = {m: _mean([r["loss"] for r in mine if r["method"] == m]) for m in methods}
        worst = min(mine, key=lambda r: r["loss"])
        partner = next(x for x in worst["members"] if x != t)
        order.append((_mean([v for v in means.values() if v is not None]), t, means, worst, partner))
    for _, t, means, worst, partner in sorted(order, key=lambda x: x[0]):
        lines.append(f"| {t} | {acc[t]['n']} | {acc[t]['expert']:.2f} | " +
                     " | ".join("–" if means[m] is None else f"{means[m]:+.1f}" for m in methods) +
                     f" | with {partner} ({worst['method']}, {worst['loss']:+.1f} ± {num(worst['loss_se'], 1)}) |")
    n_pairs = len({r["group"] for r in rows if r["task"] == tasks[0]}) if tasks else 0
    lines.append(f"\nMerging loss in %, each task's mean over its {n_pairs} pairs, per method (the tasks from the "
                 f"largest mean loss down); the worst pair with the loss's standard error (the dev example the unit).")
    return "\n".join(lines)


@table("collapse-anova", ["collapse-stats.jsonl"])
def anova(records: Path) -> str:
    lines = ["| test | factor | cells | F | p (F-test) | p (permutation) |", "|---|---|---|---|---|---|"]
    for s in _stats(records, "anova1"):
        floor = 1 / (s["permutations"] + 1)
        lines.append(f"| one-way | {s['factor']} | {s['n']} | {s['F']:.2f} | {format_p(s['p_value'])} | "
                     f"{format_p(s['p_permutation'], floor)} |")
    for s in _stats(records, "anova2"):
        floor = 1 / (s["permutations"] + 1)
        for f in s["factors"]:
            lines.append(f"| two-way, given the other | {f} | {s['n']} | {s[f]['F']:.2f} | {format_p(s[f]['p_value'])} "
                         f"| {format_p(s[f]['p_permutation'], floor)} |")
    lines.append("\nThe merging loss of every (group, method, task) cell. The F-test treats cells as independent; "
                 "they are not (a group's cells share one merge, a task is in many groups). The permutation p "
                 "permutes the factor's labels within each merged group, which keeps that dependence.")
    return "\n".join(lines)


@table("collapse-pair-metrics", ["collapse-stats.jsonl"])
def pair_metrics(records: Path) -> str:
    stats = [s for s in _stats(records, "correlation") if s.get("y") == "pair_loss"]
    methods = list(dict.fromkeys(s["method"] for s in stats))
    metrics = list(dict.fromkeys(s["x"] for s in stats))
    by = {(s["x"], s["method"]): s for s in stats}
    lines = ["| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for x in metrics:
        cells = []
        for m in methods:
            s = by.get((x, m))
            if s is None or s.get("spearman") is None:
                cells.append("–")
                continue
            p = s.get("spearman_p_mantel")
            mark = "**" if p is not None and p < 0.05 else ""
            cells.append(f"{mark}{s['spearman']:+.2f}{mark} ({format_p(p, s.get('mantel_floor'))})")
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    n = stats[0]["n"] if stats else 0
    lines.append(f"\nSpearman ρ of each pair metric with the pair's merging loss (the mean of its two members'), "
                 f"{n} pairs, per method; in brackets the Mantel permutation p (the tasks' labels permuted: the pairs "
                 f"share tasks, so the plain p-values, in the records, are too small); bold: p < 0.05, with no "
                 f"correction for the {len(metrics) * len(methods)} tests. A positive ρ: the larger the metric, the "
                 f"smaller the loss (losses are negative).")
    return "\n".join(lines)


@table("collapse-mds", ["collapse-stats.jsonl", "merges.jsonl"])
def mds(records: Path) -> str:
    stats = [s for s in _stats(records, "correlation") if s.get("x") == "mds"]
    size = {r["group"]: r["size"] for r in read_jsonl(records / "merges.jsonl")}
    lines = ["| group size | groups | mean Pearson r | negative r | p < 0.05 (negative) | mean Spearman ρ |",
             "|---|---|---|---|---|---|"]
    for k in sorted({size[s["group"]] for s in stats}):
        mine = [s for s in stats if size[s["group"]] == k and s.get("pearson") is not None]
        rho = [s["spearman"] for s in mine if s.get("spearman") is not None]
        lines.append(f"| {k} | {len(mine)} | {num(_mean([s['pearson'] for s in mine]), 2)} | "
                     f"{sum(s['pearson'] < 0 for s in mine)} | "
                     f"{sum(s['pearson_p'] < 0.05 and s['pearson'] < 0 for s in mine)} | {num(_mean(rho), 2)} |")
    lines.append("\nPer merged group of three or more: the correlation over its members of each member's MDS with "
                 "its best merging loss over the methods (the collapse paper's Table 5 predicts r < 0: the larger "
                 "the MDS, the larger the loss). Each group's test has 3-8 members, so almost no power alone; the "
                 "count of negative r among the groups is the summary to read (about half under no relation).")
    return "\n".join(lines)


@table("collapse-theorem1", ["collapse-stats.jsonl"])
def theorem1(records: Path) -> str:
    bounds = _stats(records, "theorem1_bounds")
    keys = list(bounds[0]["holds"]) if bounds else []
    lines = ["| method | merges | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for s in bounds:
        lines.append(f"| {s['method']} | {s['n']} | " +
                     " | ".join(f"{s['holds'][k]} ({100 * s['fraction'][k]:.0f} %)" for k in keys) + " |")
    lines.append("\nHow many merges' measured distortion δ_max (the largest squared distance of a member's hidden "
                 "state from the merge's, over the validation examples) respects each of Theorem 1's quantities: "
                 "lower_bound Δ²/4 (δ_max ≥ it: the theorem's lower bound), meb_radius2 the exact smallest "
                 "enclosing ball's r² (δ_max ≥ it always), upper_bound_paper and upper_bound_jung the bounds on r² "
                 "(docs/science.md).")
    return "\n".join(lines)


@table("collapse-theorem1-vs-weights", ["collapse-stats.jsonl"])
def theorem1_vs_weights(records: Path) -> str:
    rows = _stats(records, "theorem1_vs_weights")
    lines = ["| method | groups | n | loss | best representation quantity (ρ) | best weight-space metric (ρ) | "
             "|ρ| difference [95% CI] |", "|---|---|---|---|---|---|---|"]
    for s in rows:
        lines.append(f"| {s['method']} | {s['size']} | {s['n']} | {s['y']} | {s['representation']} "
                     f"({s['spearman_representation']:+.2f}) | {s['weight_space']} ({s['spearman_weight_space']:+.2f}) "
                     f"| {s['abs_difference']:+.2f} {ci(s['abs_difference_ci'])} |")
    lines.append("\nPer method and group size, the representation quantity (distortion, r², MDS) and the "
                 "weight-space metric whose Spearman ρ with the group's loss is largest in size, and the interval "
                 "of the difference of the two |ρ| on the same task-bootstrap resamples (above 0: the "
                 "representations predict better; across 0: the testbed cannot tell). Choosing the best of each "
                 "family on the same data favours the larger family.")
    return "\n".join(lines)


def _top(model: dict, k: int = 5) -> list[tuple[str, float]]:
    """The k largest |weights|, zeros left out: the mean weights over the leave-one-task-out folds where the
    model has them (the authors' "average coefficients", as ``--compare-fits`` ranks them), else the fit's."""
    v = (model.get("validation") or {}).get("mean_weights")
    coef = dict(v) if v else dict(zip(model["features"], model["weights"]))
    return sorted(((f, x) for f, x in coef.items() if abs(x) > 1e-10), key=lambda t: -abs(t[1]))[:k]


@table("collapse-fits", ["collapse-stats.jsonl"])
def fits(records: Path) -> str:
    lines = ["| fitted on | pairs | top metrics (sign) | held-out ρ [95% CI] | best single metric: ρ | cosine: ρ | "
             "predictor − cosine [95% CI] | group worst loss: ρ (predictor / cosine / size alone) |",
             "|---|---|---|---|---|---|---|---|"]
    for m in _models(records):
        v = m.get("validation") or {}
        base = {b["name"]: b for b in m.get("baselines") or []}
        single = max((b for b in base.values() if b.get("spearman") is not None and len(b["features"]) == 1),
                     key=lambda b: b["spearman"], default=None)
        cos = base.get("cosine")
        diff = (cos or {}).get("predictor_minus_spearman_ci")
        g = m.get("groups") or {}
        gp = (g.get("predictor") or {}).get("spearman")
        gc = next((b.get("spearman") for b in g.get("baselines") or [] if b["name"] == "cosine"), None)
        gs = next((b.get("spearman") for b in g.get("baselines") or [] if b["name"] == "group size alone"), None)
        top = ", ".join(f"{f} ({'+' if x > 0 else '−'})" for f, x in _top(m)) or "none"
        lines.append(f"| {m['fitted_on']} | {(m.get('fit') or {}).get('n', '–')} | {top} | {num(v.get('spearman'), 2)} "
                     f"{ci(v.get('spearman_ci'))} | {single['name'] + ': ' + num(single['spearman'], 2) if single else '–'} "
                     f"| {num((cos or {}).get('spearman'), 2)} | {ci(diff)} | {num(gp, 2)} / {num(gc, 2)} / {num(gs, 2)} |")
    lines.append("\nThe sparse linear predictor of a pair's normalised accuracy (1 + loss/100) from every pair "
                 "metric, fitted per method and on the mean over the methods (\"all\"); its top metrics by the mean "
                 "weight over the leave-one-task-out folds, as the next table ranks them; held out: leave one task "
                 "out (every pair holding the task out of the fit), the Spearman of all held-out forecasts with "
                 "the truth, its interval by the task bootstrap; the baselines get the same folds (least squares "
                 "on one metric). The best single metric is chosen after the fact, on the same folds. The last "
                 "column: each merged group's worst loss forecast from its pairs, as `--predict` does, against the "
                 "forecast from the group's size alone (the worst of more pairs is lower whatever the forecasts: "
                 "a predictor helps only where it beats that; the groups "
                 "are merged with the Table 3 methods only: \"all\" fits the pairs' mean over every method and is "
                 "judged on the groups' mean over those five; the subspace methods have no groups).")
    return "\n".join(lines)


@table("collapse-compare", ["collapse-compare.jsonl"])
def compare(records: Path) -> str:
    c = read_jsonl(records / "collapse-compare.jsonl")[0]
    lines = ["| method | top 5 | gradient metrics in top 5 |", "|---|---|---|"]
    for f in c["fits"]:
        lines.append(f"| {f['label']} | {', '.join(f['top5']) or 'none'} | {f['gradient_in_top5']} |")
    paper = c.get("paper") or {}
    lines.append(f"\nAcross the {c['n_fits']} per-method fits: mean top-5 overlap {100 * c['mean_top5_overlap']:.1f} % "
                 f"(paper: {100 * paper.get('mean_top5_overlap', math.nan):.1f} %), mean sign agreement "
                 f"{100 * c['mean_sign_agreement']:.1f} % (paper: {100 * paper.get('mean_sign_agreement', math.nan):.1f} %); "
                 f"a gradient metric is the top metric of {c['top_is_gradient']} of {c['n_fits']} fits.")
    return "\n".join(lines)


@table("collapse-selection", ["collapse-selection.jsonl"])
def selection(records: Path) -> str:
    rows = read_jsonl(records / "collapse-selection.jsonl")
    lines = ["| group | swaps | worst MDS before → after | worst loss before (task) | after (task) | "
             "mean loss before → after |", "|---|---|---|---|---|---|"]
    for r in rows:
        steps = "; ".join(f"{s['replace']} → {s['with']}" if "replace" in s else f"drop {s.get('drop')}"
                          for s in r["steps"]) or "none"
        lines.append(f"| {r['group']} | {steps} | {r['worst_mds_before']:.2f} → {r['worst_mds_after']:.2f} | "
                     f"{num(r['worst_loss_before'], 1)} ({r['worst_task_before']}) | {num(r['worst_loss_after'], 1)} "
                     f"({r['worst_task_after']}) | {num(r['mean_loss_before'], 1)} → {num(r['mean_loss_after'], 1)} |")
    changed = [r for r in rows if r["changed"] and r["worst_loss_after"] is not None]
    better = sum(r["worst_loss_after"] > r["worst_loss_before"] for r in changed)
    method = rows[0]["method"] if rows else ""
    lines.append(f"\n`diagnose --select` on each random group (the others as candidates), its proposal merged with "
                 f"{method} and evaluated; losses in %. The worst loss improved in {better} of the {len(changed)} "
                 f"groups the selection changed (a sign test of this count is the test of the selection).")
    return "\n".join(lines)
