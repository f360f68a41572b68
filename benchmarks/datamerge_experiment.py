"""The data-aware merges and ``auto`` against the best data-free merge on the testbed's task experts (issue 20),
through the mergetool commands; EXPERIMENTS.md has the table this prints.

    python benchmarks/datamerge_experiment.py --experts CACHE/experts --data CACHE/data/tasks-dev.jsonl \\
        --base CACHE/smollm2-135m --out exp-data/ [--tasks t1,t2,...] [--dev 30] [--test 40]

Each task's dev examples (the testbed's dev split; the experts never trained on them) are split by a seeded
draw into DEV (what the data-aware methods and ``auto``'s search read) and TEST (what every merge is judged on,
and nothing reads before). The data-free methods run at their defaults; the one with the best mean normalised
accuracy on DEV is "the best data-free method" (chosen on DEV, so its TEST figure is not selected on TEST).
Every merge, each expert alone and the base model are then evaluated on TEST in one batched ``eval`` call.
Normalised accuracy is acc(merge)/acc(expert alone) per task on the same TEST examples; its standard error is
the delta method's for a ratio of paired means (the unit: a TEST example); the mean over tasks has the root of
the summed variances over the number of tasks (tasks are independent samples), the worst task a bootstrap over
each task's examples (2000 draws, seed 0). Every command is printed as ``$ mergetool ...`` and is resumable:
files that exist are not made again.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
from pathlib import Path

DATA_FREE = {"mean": [], "task-arithmetic": [], "ties": [], "dare-ties": [], "knots": [], "core-space": [],
             "tsv": [], "star": [], "consensus-ties": []}
TASKS = ["sst2", "cola", "city-country", "country-alpha3", "country-currency-code", "country-demonym",
         "country-name-fr", "country-calling-code"]


def mt(*args: str, stdout: Path | None = None) -> None:
    print("$ mergetool " + " ".join(args) + (f" > {stdout}" if stdout else ""), flush=True)
    with open(stdout, "wb") if stdout else open("/dev/null", "wb") as out:
        r = subprocess.run([sys.executable, "-m", "mergetool", *args], stdout=out if stdout else None,
                           stderr=subprocess.PIPE)
    sys.stdout.write(r.stderr.decode())
    if r.returncode:
        raise SystemExit(f"failed with exit {r.returncode}")


def split(data: Path, tasks: list[str], n_dev: int, n_test: int, out: Path) -> tuple[Path, Path]:
    dev, test = out / "dev.jsonl", out / "test.jsonl"
    if dev.exists() and test.exists():
        return dev, test
    rows = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    d, t = [], []
    for task in tasks:
        mine = sorted((r for r in rows if r["task"] == task), key=lambda r: r["id"])
        random.Random(f"0:{task}").shuffle(mine)
        d += mine[:n_dev]
        t += mine[n_dev:n_dev + n_test]
    dev.write_text("".join(json.dumps(r) + "\n" for r in d))
    test.write_text("".join(json.dumps(r) + "\n" for r in t))
    return dev, test


def merges(base: Path, experts: list[str], dev: Path, out: Path, args) -> dict[str, Path]:
    m = out / "merges"
    m.mkdir(parents=True, exist_ok=True)
    made = {}
    data_aware = {"regmean": [], "regmean++": [], "fisher": [],
                  "adamerging": ["--steps", str(args.ada_steps)], "lorahub": ["--budget", "40"],
                  "auto-mean": ["--objective", "mean", "--budget", str(args.budget), "--holdout", "0",
                                "--trace", str(m / "auto-mean.trace.jsonl")],
                  "auto-worst": ["--objective", "worst", "--budget", str(args.budget), "--holdout", "0",
                                 "--trace", str(m / "auto-worst.trace.jsonl")],
                  "auto-worst-drop": ["--objective", "worst", "--drop", "--budget", str(args.budget), "--holdout", "0",
                                      "--trace", str(m / "auto-worst-drop.trace.jsonl")]}
    for name, opts in DATA_FREE.items():
        f = m / f"{name}.safetensors"
        if not f.exists():
            mt("merge", "-m", name, *opts, *experts, "-o", str(f), "--name", name)
        made[name] = f
    for name, opts in data_aware.items():
        f = m / f"{name}.safetensors"
        if not f.exists():
            method = "auto" if name.startswith("auto") else name
            mt("merge", "-m", method, *opts, "--data", str(dev), "--base", str(base), *experts, "-o", str(f),
               "--name", name)
        made[name] = f
    return made


def evaluate(base: Path, adapters: list[Path], data: Path, out: Path) -> list[dict]:
    if not out.exists():
        flags = [x for a in adapters for x in ("--adapter", str(a))]
        mt("eval", "-q", "--base", str(base), *flags, str(data), "-o", str(out), "--resume")
    return [json.loads(x) for x in out.read_text().splitlines() if x.strip()]


def ratio_se(m: list[int], a: list[int]) -> tuple[float, float]:
    """R = mean(m)/mean(a) on paired examples and the delta method's standard error."""
    n = len(m)
    am = sum(a) / n
    if am == 0:
        return float("nan"), float("nan")
    r = (sum(m) / n) / am
    d = [x - r * y for x, y in zip(m, a)]
    md = sum(d) / n
    sd = math.sqrt(sum((x - md) ** 2 for x in d) / max(n - 1, 1))
    return r, sd / math.sqrt(n) / am


