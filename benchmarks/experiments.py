"""The papers' experiments at testbed scale (SmolLM2-135M-Instruct, country facts and GLUE), through the
mergetool commands; EXPERIMENTS.md has the commands and what they found.

    python benchmarks/experiments.py tasks --out exp/              # task experts (8+ tasks), for the next two
    python benchmarks/experiments.py weighted --out exp/           # section 6: weighted vs plain mean
    python benchmarks/experiments.py collapse --out exp/           # "Task-level model-merging collapse"
    python benchmarks/experiments.py methods --out exp/            # every method on the eight task experts

Every mergetool call is printed (``$ mergetool ...``) with its stderr, so the log is the exact sequence of
commands. The GLUE data is read from ``--glue DIR`` (GLUE's tsv folders); the country facts are rebuilt from
the installed packages (examples/make_countries.py). "Will it Merge?" at example level (sections 2-5) is the
stage ``score-pool`` of ``python -m experiments`` (experiments/README.md), with its records committed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS8 = ["sst2", "rte", "mrpc", "cola", "wnli", "country-capital", "country-currency", "country-region"]
EXTRA = ["country-language", "country-tld"]  # candidates for task selection
METHODS = {"mean": [], "task-arithmetic": ["--lambda", "0.4"], "ties": ["--density", "0.2"],
           "dare-ties": ["--density", "0.1", "--seed", "0"], "knots": []}


def sh(*args: str, stdin: bytes | None = None, log: bool = True, shown: str | None = None) -> bytes:
    print("$ " + (shown or " ".join(args)), flush=True)
    r = subprocess.run(list(args), input=stdin, capture_output=True)
    if log and r.stderr:
        sys.stdout.write(r.stderr.decode())
        sys.stdout.flush()
    if r.returncode:
        if not log:
            sys.stdout.write(r.stderr.decode())
        raise SystemExit(f"failed with exit {r.returncode}: {' '.join(args)}")
    return r.stdout


def mt(*args: str, **kw) -> bytes:
    return sh(sys.executable, "-m", "mergetool", *args, shown=" ".join(["mergetool", *args]), **kw)


def jsonl(b: bytes) -> list[dict]:
    return [json.loads(x) for x in b.decode().splitlines() if x.strip()]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base_model(out: Path) -> Path:
    d = out / "smollm2-135m"
    if not (d / "config.json").exists():
        from mergetool.model import cache_gguf, resolve_base, testbed_gguf

        out.mkdir(parents=True, exist_ok=True)
        cache_gguf(resolve_base(str(testbed_gguf())), d)
    return d


def countries(out: Path) -> Path:
    p = out / "countries-more.jsonl"
    if not p.exists():
        p.write_bytes(sh(sys.executable, str(ROOT / "examples" / "make_countries.py"), "--attrs",
                         "capital,currency,region,language,tld"))
    return p


# ----------------------------------------------------------------------------- task experts


def task_data(out: Path, args) -> Path:
    """8 tasks (and 2 candidates): GLUE SST-2, RTE, MRPC, CoLA, WNLI and country facts, each with a train
    split (the expert's data) and a dev split (its evaluation)."""
    p = out / "tasks.jsonl"
    if p.exists():
        return p
    glue = jsonl(sh(sys.executable, str(ROOT / "examples" / "make_glue.py"), str(args.glue), "--per-split",
                    str(args.per_split)))
    rows = [r for r in glue]
    rng = random.Random(0)
    facts = jsonl(countries(out).read_bytes())
    for task in ("country-capital", "country-currency", "country-region", "country-language", "country-tld"):
        recs = [r for r in facts if r["task"] == task]
        rng.shuffle(recs)
        for i, r in enumerate(recs[: 2 * args.per_split]):
            rows.append({**r, "split": "train" if i < args.per_split else "dev",
                         "text": r["prompt"] + r["choices"][r["answer"]]})
    for r in rows:
        if r["split"] == "dev":
            r.pop("text", None)
    dev = {}
    kept = []
    for r in rows:  # at most --dev examples per task are evaluated
        if r["split"] == "dev":
            dev[r["task"]] = dev.get(r["task"], 0) + 1
            if dev[r["task"]] > args.dev:
                continue
        kept.append(r)
    return write(p, kept)


def trained_tasks(args) -> list[str]:
    """The 8 tasks, and --extra of the candidate tasks for the selection."""
    return TASKS8 + EXTRA[:args.extra]


def task_experts(out: Path, args) -> tuple[Path, Path, Path]:
    base, data = base_model(out), task_data(out, args)
    experts = out / "experts"
    tasks = set(trained_tasks(args))
    if not experts.exists() or not all((experts / f"{t}.safetensors").exists() for t in tasks):
        train = write(out / "tasks-train.jsonl", [r for r in jsonl(data.read_bytes())
                                                  if r["split"] == "train" and r["task"] in tasks])
        mt("train-expert", "--base", str(base), str(train), "--rank", "16", "--alpha", "32", "--target-modules",
           "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj", "--layers",
           ",".join(str(i) for i in range(15, 30)), "--epochs", "2", "--lr", "1e-3", "--out-dir", str(experts),
           "--resume")
    dev = write(out / "tasks-dev.jsonl", [r for r in jsonl(data.read_bytes()) if r["split"] == "dev" and r["task"] in tasks])
    return base, dev, experts


def accuracies(base: Path, dev: Path, adapters: list[str] | None = None) -> dict[tuple, float]:
    """(adapter or None, task) -> accuracy, from one batched eval --summary."""
    flags = [x for a in (adapters or []) for x in ("--adapter", a)]
    return {(r["adapter"], r["task"]): r["accuracy"] for r in jsonl(mt("eval", "-q", "--base", str(base), *flags,
                                                                        "--summary", str(dev)))}


def weighted(out: Path, args) -> None:
    """Section 6: merge task experts with weights softmax((1 − Acc_base)/τ) against the plain mean."""
    base, dev, experts = task_experts(out, args)
    tasks = args.weighted_tasks.split(",")
    files = [str(experts / f"{t}.safetensors") for t in tasks]
    base_eval = out / "base-summary.jsonl"
    base_eval.write_bytes(mt("eval", "-q", "--base", str(base), "--summary", str(dev)))
    rows = []
    for tau in (0.1, 0.2, 0.5):
        w = mt("weight", "--records", str(base_eval), "--tau", str(tau), *files)
        mt("merge", "-m", "linear", "--weights", "-", *files, "-o", str(out / f"weighted-{tau}.safetensors"),
           "--name", f"weighted-tau{tau}", stdin=w)
        rows.append((tau, {r["adapter"]: r["weight"] for r in jsonl(w)}))
    mt("merge", "-m", "mean", *files, "-o", str(out / "mean.safetensors"), "--name", "mean")
    acc = accuracies(base, dev, [*files, str(out / "mean.safetensors"),
                                 *[str(out / f"weighted-{t}.safetensors") for t, _ in rows]])
    (out / "weighted.json").write_text(json.dumps({"tasks": tasks, "weights": dict((str(t), w) for t, w in rows),
                                                   "accuracy": {f"{a}|{t}": v for (a, t), v in acc.items()}}, indent=2))
    print(json.dumps({"tasks": tasks, "accuracy": {f"{a}|{t}": v for (a, t), v in acc.items()}}, indent=1), flush=True)


# ----------------------------------------------------------------------------- task-level collapse


def collapse(out: Path, args) -> None:
    base, dev, experts = task_experts(out, args)
    files = {t: str(experts / f"{t}.safetensors") for t in trained_tasks(args)}
    alone = accuracies(base, dev, list(files.values()))
    # the largest groups first, then pairs (--pairs of the 28, drawn with a fixed seed): a run cut short
    # still has every group size
    rng = random.Random(0)
    groups = [("eight", list(TASKS8))]
    groups += [(f"four-{i}", sorted(rng.sample(TASKS8, 4))) for i in range(4)]
    pairs = list(itertools.combinations(TASKS8, 2))
    groups += [("pair-" + "+".join(g), list(g)) for g in sorted(random.Random(1).sample(pairs, min(args.pairs, len(pairs))))]
    losses = out / "losses.jsonl"
    done = {r["group"] for r in jsonl(losses.read_bytes())} if losses.exists() else set()
    rows = jsonl(dev.read_bytes())
    (out / "merges").mkdir(exist_ok=True)
    for g, members in groups:
        if g in done:
            continue
        merged = []
        for method, opts in METHODS.items():
            f = out / "merges" / f"{method}-{g}.safetensors"
            if not f.exists():
                mt("merge", "-m", method, *opts, *[files[t] for t in members], "-o", str(f), "--name", f"{method}-{g}",
                   log=False)
            merged.append(str(f))
        # the group's merges, every method, on its members' dev examples: one batched eval, then each member's loss
        mine = write(out / "merges" / f"dev-{g}.jsonl", [r for r in rows if r["task"] in members])
        acc = accuracies(base, mine, merged)
        with losses.open("a") as fh:
            for method in METHODS:
                for t in members:
                    a0, am = alone[(t, t)], acc[(f"{method}-{g}", t)]
                    fh.write(json.dumps({"group": g, "adapters": members, "method": method, "adapter": t, "task": t,
                                         "merged": am, "alone": a0, "loss": (am / a0 - 1) * 100 if a0 else None}) + "\n")
    mt("diagnose", "--base", str(base), "--data", str(dev), "--losses", str(losses), "--gradients",
       *[files[t] for t in TASKS8], "-o", str(out / "diagnose-tasks.jsonl"), "--plot", str(out / "figures"))
    # task selection: replace the most incompatible of six tasks by a candidate, and measure both groups with TIES
    six = TASKS8[:6]
    sel = jsonl(mt("diagnose", "--base", str(base), "--data", str(dev), "--select", "6", "--candidates",
                   *[files[t] for t in trained_tasks(args)[6:]], *[files[t] for t in six]))
    pick = next(r for r in sel if r["kind"] == "selection")
    for label, members in (("before", six), ("after", pick["group"])):
        f = out / "merges" / f"ties-select-{label}.safetensors"
        mt("merge", "-m", "ties", "--density", "0.2", *[files[t] for t in members], "-o", str(f),
           "--name", f"select-{label}", log=False)
        acc = accuracies(base, dev, [str(f)])
        worst = min((acc[(f"select-{label}", t)] / alone[(t, t)] - 1) * 100 for t in members if alone[(t, t)])
        print(f"selection {label}: {members} worst TIES loss {worst:.1f}", flush=True)
        (out / f"select-{label}.json").write_text(json.dumps({"group": members, "worst_ties_loss": worst,
                                                              "selection": pick}, indent=2))


# ----------------------------------------------------------------------------- every method on the eight


SUBSPACE = {"core-space": [], "tsv": [], "iso-c": [], "iso-cts": [], "star": [], "cart": []}


def methods(out: Path, args) -> None:
    """The merge of all eight task experts with each method (the five of the collapse experiment and the
    subspace merges), each task's accuracy and loss: one row per method."""
    base, dev, experts = task_experts(out, args)
    files = [str(experts / f"{t}.safetensors") for t in TASKS8]
    losses = out / "losses.jsonl"  # the experts' accuracies alone, measured by the collapse experiment
    alone = ({(r["task"], r["task"]): r["alone"] for r in jsonl(losses.read_bytes())} if losses.exists()
             else accuracies(base, dev, files))
    merged = []
    for method, opts in {**METHODS, **SUBSPACE}.items():
        f = out / "merges" / f"{method}-eight.safetensors"
        f.parent.mkdir(exist_ok=True)
        if not f.exists():
            mt("merge", "-m", method, *opts, *files, "-o", str(f), "--name", f"{method}-eight", log=False)
        merged.append((method, str(f)))
    acc = accuracies(base, dev, [f for _, f in merged])
    rows = []
    for method, _ in merged:
        for t in TASKS8:
            a0, am = alone[(t, t)], acc[(f"{method}-eight", t)]
            rows.append({"method": method, "task": t, "merged": am, "alone": a0,
                         "loss": (am / a0 - 1) * 100 if a0 else None})
    write(out / "methods-eight.jsonl", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["tasks", "weighted", "collapse", "methods"])
    ap.add_argument("--out", type=Path, default=Path("exp"))
    ap.add_argument("--glue", type=Path, required=True, help="the GLUE tasks' tsv folders (SST-2, RTE, MRPC, CoLA, WNLI)")
    ap.add_argument("--per-split", type=int, default=200, help="training examples per task")
    ap.add_argument("--dev", type=int, default=40, help="evaluated examples per task")
    ap.add_argument("--extra", type=int, default=0, help="collapse: candidate tasks trained beyond the 8 (0-2)")
    ap.add_argument("--pairs", type=int, default=28, help="collapse: how many of the 28 pairs of tasks")
    ap.add_argument("--weighted-tasks", default="sst2,rte,country-capital,country-region,cola,mrpc")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "tasks":
        task_experts(args.out, args)
    elif args.what == "weighted":
        weighted(args.out, args)
    elif args.what == "methods":
        methods(args.out, args)
    else:
        collapse(args.out, args)


if __name__ == "__main__":
    main()
