"""The tables of EXPERIMENTS.md, rebuilt from the committed records (experiments/records/).

EXPERIMENTS.md holds each table between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; ``fill`` puts
the table built from the records there, ``check`` names the tables where the document and the records
disagree (tests/test_experiments.py runs it on the committed document). A table whose records are missing is
not built, and a marked block without its table is reported by ``check``.

To add a table: a function of the records folder returning markdown, registered with ``@table(NAME)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from mergetool.stats import format_p

from .harness import RECORDS, read_jsonl

TABLES: dict[str, Callable[[Path], str]] = {}
NEEDS: dict[str, list[str]] = {}


def table(name: str, needs: list[str]):
    """Register a table built from the record files ``needs`` (names under records/)."""
    def wrap(fn):
        TABLES[name], NEEDS[name] = fn, needs
        return fn
    return wrap


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


@table("tasks", ["data.jsonl", "accuracy.jsonl"])
def tasks(records: Path) -> str:
    data = {r["task"]: r for r in read_jsonl(records / "data.jsonl")}
    acc = sorted(read_jsonl(records / "accuracy.jsonl"), key=lambda r: (not r["kept"], -r["gain"], r["task"]))
    lines = ["| task | source | train | dev | chance | majority | base | expert ± SE | gain | p vs base | "
             "p vs chance | kept |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in acc:
        d = data[r["task"]]
        lines.append(f"| {r['task']} | {d['source']} | {d['train']} | {r['n']} | {pct(r['chance'])} | "
                     f"{pct(r['majority'])} | {pct(r['base'])} | {pct(r['expert'])} ± {pct(r['se_expert'])} | "
                     f"{100 * r['gain']:+.1f} | {format_p(r['p_vs_base'])} | {format_p(r['p_vs_chance'])} | "
                     f"{'yes' if r['kept'] else 'no: ' + r['why']} |")
    kept = sum(r["kept"] for r in acc)
    lines.append(f"\n{kept} of {len(acc)} candidate tasks kept (accuracy in %; dev: examples evaluated).")
    return "\n".join(lines)


@table("pools", ["pools.jsonl"])
def pools(records: Path) -> str:
    lines = ["| passages | words per passage | questions | answered by the base | trained | kept | dropped "
             "| training time |", "|---|---|---|---|---|---|---|---|"]
    for r in read_jsonl(records / "pools.jsonl"):
        lines.append(f"| {r['condition']} | {r['passage_words']:.0f} | {r['questions']} | {r['known_by_base']} | "
                     f"{r['trained']} | {r['kept']} | {r['dropped']} | {r['seconds'] / 60:.0f} min |")
    return "\n".join(lines)


@table("timings", ["manifest.json"])
def timings(records: Path) -> str:
    m = json.loads((records / "manifest.json").read_text())
    lines = ["| stage | started (UTC) | wall time | revision | machine |", "|---|---|---|---|---|"]
    for name, e in m["stages"].items():
        mach = e["machine"]
        wall = f"{e['seconds'] / 60:.1f} min" + (f" ({e['seconds_all_runs'] / 60:.1f} min over {e['runs']} runs)"
                                                 if e.get("runs") else "")
        lines.append(f"| {name} | {e['started']} | {wall} | {e['revision'][:10]} | "
                     f"{mach['cores']}-core {mach['cpu']}, torch {mach['torch']}, load {mach['load_at_start']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- task-level mergeability (score-task)

# the fields of score's records, the base model's knowledge of the task first ("Will it Merge?" section 4.1)
KNOWLEDGE = ("base_accuracy", "p_correct", "p_max", "gap", "rank")
OTHER = ("delta_trained", "finetuned", "perplexity", "length", "norm_f", "sigma_max", "effective_rank", "off_target")


def num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def ci(c: list | None, digits: int = 2) -> str:
    return "–" if not c else f"[{c[0]:.{digits}f}, {c[1]:.{digits}f}]"


def summaries(records: Path) -> list[dict]:
    return sorted(read_jsonl(records / "score-task-summary.jsonl"), key=lambda s: s["seed"])


@table("score-task", ["score-task.jsonl", "score-task-pool.jsonl"])
def score_task(records: Path) -> str:
    recs = read_jsonl(records / "score-task.jsonl")
    seeds = sorted({r["seed"] for r in recs})
    by = {(r["seed"], r["task"]): r for r in recs}
    first = sorted((r for r in recs if r["seed"] == seeds[0]), key=lambda r: (-r["score"], r["task"]))
    head = (["task", "base", "alone"] + [f"S (seed {s})" for s in seeds] +
            ["control", "contribution", "merging loss %", "off-target"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in first:
        lines.append(f"| {r['task']} | {num(r['base_accuracy'], 2)} | {num(r['finetuned'], 2)} | " +
                     " | ".join(num(by[(s, r['task'])]["score"]) for s in seeds) +
                     f" | {num(r['control'])} | {num(r['contribution'], 3)} | {r['merging_loss']:+.1f} | "
                     f"{r['off_target']:+.3f} |")
    out = [r for r in read_jsonl(records / "score-task-pool.jsonl") if not r["learned"]]
    x = first[0]
    lines.append(f"\n{len(first)} task experts, M = {x['partners']}, N = {x['trials']}, {x['method']} "
                 f"({x['params'].get('inner')} inside, density {x['params'].get('density')}); accuracies as "
                 f"fractions of the dev examples scored; control, contribution, merging loss and off-target of "
                 f"seed {seeds[0]}." + "".join(
                     f" Not scored: {r['task']} (expert {pct(r['expert'])}% against a majority label of "
                     f"{pct(r['majority'])}%, p = {format_p(r['p_vs_majority'])})." for r in out))
    return "\n".join(lines)


@table("score-task-means", ["score-task-summary.jsonl"])
def score_task_means(records: Path) -> str:
    lines = ["| seed | experts | merges | S [95% CI] | control [95% CI] | contribution [95% CI] | "
             "adapters differ beyond their merges: p |", "|---|---|---|---|---|---|---|"]
    for s in summaries(records):
        m, e = s["means"], s["existence"]
        cells = [f"{num(m[k]['mean'])} {ci(m[k]['ci'], 3)}" for k in ("score", "control", "contribution")]
        lines.append(f"| {s['seed']} | {s['n']} | {s['merges']} | " + " | ".join(cells) +
                     f" | {format_p(e['p'], e['floor'])} |")
    return "\n".join(lines)


@table("score-task-bins", ["score-task-summary.jsonl"])
def score_task_bins(records: Path) -> str:
    cols = [("control", "control"), ("contribution", "contribution"), ("base_accuracy", "base accuracy"),
            ("norm_f", "‖ΔW‖_F"), ("sigma_max", "σ_max"), ("perplexity", "perplexity"), ("length", "length")]
    lines = ["| seed | S | n | " + " | ".join(c for _, c in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for s in summaries(records):
        for b in s["bins"]:
            cells = [f"{b[f + '_mean']:.3g} ± {b[f + '_se']:.2g}" if b[f + "_se"] is not None
                     else f"{b[f + '_mean']:.3g}" for f, _ in cols]
            lines.append(f"| {s['seed']} | {b['bin']} | {b['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@table("score-task-spearman", ["score-task-summary.jsonl"])
def score_task_spearman(records: Path) -> str:
    lines = ["| field | seed | ρ(S) [95% CI] | p | ρ(contribution) [95% CI] | p | n |", "|---|---|---|---|---|---|---|"]
    summ = summaries(records)
    for f in (*KNOWLEDGE, *OTHER):
        lines += [f"| {f} | {s['seed']} | {cells} |" for s in summ if (cells := spearman_cells(s, f))]
    return "\n".join(lines)


def spearman_cells(summary: dict, field: str) -> str | None:
    """ρ [CI] | p for S and for the contribution, and n, of one field in a score summary (None: not there)."""
    row = {r["measure"]: r for r in summary["spearman"] if r["field"] == field}
    if not row:
        return None
    cells = [f"{num(row[m]['rho'], 2)} {ci(row[m]['ci'])} | {format_p(row[m]['p'], row[m]['floor'])}"
             if m in row else "– | –" for m in ("score", "contribution")]
    return " | ".join(cells) + f" | {row['score']['n']}"


@table("score-task-stability", ["score-task-stability.jsonl"])
def score_task_stability(records: Path) -> str:
    lines = ["| seeds | experts | M | N | merges | ρ(S, S') [95% CI] | p |", "|---|---|---|---|---|---|---|"]
    for r in read_jsonl(records / "score-task-stability.jsonl"):
        lines.append(f"| {' and '.join(map(str, r['seeds']))} | {r['n']} | {r['partners']} | {r['trials']} | "
                     f"{r['merges']} | {num(r['rho'], 2)} {ci(r['ci'])} | {format_p(r['p'], r['floor'])} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- example-level mergeability (score-pool)

POOL_FIELDS = ("gap", "rank", "p_correct", "p_max", "delta_trained", "perplexity", "length", "norm_f", "sigma_max",
               "off_target")


def pool_summaries(records: Path) -> list[dict]:
    return read_jsonl(records / "score-pool-summary.jsonl")


def histogram(scores: list[float], trials: int) -> tuple[list[int], list[float], float]:
    """Observed counts of S = k/N (k = 0..N), the counts Binomial(N, mean S) expects, and the dispersion
    var(S) / (p(1 − p)/N) (1 under the binomial; descriptive: the test is score's permutation within merges)."""
    from scipy.stats import binom

    n = len(scores)
    p = sum(scores) / n
    obs = [sum(1 for s in scores if round(s * trials) == k) for k in range(trials + 1)]
    exp = [n * float(binom.pmf(k, trials, p)) for k in range(trials + 1)]
    var = sum((s - p) ** 2 for s in scores) / (n - 1) if n > 1 else 0.0
    disp = var / (p * (1 - p) / trials) if 0 < p < 1 else float("nan")
    return obs, exp, disp


@table("pool-scores", ["score-pool.jsonl", "score-pool-summary.jsonl"])
def pool_scores(records: Path) -> str:
    recs = read_jsonl(records / "score-pool.jsonl")
    lines = ["| passages | method | M | N | seed | experts | merges | S [95% CI] | control [95% CI] | "
             "contribution [95% CI] | S = 0, 1/N, …, 1: observed | Binomial(N, mean S) expects | dispersion | "
             "adapters differ beyond their merges: p |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in pool_summaries(records):
        m, e = s["means"], s["existence"]
        scores = [r["score"] for r in recs if r["condition"] == s["condition"] and r["run"] == s["run"]]
        obs, exp, disp = histogram(scores, s["trials"])
        cells = [f"{num(m[k]['mean'])} {ci(m[k]['ci'], 3)}" for k in ("score", "control", "contribution")]
        lines.append(f"| {s['condition']} | {s['method']} | {s['partners']} | {s['trials']} | {s['seed']} | {s['n']} | "
                     f"{s['merges']} | " + " | ".join(cells) + f" | {' '.join(map(str, obs))} | "
                     f"{' '.join(f'{x:.1f}' for x in exp)} | {disp:.2f} | {format_p(e['p'], e['floor'])} |")
    return "\n".join(lines)


def main_summary(records: Path, condition: str) -> dict:
    return next(s for s in pool_summaries(records) if s["condition"] == condition and s["run"] == "knots-M50-N5")


@table("pool-spearman", ["score-pool-summary.jsonl"])
def pool_spearman(records: Path) -> str:
    conds = list(dict.fromkeys(s["condition"] for s in pool_summaries(records)))
    lines = ["| field | passages | ρ(S) [95% CI] | p | ρ(contribution) [95% CI] | p | n |", "|---|---|---|---|---|---|---|"]
    for f in POOL_FIELDS:
        lines += [f"| {f} | {c} | {cells} |" for c in conds if (cells := spearman_cells(main_summary(records, c), f))]
    return "\n".join(lines)


@table("pool-bins", ["score-pool-summary.jsonl"])
def pool_bins(records: Path) -> str:
    cols = [("control", "control"), ("contribution", "contribution"), ("gap", "Δ_base"), ("p_correct", "p_correct"),
            ("rank", "rank"), ("delta_trained", "Δ_trained"), ("perplexity", "perplexity"), ("length", "length"),
            ("norm_f", "‖ΔW‖_F"), ("sigma_max", "σ_max")]
    conds = list(dict.fromkeys(s["condition"] for s in pool_summaries(records)))
    lines = ["| passages | S | n | " + " | ".join(c for _, c in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for c in conds:
        for b in main_summary(records, c)["bins"]:
            cells = [f"{b[f + '_mean']:.3g} ± {b[f + '_se']:.2g}" if b.get(f + "_se") is not None
                     else f"{b[f + '_mean']:.3g}" for f, _ in cols]
            lines.append(f"| {c} | {b['bin']} | {b['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@table("pool-methods", ["score-pool.jsonl", "score-pool-summary.jsonl"])
def pool_methods(records: Path) -> str:
    """The three merge methods on the same partitions (seed 0, M = 50, N = 5): S by KnOTS's S bin (the paper's
    Figure 6 compares the methods per bin), and the Spearman of S with the base model's gap under each."""
    recs = read_jsonl(records / "score-pool.jsonl")
    runs = [s for s in pool_summaries(records) if s["seed"] == 0 and s["partners"] == 50 and s["trials"] == 5]
    methods = list(dict.fromkeys(s["method"] for s in runs))
    run = {(s["condition"], s["method"]): s["run"] for s in runs}
    lines = ["| passages | experts by KnOTS's S | n | " + " | ".join(f"S under {m}" for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for c in dict.fromkeys(s["condition"] for s in runs):
        by = {(r["run"], r["adapter"]): r["score"] for r in recs if r["condition"] == c}
        main = [r for r in recs if r["condition"] == c and r["run"] == run[(c, "knots")]]
        for name, keep in (("S < 0.2", lambda x: x < 0.2), ("0.2 ≤ S < 0.8", lambda x: 0.2 <= x < 0.8),
                           ("S ≥ 0.8", lambda x: x >= 0.8), ("all", lambda x: True)):
            ads = [r["adapter"] for r in main if keep(r["score"])]
            if not ads:
                continue
            cells = [num(sum(by[(run[(c, m)], a)] for a in ads) / len(ads)) for m in methods]
            lines.append(f"| {c} | {name} | {len(ads)} | " + " | ".join(cells) + " |")
    lines += ["", "| passages | method | ρ(gap, S) [95% CI] | p | ρ(p_correct, S) [95% CI] | p |", "|---|---|---|---|---|---|"]
    for s in runs:
        row = {r["field"]: r for r in s["spearman"] if r["measure"] == "score"}
        cells = [f"{num(row[f]['rho'], 2)} {ci(row[f]['ci'])} | {format_p(row[f]['p'], row[f]['floor'])}"
                 if f in row else "– | –" for f in ("gap", "p_correct")]
        lines.append(f"| {s['condition']} | {s['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@table("pool-stability", ["score-pool-stability.jsonl"])
def pool_stability(records: Path) -> str:
    lines = ["| passages | runs differ in | run a | run b | experts | merges | ρ(S_a, S_b) [95% CI] | p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in read_jsonl(records / "score-pool-stability.jsonl"):
        lines.append(f"| {r['condition']} | {r['differs']} | {r['a']} | {r['b']} | {r['n']} | {r['merges']} | "
                     f"{num(r['rho'], 2)} {ci(r['ci'])} | {format_p(r['p'], r['floor'])} |")
    return "\n".join(lines)


@table("pool-locality", ["score-pool-locality.jsonl"])
def pool_locality(records: Path) -> str:
    lines = ["| passages | partners drawn from the bin S = | its experts | fixed experts (S = 1) | M | N | merges | "
             "S [95% CI] | control [95% CI] | contribution [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in read_jsonl(records / "score-pool-locality.jsonl"):
        cells = [f"{num(r[k]['mean'])} {ci(r[k]['ci'], 3)}" if k in r else "–" for k in ("score", "control", "contribution")]
        lines.append(f"| {r['condition']} | {r['partners_bin']} | {r['bin_size']} | {r['fixed']} | {r['partners']} | "
                     f"{r['trials']} | {r['merges']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@table("pool-forecast", ["score-pool-forecast.jsonl"])
def pool_forecast(records: Path) -> str:
    lines = ["| passages | model | features | held-out Spearman [95% CI] | held-out Pearson [95% CI] | "
             "predictor − model, Spearman [95% CI] |", "|---|---|---|---|---|---|"]
    for f in read_jsonl(records / "score-pool-forecast.jsonl"):
        v = f.get("validation") or {}
        if "skipped" in v or not v:
            lines.append(f"| {f['condition']} | predictor | – | not validated: {v.get('skipped', 'no record')} | – | – |")
            continue
        used = sum(1 for x in v["nonzero_frequency"].values() if x > 0)
        lines.append(f"| {f['condition']} | **predictor** (L1) | {used} of {len(v['nonzero_frequency'])} used | "
                     f"{num(v['spearman'], 2)} {ci(v['spearman_ci'])} | {num(v['pearson'], 2)} {ci(v['pearson_ci'])} | – |")
        for b in sorted(f.get("baselines") or [], key=lambda b: -(b["spearman"] if b["spearman"] is not None else -9)):
            lines.append(f"| {f['condition']} | {b['name']} | {', '.join(b['features'])} | "
                         f"{num(b['spearman'], 2)} {ci(b['spearman_ci'])} | {num(b['pearson'], 2)} {ci(b['pearson_ci'])} | "
                         f"{ci(b['predictor_minus_spearman_ci'])} |")
    tasks = sorted({len(f["validation"]["folds"]) for f in read_jsonl(records / "score-pool-forecast.jsonl")
                    if f.get("validation") and "folds" in f["validation"]})
    lines.append(f"\nLeave one task out ({' or '.join(map(str, tasks))} tasks, each held out in turn); the models "
                 "are compared on their slopes (no fold's constant). Intervals resample tasks (the unit the folds "
                 "hold out)" + (": with two tasks a resample is both tasks, or one of them twice, so an interval "
                                "shows how far the figure moves between the tasks, not a 95 % confidence interval "
                                "over tasks." if tasks and tasks[0] == 2 else "."))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- merges with data (datamerge)

@table("datamerge", ["datamerge-summary.jsonl"])
def datamerge(records: Path) -> str:
    summ = read_jsonl(records / "datamerge-summary.jsonl")
    best = summ[0]["best_data_free"]
    lines = ["| method | kind | merge time | search: mean | search: worst | held out: mean | held out: worst (task) | "
             f"held out: mean − {best}'s [95% CI] | p |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(summ, key=lambda r: (r["kind"], -r["mean_held"])):
        v = r.get("vs_best")
        name = f"**{r['method']}**" if r["method"] == best else r["method"]
        opts = f" ({' '.join(r['options'])})" if r["options"] else ""
        cmp = f"{100 * v['diff']:+.1f} [{100 * v['ci'][0]:+.1f}, {100 * v['ci'][1]:+.1f}] | " \
              f"{format_p(v['p'], v['floor'])}" if v else "– | –"
        secs = f"{r['seconds'] / 60:.1f} min" if r.get("seconds") is not None else "–"
        lines.append(f"| {name}{opts} | {r['kind']} | {secs} | {pct(r['mean_search'])} | {pct(r['worst_search'])} | "
                     f"{pct(r['mean_held'])} | {pct(r['worst_held'])} ({r['worst_task_held']}) | {cmp} |")
    lines.append(f"\nNormalised accuracy in % (a task's accuracy merged over its expert's alone, on the same examples; "
                 f"mean and worst over the tasks). **{best}**: the data-free method with the best mean on the search "
                 f"examples, the reference of the last two columns (points of normalised accuracy; stratified paired "
                 f"bootstrap interval and paired sign-flip test, the held-out example the unit).")
    return "\n".join(lines)


@table("datamerge-tasks", ["datamerge.jsonl", "datamerge-summary.jsonl"])
def datamerge_tasks(records: Path) -> str:
    rows = read_jsonl(records / "datamerge.jsonl")
    best = read_jsonl(records / "datamerge-summary.jsonl")[0]["best_data_free"]
    methods = [best] + sorted({r["method"] for r in rows if r["kind"] == "data-aware"})
    by = {(r["method"], r["task"]): r for r in rows}
    tasks = sorted({r["task"] for r in rows})
    lines = ["| task | n | base | expert alone | " + " | ".join(methods) + " |", "|---|---|---|---|" + "---|" * len(methods)]
    for t in tasks:
        x = by[(best, t)]
        lines.append(f"| {t} | {x['n_held']} | {pct(x['base_held'])} | {pct(x['alone_held'])} | " +
                     " | ".join(pct(by[(m, t)]["merged_held"]) for m in methods) + " |")
    lines.append("\nAccuracy in % on each task's held-out dev examples (none of them seen by any method).")
    return "\n".join(lines)


def tables(records: Path = RECORDS) -> dict[str, str]:
    """Every table whose records exist."""
    return {name: fn(records) for name, fn in TABLES.items() if all((records / n).exists() for n in NEEDS[name])}


BLOCK = re.compile(r"<!-- table:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.S)


def fill(doc: str, built: dict[str, str]) -> str:
    """The document with each marked block's body replaced by its table (blocks of unknown tables kept)."""
    return BLOCK.sub(lambda m: (f"<!-- table:{m['name']} -->\n{built[m['name']]}\n<!-- /table:{m['name']} -->"
                                if m["name"] in built else m[0]), doc)


def check(doc: str, built: dict[str, str]) -> list[str]:
    """Names of the marked blocks whose body is not the table built from the records (or has none)."""
    return [m["name"] for m in BLOCK.finditer(doc) if built.get(m["name"]) is None
            or m["body"] != built[m["name"]] + "\n"]


from . import report_collapse  # noqa: E402,F401  (registers the collapse section's tables)
