"""Merges that read data, against the data-free methods, on the task experts (issue 20's experiment).

    datamerge   the learned task experts merged all at once by each data-free method and by each data-aware
                one (regmean, regmean++, fisher, adamerging, lorahub, auto with both objectives), the data-aware
                ones given the first DM_SEARCH dev examples of each task; every merge judged on the next DM_HELD
                (held out: no method saw them) and on the search examples; the best data-free method chosen on
                the search examples, as a user with the same data would choose it

The unit of independence is the held-out dev example, within its task (the tasks are the fixed pool, not a
sample). Each method is compared with the chosen data-free one on the same examples: the difference of the
mean normalised accuracy (acc merged / acc of the task's expert alone, averaged over tasks, as the collapse
paper measures) with a stratified paired bootstrap interval (examples resampled within each task) and the
paired sign-flip randomisation test (under the null the two merges' outcomes on each example are
exchangeable), both in ``paired_difference``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .harness import Run, read_jsonl, stage, write_jsonl
from .scores import learned
from .stages import base_dir, correctness, data_dir

# the split of each task's dev file (in random order): the examples the data-aware methods see, then the
# held-out ones every merge is judged on
DM_SEARCH, DM_HELD = 16, 40
# the data-free methods (the merges stage's settings)
DATA_FREE = {"mean": [], "task-arithmetic": ["--lambda", "0.4"], "ties": ["--density", "0.2"],
             "dare-ties": ["--density", "0.1", "--seed", "0"], "knots": [], "tsv": [], "star": []}
# the data-aware ones; adamerging and the searches are cut to fit the shared 2-core CPU (EXPERIMENTS.md)
DATA_AWARE = {"regmean": [], "regmean++": [], "fisher": [],
              "adamerging": ["--steps", "40", "--lr", "5e-3"],
              "lorahub": ["--budget", "32"],
              "auto-mean": ["--objective", "mean", "--holdout", "0", "--budget", "32"],
              "auto-worst": ["--objective", "worst", "--holdout", "0", "--budget", "32"]}
REPLICATES, PERMUTATIONS = 4000, 9999


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], alone: dict[str, float],
                      replicates: int = REPLICATES, permutations: int = PERMUTATIONS, seed: int = 0) -> dict:
    """The difference of mean normalised accuracy, merge a minus merge b, judged on the same examples
    ({task: 0/1 per example}, the expert's accuracy alone per task fixed): the estimate, a 95 % interval by
    the stratified paired bootstrap (each task's examples resampled with replacement, both merges' outcomes
    together) and the two-sided p of the paired sign-flip test (each example's pair of outcomes swapped at
    random: exact in distribution under the null that the two merges are exchangeable on every example),
    (1 + #{|T*| >= |T|}) / (1 + permutations)."""
    rng = np.random.default_rng(seed)
    tasks = sorted(a)
    d = {t: (a[t].astype(float) - b[t].astype(float)) / (len(a[t]) * alone[t]) for t in tasks}
    est = float(sum(d[t].sum() for t in tasks) / len(tasks))
    boot = np.zeros(replicates)
    for t in tasks:
        n = len(d[t])
        boot += d[t][rng.integers(0, n, size=(replicates, n))].sum(1)
    boot /= len(tasks)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    flips = np.zeros(permutations)
    for t in tasks:
        s = rng.choice([-1.0, 1.0], size=(permutations, len(d[t])))
        flips += (s * d[t]).sum(1)
    flips /= len(tasks)
    p = (1 + int((np.abs(flips) >= abs(est) - 1e-12).sum())) / (1 + permutations)
    return {"diff": est, "ci": [float(lo), float(hi)], "p": p, "floor": 1 / (1 + permutations)}


@stage("datamerge", needs=("accuracy",))
def datamerge(run: Run) -> list[Path]:
    """The learned task experts merged all at once by every data-free method and by the data-aware ones
    (regmean, regmean++, fisher, adamerging, lorahub, auto mean and worst) given DM_SEARCH dev examples per
    task; each merge judged on the next DM_HELD held-out examples; the best data-free method chosen on the
    search examples; each method against it, with a paired interval and test."""
    acc = read_jsonl(run.records / "accuracy.jsonl")
    tasks, _ = learned(acc)
    bits = {(r["task"], r["model"]): r["correct"] for r in read_jsonl(run.records / "accuracy-examples.jsonl")}
    out = run.cache / "datamerge" / f"search{DM_SEARCH}-held{DM_HELD}"
    out.mkdir(parents=True, exist_ok=True)
    search, ids = [], {}
    for t in tasks:
        rows = read_jsonl(data_dir(run) / "dev" / f"{t}.jsonl")
        if len(rows) < DM_SEARCH + DM_HELD:
            raise SystemExit(f"experiments: {t} has {len(rows)} dev examples, fewer than {DM_SEARCH + DM_HELD}")
        search += rows[:DM_SEARCH]
        ids[t] = [r["id"] for r in rows[:DM_SEARCH + DM_HELD]]
        write_jsonl(out / f"eval-{t}.data.jsonl", rows[:DM_SEARCH + DM_HELD])
    data = write_jsonl(out / "search.jsonl", search)
    experts = [run.cache / "experts" / f"{t}.safetensors" for t in tasks]
    seconds_file = out / "seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.exists() else {}
    methods = {**{m: ("data-free", o) for m, o in DATA_FREE.items()},
               **{m: ("data-aware", o) for m, o in DATA_AWARE.items()}}
    for m, (kind, opts) in run.bar(list(methods.items()), "datamerge merges"):
        f = out / f"{m}.safetensors"
        if f.exists():
            continue
        method = "auto" if m.startswith("auto") else m
        extra = [] if kind == "data-free" else ["--data", data, "--base", base_dir(run)]
        if method == "auto":
            extra += ["--trace", out / f"{m}.trace.jsonl"]
        t0 = time.perf_counter()
        run.mt("merge", "-q", "-m", method, *opts, *extra, *experts, "-o", f, "--name", m)
        seconds[m] = round(time.perf_counter() - t0, 1)
        seconds_file.write_text(json.dumps(seconds, indent=1, sort_keys=True))
    merged: dict[str, dict[str, str]] = {m: {} for m in methods}
    for t in run.bar(tasks, "datamerge eval"):
        res = out / f"eval-{t}.jsonl"
        adapters = [x for m in methods for x in ("--adapter", out / f"{m}.safetensors")]
        run.mt("eval", "-q", "--base", base_dir(run), *adapters, out / f"eval-{t}.data.jsonl", "-o", res, "--resume")
        for m in methods:
            merged[m][t] = correctness(res, ids[t], m)
    rows, ex = [], []
    part = {"search": slice(0, DM_SEARCH), "held": slice(DM_SEARCH, DM_SEARCH + DM_HELD)}
    arr = {(m, t, s): np.array([int(c) for c in merged[m][t][sl]]) for m in methods for t in tasks
           for s, sl in part.items()}
    alone = {s: {t: max(bits[(t, "expert")][sl].count("1"), 1) / (sl.stop - sl.start) for t in tasks}
             for s, sl in part.items()}  # floored at one example's worth, as auto's objective
    for m, (kind, _) in methods.items():
        for t in tasks:
            r = {"method": m, "kind": kind, "task": t}
            for s, sl in part.items():
                n = sl.stop - sl.start
                r |= {f"n_{s}": n, f"merged_{s}": float(arr[(m, t, s)].mean()), f"alone_{s}": alone[s][t],
                      f"base_{s}": bits[(t, "base")][sl].count("1") / n}
            rows.append(r)
            ex.append({"method": m, "task": t, "correct": merged[m][t]})
    summ = []
    for m, (kind, opts) in methods.items():
        row = {"method": m, "kind": kind, "options": [str(o) for o in opts], "seconds": seconds.get(m)}
        for s in part:
            norm = [arr[(m, t, s)].mean() / alone[s][t] for t in tasks]
            row |= {f"mean_{s}": float(np.mean(norm)), f"worst_{s}": float(np.min(norm)),
                    f"worst_task_{s}": tasks[int(np.argmin(norm))]}
        summ.append(row)
    best = max((r for r in summ if r["kind"] == "data-free"), key=lambda r: r["mean_search"])["method"]
    for row in summ:
        row["best_data_free"] = best
        if row["method"] != best:
            row["vs_best"] = paired_difference({t: arr[(row["method"], t, "held")] for t in tasks},
                                               {t: arr[(best, t, "held")] for t in tasks}, alone["held"])
    run.write_records("datamerge", rows)
    run.write_records("datamerge-examples", ex)
    run.write_records("datamerge-summary", summ)
    return [data, *experts]
