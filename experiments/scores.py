"""The task-level mergeability experiment of "Will it Merge?" (section 3.2, Table 1, Figure 4, A.13-A.14):
``score --level task`` on the learned task experts, with the control, under two seeds of the trial plan.

    score-task   score --level task on the kept experts that learned their task, seeds 0 and 1, and the summary
                 (intervals and design-valid p-values) of each run; the Spearman of S across the two seeds

Which experts: the tasks kept by the bar (``accuracy``) whose expert is also above the majority-label rate
(the exact one-sided binomial test, p < ALPHA): an expert that answers one label on every example (CoLA's)
beats chance and the base without learning the task, and its S would measure whether a merge keeps
that label. The plan: M = TASK_M partners, N = TASK_N trials, the first TASK_DEV dev examples of each task
(the dev files are in random order), the off-target effect on TASK_OFF other tasks; the reasons are in
EXPERIMENTS.md (the cost on the shared 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

from .harness import Run, read_jsonl, stage, write_jsonl
from .stages import ALPHA, base_dir, data_dir, one_sided

# the plan: 13 experts in groups of M + 1 = 6 (two full groups and one topped up per partition), so partners
# vary between trials and every trial has a control merge of other experts; the paper's N; 20 dev examples
# per task and one off-target task, to fit the shared CPU (a pilot: 4 tasks, N = 1, M = 1, the full dev sets,
# took 10 minutes of wall time and 5 of CPU)
TASK_M, TASK_N, TASK_DEV, TASK_OFF, TASK_SEEDS = 5, 5, 20, 1, (0, 1)
REPLICATES = 2000


def learned(acc: list[dict]) -> tuple[list[str], list[dict]]:
    """The kept tasks whose expert beats the majority-label rate (exact one-sided binomial, below ALPHA), and
    a row per kept task saying so."""
    rows = []
    for r in sorted((r for r in acc if r["kept"]), key=lambda r: r["task"]):
        k = round(r["expert"] * r["n"])
        p = float(one_sided(k, r["n"], r["majority"]))
        rows.append({"task": r["task"], "n": r["n"], "expert": r["expert"], "majority": r["majority"],
                     "p_vs_majority": p, "learned": bool(p < ALPHA)})
    return [r["task"] for r in rows if r["learned"]], rows


def cross_seed(runs: list[list[dict]], replicates: int = REPLICATES, seed: int = 0) -> dict:
    """The Spearman of S between two runs of the same pool (records matched by adapter), its permutation p
    (``stats.spearman_test``) and its interval (``stats.crossed_bootstrap``: adapters and the merges of both
    runs resampled)."""
    from mergetool.stats import crossed_bootstrap, spearman_test

    a, b = ({r["adapter"]: r for r in rs} for rs in runs)
    names = sorted(set(a) & set(b))
    trials: dict[str, tuple[list, list, list]] = {}
    for k, (run, recs) in enumerate((("a", a), ("b", b))):
        ad, mg, val = [], [], []
        for i, n in enumerate(names):
            ad += [i] * len(recs[n]["per_trial"])
            mg += [f"{run}{m}" for m in recs[n]["trial_merges"]]  # the two runs' merges are different merges
            val += recs[n]["per_trial"]
        trials[run] = (ad, mg, val)
    t = spearman_test([a[n]["score"] for n in names], [b[n]["score"] for n in names], seed=seed)
    boot = crossed_bootstrap(len(names), trials, {}, replicates=replicates, seed=seed, between=[("a", "b")])
    ci = boot["spearman"].get(("a", "b"))
    return {"n": t["n"], "rho": t["rho"], "p": t["p"], "floor": t["floor"], "exact": t["method"] == "exact",
            "ci": list(ci) if ci else None, "merges": boot["merges"]}


@stage("score-task", needs=("accuracy",))
def score_task(run: Run) -> list[Path]:
    """score --level task on the kept experts that learned their task (M = 5, N = 5, the control), seeds 0 and 1,
    with each run's summary and the Spearman of S across the seeds."""
    acc = read_jsonl(run.records / "accuracy.jsonl")
    tasks, pool_rows = learned(acc)
    out = run.cache / "score-task" / f"M{TASK_M}-N{TASK_N}-dev{TASK_DEV}"  # a changed plan is a new run
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in tasks:  # the first TASK_DEV dev examples, and the train split (the training text's perplexity)
        rows += read_jsonl(data_dir(run) / "dev" / f"{t}.jsonl")[:TASK_DEV]
    rows += [r for r in read_jsonl(data_dir(run) / "tasks-train.jsonl") if r["task"] in tasks]
    data = write_jsonl(out / "data.jsonl", rows)
    experts = [run.cache / "experts" / f"{t}.safetensors" for t in tasks]
    records, summaries = [], []
    for s in run.bar(list(TASK_SEEDS), "score-task seeds"):
        f = out / f"seed-{s}.jsonl"
        run.mt("score", "-q", "--base", base_dir(run), "--data", data, "--level", "task", "-M", TASK_M, "-N", TASK_N,
               "--off-target", TASK_OFF, "--seed", s, *experts, "-o", f, "--resume")
        summ = out / f"seed-{s}.summary.json"
        run.mt("score", "-q", "--summary", f, "-o", summ)
        records += read_jsonl(f)
        summaries.append({"seed": s, **json.loads(summ.read_text())})
    run.write_records("score-task", records)
    run.write_records("score-task-summary", summaries)
    by_seed = [[r for r in records if r["seed"] == s] for s in TASK_SEEDS]
    run.write_records("score-task-pool", pool_rows)
    run.write_records("score-task-stability", [{"seeds": list(TASK_SEEDS), "measure": "score", "trials": TASK_N,
                                                "partners": TASK_M, **cross_seed(by_seed)}])
    return [data, *experts]