def table(records: list[dict], tasks: list[str], rows: list[str], alone_of: dict[str, str]) -> list[dict]:
    by: dict[tuple, dict[str, int]] = {}
    for r in records:
        by.setdefault((r["adapter"], r["task"]), {})[r["id"]] = r["correct"]
    out = []
    rng = random.Random(0)
    for name in rows:
        row = {"method": name, "acc": {}, "se": {}, "norm": {}, "norm_se": {}}
        pairs = {}
        for t in tasks:
            ids = sorted(by[(alone_of[t], t)])
            m = [by[(name, t)][i] for i in ids]
            a = [by[(alone_of[t], t)][i] for i in ids]
            p = sum(m) / len(m)
            row["acc"][t], row["se"][t] = p, math.sqrt(p * (1 - p) / len(m))
            row["norm"][t], row["norm_se"][t] = ratio_se(m, a)
            pairs[t] = (m, a)
        row["mean"] = sum(row["norm"].values()) / len(tasks)
        row["mean_se"] = math.sqrt(sum(v ** 2 for v in row["norm_se"].values())) / len(tasks)
        row["worst"] = min(row["norm"].values())
        boot = []
        for _ in range(2000):
            w = []
            for t, (m, a) in pairs.items():
                k = [rng.randrange(len(m)) for _ in m]
                sa = sum(a[i] for i in k)
                w.append(sum(m[i] for i in k) / sa if sa else float("inf"))
            boot.append(min(w))
        mb = sum(boot) / len(boot)
        row["worst_se"] = math.sqrt(sum((x - mb) ** 2 for x in boot) / (len(boot) - 1))
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("exp-data"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--dev", type=int, default=30)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--ada-steps", type=int, default=100)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = args.tasks.split(",")
    experts = [str(args.experts / f"{t}.safetensors") for t in tasks]
    dev, test = split(args.data, tasks, args.dev, args.test, args.out)
    made = merges(args.base, experts, dev, args.out, args)
    free = [made[n] for n in DATA_FREE]
    alone = {t: t for t in tasks}
    dev_recs = evaluate(args.base, [*map(Path, experts), *free], dev, args.out / "eval-dev.jsonl")
    best = max(table(dev_recs, tasks, list(DATA_FREE), alone), key=lambda r: r["mean"])["method"]
    print(f"best data-free method on DEV (mean normalised accuracy): {best}", flush=True)
    test_recs = evaluate(args.base, [*map(Path, experts), *made.values()], test, args.out / "eval-test.jsonl")
    base_recs = evaluate(args.base, [], test, args.out / "eval-test-base.jsonl")
    rows = [best, *[n for n in made if n not in DATA_FREE], *[n for n in DATA_FREE if n != best]]
    result = table(test_recs, tasks, rows, alone)
    base_acc = {t: sum(r["correct"] for r in base_recs if r["task"] == t) / sum(r["task"] == t for r in base_recs)
                for t in tasks}
    alone_acc = {t: sum(r["correct"] for r in test_recs if r["adapter"] == t and r["task"] == t) /
                 sum(1 for r in test_recs if r["adapter"] == t and r["task"] == t) for t in tasks}
    (args.out / "table.json").write_text(json.dumps({"tasks": tasks, "best_data_free": best, "base": base_acc,
                                                     "alone": alone_acc, "rows": result}, indent=1))
    n = {t: sum(1 for r in base_recs if r["task"] == t) for t in tasks}
    print("| method | " + " | ".join(tasks) + " | mean | worst |")
    print("|---|" + "---|" * (len(tasks) + 2))
    for row in result:
        cells = [f"{row['acc'][t]:.2f}" for t in tasks]
        print(f"| {row['method']} | " + " | ".join(cells) + f" | {row['mean']:.3f} ± {row['mean_se']:.3f} | "
              f"{row['worst']:.3f} ± {row['worst_se']:.3f} |")
    print("| alone | " + " | ".join(f"{alone_acc[t]:.2f}" for t in tasks) + " | | |")
    print("| base | " + " | ".join(f"{base_acc[t]:.2f}" for t in tasks) + " | | |")
    print("n per task: " + ", ".join(f"{t} {n[t]}" for t in tasks))


if __name__ == "__main__":
    main()
