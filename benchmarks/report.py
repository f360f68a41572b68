"""The tables of EXPERIMENTS.md, printed as markdown from what benchmarks/experiments.py wrote.

    python benchmarks/report.py mergeability --out exp/
    python benchmarks/report.py collapse --out exp/
    python benchmarks/report.py weighted --out exp/

The statistics are mergetool's own (mergetool.stats: the binomial fit, Spearman with p-values, bins with
standard errors; diagnose's records for the collapse tables), so the report says what the commands say.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergetool.stats import binned, binomial_fit, correlate, format_p  # noqa: E402

FIELDS = ["gap", "rank", "p_correct", "delta_trained", "perplexity", "length", "norm_f", "sigma_max"]


def jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def f(x, d=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{d}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{d}f}"
    return str(x)


def mergeability(out: Path) -> None:
    runs = sorted((p for p in out.glob("scores-*-M*.jsonl") if p.stat().st_size),
                  key=lambda p: (p.stem.split("-")[1], int(p.stem.split("M")[-1])))
    print("| method | M | experts | mean S | histogram S = 0, 0.2, …, 1 (observed) | binomial (expected) | χ² (dof) | p | dispersion |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in runs:
        recs = jsonl(p)
        method, m = p.stem.split("-")[1], p.stem.split("M")[-1]
        fit = binomial_fit([r["score"] for r in recs], recs[0]["trials"])
        print(f"| {method} | {m} | {fit['n']} | {fit['mean']:.3f} | {' '.join(str(o) for o in fit['observed'])} | "
              f"{' '.join(f'{e:.1f}' for e in fit['expected'])} | {f(fit['chi2'], 1)} ({fit['dof']}) | "
              f"{format_p(fit['p_value'])} | {f(fit['dispersion'], 2)} |")
    print()
    print("Spearman correlation of S with each field (p-value), per run:\n")
    print("| method | M | " + " | ".join(FIELDS) + " |")
    print("|---|---|" + "---|" * len(FIELDS))
    for p in runs:
        recs = jsonl(p)
        method, m = p.stem.split("-")[1], p.stem.split("M")[-1]
        cells = []
        for fld in FIELDS:
            c = correlate([r.get(fld) for r in recs], [r["score"] for r in recs])
            cells.append(f"{f(c['spearman'], 2)} ({format_p(c['spearman_p'])})")
        print(f"| {method} | {m} | " + " | ".join(cells) + " |")
    print()
    main = out / "scores-knots-M50.jsonl"
    if main.exists() and main.stat().st_size:
        recs = jsonl(main)
        rows = binned(recs, "score", FIELDS, recs[0]["trials"])
        print("Means ± standard errors per S bin (KnOTS, M=50; n experts per bin):\n")
        print("| field | " + " | ".join(f"S={r['bin']} (n={r['n']})" for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        for fld in FIELDS:
            print(f"| {fld} | " + " | ".join(f"{f(r.get(fld + '_mean'), 3)} ± {f(r.get(fld + '_se'), 2)}" for r in rows) + " |")
        print()
    diag, model = out / "diagnose-pool.jsonl", out / "s-predictor.json"
    if diag.exists() and model.exists() and main.exists():
        from mergetool.diagnose.forecast import leave_one_task_out

        feats = json.loads(model.read_text())["features"]
        score = {r["adapter"]: r["score"] for r in jsonl(main)}
        rows = [{**r, "tasks": [r["task"]], "score": score.get(r["adapter"])} for r in jsonl(diag) if r["kind"] == "adapter"]
        feats = [x for x in feats if any(isinstance(r.get(x), (int, float)) for r in rows)]
        res = leave_one_task_out(rows, feats, "score")
        print("Sparse predictor of S (KnOTS, M=50) from the adapters' features, leave-one-task-out:\n")
        print("| held-out task | trained on | predicted | Pearson | Spearman |\n|---|---|---|---|---|")
        for fo in res["folds"]:
            print(f"| {fo['task']} | {fo['n_train']} | {fo['n_val']} | {f(fo['pearson'], 2)} | {f(fo['spearman'], 2)} |")
        print(f"| all held-out | | {res['n']} | {f(res['pearson'], 2)} (p {format_p(res['pearson_p'])}) | "
              f"{f(res['spearman'], 2)} (p {format_p(res['spearman_p'])}) |\n")
        used = {k: v for k, v in res["mean_weights"].items() if v}
        print("mean weights of the features used: " + ", ".join(f"{k} {v:+.4f}" for k, v in used.items()) + "\n")
    loc = sorted(out.glob("locality-partners-*.jsonl"))
    if loc:
        print("Locality (section 5.1): experts with S = 1 under KnOTS M=50, merged (M=10, N=3) with partners drawn "
              "from one S bin:\n")
        print("| partners drawn from | fixed experts | their S with these partners (mean) |")
        print("|---|---|---|")
        for p in loc:
            recs = jsonl(p)
            b = p.stem.split("-")[-1]
            print(f"| S = {b} | {len(recs)} | {sum(r['score'] for r in recs) / len(recs):.3f} |")
        print()


METHODS = ["mean", "task-arithmetic", "ties", "dare-ties", "knots"]
PAIRS = ["magnitude_change_ratio", "sign_change_ratio", "conflict_magnitude_ratio", "cosine", "l2_distance",
         "hidden_sim", "grad_cosine"]


def collapse(out: Path) -> None:
    losses = jsonl(out / "losses.jsonl")
    alone = {r["task"]: r["alone"] for r in losses}
    print("Accuracy of each task expert alone on its dev examples:\n")
    print("| " + " | ".join(alone) + " |\n|" + "---|" * len(alone))
    print("| " + " | ".join(f"{v:.3f}" for v in alone.values()) + " |\n")
    eight = [r for r in losses if r["group"] == "eight"]
    if eight:
        tasks = list(dict.fromkeys(r["task"] for r in eight))
        print("Table 2: merging loss (%, (merged/alone − 1)·100) of each task in the merge of all eight:\n")
        print("| method | " + " | ".join(tasks) + " | mean | worst |\n|---|" + "---|" * (len(tasks) + 2))
        for m in METHODS:
            v = {r["task"]: r["loss"] for r in eight if r["method"] == m}
            vals = [x for x in v.values() if x is not None]
            print(f"| {m} | " + " | ".join(f(v.get(t), 1) if v.get(t) is None else f"{v[t]:.1f}" for t in tasks)
                  + f" | {sum(vals) / len(vals):.1f} | {min(vals):.1f} |")
        print()
    print("Mean and worst merging loss (%) by group size and method:\n")
    print("| group size | groups | " + " | ".join(METHODS) + " |\n|---|---|" + "---|" * len(METHODS))
    for size in sorted({len(r["adapters"]) for r in losses}, reverse=True):
        rs = [r for r in losses if len(r["adapters"]) == size and r["loss"] is not None]
        cells = []
        for m in METHODS:
            v = [r["loss"] for r in rs if r["method"] == m]
            cells.append(f"{sum(v) / len(v):.1f} / {min(v):.1f}" if v else "–")
        print(f"| {size} | {len({r['group'] for r in rs})} | " + " | ".join(cells) + " |")
    print()
    diag = out / "diagnose-tasks.jsonl"
    if not diag.exists():
        return
    recs = jsonl(diag)
    stats = [r for r in recs if r["kind"] == "stat"]
    print("Table 3: one-way ANOVA of the merging loss by method and by task (all groups), and the two-way "
          "additive ANOVA (each factor given the other):\n")
    print("| test | factor | F | p |\n|---|---|---|---|")
    for r in stats:
        if r["test"] == "anova1":
            print(f"| one-way | {r['factor']} | {f(r.get('F'), 3)} | {format_p(r.get('p_value'))} |")
        if r["test"] == "anova2":
            for fac in r.get("factors", []):
                x = r.get(fac) or {}
                print(f"| two-way | {fac} | {f(x.get('F'), 3)} | {format_p(x.get('p_value'))} |")
    print()
    corr = [r for r in stats if r["test"] == "correlation" and r.get("y") == "pair_loss"]
    if corr:
        ms = [m for m in PAIRS if any(r["x"] == m for r in corr)]
        print("Table 4: p-values of the Pearson correlation of each pair metric with the pair's merging loss "
              "(mean of its two members), per method (r in brackets; "
              f"{corr[0]['n']} merged pairs):\n")
        print("| method | " + " | ".join(ms) + " |\n|---|" + "---|" * len(ms))
        for m in METHODS:
            row = {r["x"]: r for r in corr if r["method"] == m}
            if row:
                print(f"| {m} | " + " | ".join(f"{format_p(row[x]['pearson_p'])} ({f(row[x]['pearson'], 2)})"
                                               if x in row else "–" for x in ms) + " |")
        print()
    mds = [r for r in stats if r["test"] == "correlation" and r.get("x") == "mds"]
    if mds:
        print("Table 5: Pearson correlation of each member's MDS with its best merging loss over the methods, per "
              "group of three or more:\n")
        print("| group | members | r | p | Spearman ρ | p(ρ) |\n|---|---|---|---|---|---|")
        for r in mds:
            print(f"| {r['group']} | {r['n']} | {f(r['pearson'], 2)} | {format_p(r['pearson_p'])} | {f(r['spearman'], 2)} | "
                  f"{format_p(r['spearman_p'])} |")
        print()
    ads = {r["adapter"]: r for r in recs if r["kind"] == "adapter"}
    if any("mds" in a for a in ads.values()):
        print("MDS of each task among the eight: " + ", ".join(f"{k} {a['mds']:.3f}" for k, a in ads.items()
                                                               if a.get("mds") is not None) + "\n")
    sel = [out / "select-before.json", out / "select-after.json"]
    if all(p.exists() for p in sel):
        b, a = (json.loads(p.read_text()) for p in sel)
        print("Table 6: task selection (six tasks; the most incompatible replaced by a candidate), TIES:\n")
        print("| group | tasks | worst TIES loss (%) |\n|---|---|---|")
        print(f"| before | {', '.join(b['group'])} | {b['worst_ties_loss']:.1f} |")
        print(f"| after | {', '.join(a['group'])} | {a['worst_ties_loss']:.1f} |")
        print("\nselection record: " + json.dumps({k: v for k, v in a["selection"].items() if k != "kind"}) + "\n")


def weighted(out: Path) -> None:
    w = json.loads((out / "weighted.json").read_text())
    acc = {tuple(k.split("|")): v for k, v in w["accuracy"].items()}
    tasks = w["tasks"]
    base = out / "base-summary.jsonl"
    if base.exists():
        acc.update({("base", r["task"]): r["accuracy"] for r in jsonl(base)})
    order = ["base", *tasks, "mean", *sorted(a for a, _ in acc if a.startswith("weighted"))]
    print("| model | " + " | ".join(tasks) + " | mean |\n|---|" + "---|" * (len(tasks) + 1))
    for a in dict.fromkeys(order):
        v = [acc.get((a, t)) for t in tasks]
        if all(x is None for x in v):
            continue
        print(f"| {a} | " + " | ".join(f(x, 3) for x in v) + f" | {sum(x for x in v if x is not None) / len(tasks):.3f} |")
    print()
    for tau, ws in w["weights"].items():
        print(f"weights τ={tau}: " + ", ".join(f"{Path(k).stem} {v:.3f}" for k, v in ws.items()))
    print()


def methods(out: Path) -> None:
    rows = jsonl(out / "methods-eight.jsonl")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    print("| method | " + " | ".join(tasks) + " | mean loss | worst |\n|---|" + "---|" * (len(tasks) + 2))
    for m in dict.fromkeys(r["method"] for r in rows):
        v = {r["task"]: r for r in rows if r["method"] == m}
        ls = [r["loss"] for r in v.values() if r["loss"] is not None]
        print(f"| {m} | " + " | ".join(f"{v[t]['merged']:.3f}" for t in tasks)
              + f" | {sum(ls) / len(ls):.1f} | {min(ls):.1f} |")
    print("| alone | " + " | ".join(f"{next(r['alone'] for r in rows if r['task'] == t):.3f}" for t in tasks) + " | | |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["mergeability", "collapse", "weighted", "methods"])
    ap.add_argument("--out", type=Path, default=Path("exp"))
    a = ap.parse_args()
    {"mergeability": mergeability, "collapse": collapse, "weighted": weighted, "methods": methods}[a.what](a.out)


if __name__ == "__main__":
    main()
