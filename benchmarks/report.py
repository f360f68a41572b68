"""The tables of EXPERIMENTS.md, printed as markdown from what benchmarks/experiments.py wrote.

    python benchmarks/report.py collapse --out exp/
    python benchmarks/report.py weighted --out exp/

The statistics are mergetool's own (mergetool.stats, and diagnose's records for the collapse tables), so the
report says what the commands say. The example-level tables of "Will it Merge?" are built by
``python -m experiments report`` from committed records (stage ``score-pool``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergetool.stats import format_p  # noqa: E402



def jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def f(x, d=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{d}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{d}f}"
    return str(x)


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
    ap.add_argument("what", choices=["collapse", "weighted", "methods"])
    ap.add_argument("--out", type=Path, default=Path("exp"))
    a = ap.parse_args()
    {"collapse": collapse, "weighted": weighted, "methods": methods}[a.what](a.out)


if __name__ == "__main__":
    main()
