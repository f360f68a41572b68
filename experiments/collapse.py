"""The collapse experiment ("Task-level model-merging collapse" and "Demystifying Mergeability", issue 19) on the
merges of stage ``merges``.

    collapse   diagnose on the kept task experts with the base model (HiddenSim, MDS, Theorem 1's bounds on DIAG_K
               dev examples per task, gradients, the weight-space and spectral metrics of every pair), every merge
               of stage merges (its measured distortion) and the merging losses; then from diagnose's own records
               the collapse paper's statistics (the merging-loss table, the ANOVAs, every pair metric against the
               pair's loss per method, MDS against the best loss per group, Theorem 1 against the merges), the
               sparse predictor per method and over the methods (leave one task out, against every single metric
               and cosine, with the forecast of a group's worst loss from its pairs), the comparison of the
               per-method fits; the task selection (diagnose --select) from each group of SELECT_SIZE, its
               proposal merged with SELECT_METHOD and evaluated on its members' dev examples; the figures

The unit of independence differs by question and is said with each table (EXPERIMENTS.md): a pair's loss is a
mean over its two members' dev examples, and the pairs share tasks (every task is in 13 pairs), so the
correlations over pairs are not over independent units; diagnose's permutation p-values and the
leave-one-task-out fits respect that (docs/science.md), the plain Pearson and Spearman p-values do not.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from .harness import ROOT, Run, read_jsonl, sha256, stage, write_jsonl
from .stages import TABLE3, base_dir, correctness, data_dir, fresh_eval, groups, methods_of, ratio_loss

# dev examples per task for the hidden states (HiddenSim, MDS, distortion) and the gradients' calibration
DIAG_K, GRAD_SAMPLES, DIAG_SEED = 10, 10, 0
# the task selection: from each random group of this size, the proposal of diagnose --select, merged with
SELECT_SIZE, SELECT_METHOD = 6, "ties"
# the figures kept in the repository (docs/figures/collapse/), of those diagnose --plot draws
# (pair_metrics.png, the heat map of every pair metric, is 0.5 MB at 14 tasks and stays in the cache)
FIGURES = ("pair_loss.png", "hidden_sim.png", "metrics_vs_loss.png", "theorem1.png", "collapse_limits.png")
FIGURE_DIR = ROOT / "docs" / "figures" / "collapse"


def loss_records(rows: list[dict]) -> list[dict]:
    """The merges stage's records as diagnose's merging-loss records (docs/formats.md)."""
    return [{"group": r["group"], "adapters": r["members"], "adapter": r["task"], "task": r["task"],
             "method": r["method"], "loss": r["loss"], "loss_se": r["loss_se"]} for r in rows]


def digest(cmd: list, small: list[Path], big: list[Path] = ()) -> str:
    """What an output of the stage was made from: the command line, the content of the small input files and
    the size and time of the big ones (the merges: 13 GB)."""
    h = hashlib.sha256(json.dumps([str(c) for c in cmd]).encode())
    for f in small:
        h.update(f"{f}:{sha256(f)}".encode())
    for f in big:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def fresh(out: Path, key: str) -> bool:
    """Whether ``out`` exists and was made from what ``key`` digests (its ``.key`` file, written on success)."""
    k = out.with_name(out.name + ".key")
    return out.exists() and k.exists() and k.read_text() == key


def made(out: Path, key: str) -> None:
    out.with_name(out.name + ".key").write_text(key)


def worst(loss: dict[str, float | None]) -> tuple[str | None, float | None, float | None]:
    """The member with the largest loss (the most negative), that loss, and the mean, over the members whose
    expert alone answers at least one example (the loss of the others is undefined)."""
    ok = {t: v for t, v in loss.items() if v is not None}
    w = min(ok, key=ok.get) if ok else None
    return w, ok.get(w), (sum(ok.values()) / len(ok) if ok else None)


def kept_tasks(run: Run) -> list[str]:
    return sorted(r["task"] for r in read_jsonl(run.records / "accuracy.jsonl") if r["kept"])


def measure_command(run: Run) -> tuple[list, str, Path]:
    """The measurement's diagnose command, the digest of what it reads, and its output."""
    kept = kept_tasks(run)
    gs = groups(kept)
    out = run.cache / "collapse"
    out.mkdir(exist_ok=True)
    experts = [run.cache / "experts" / f"{t}.safetensors" for t in kept]
    dev = out / "dev.jsonl"
    rows = [r for t in kept for r in read_jsonl(data_dir(run) / "dev" / f"{t}.jsonl")]
    if not dev.exists() or read_jsonl(dev) != rows:
        write_jsonl(dev, rows)
    md = run.cache / "merges"
    merged = [md / g / f"{m}.safetensors" for g, members in gs.items() for m in methods_of(members)]
    missing = [f for f in merged if not f.exists()]
    if missing:
        raise SystemExit(f"experiments: {len(missing)} merges of stage merges are not in {md} (such as "
                         f"{missing[0].relative_to(run.cache)}): run it again with --redo merges")
    diag = out / "diagnose.jsonl"
    cmd = ["diagnose", "-q", "--base", base_dir(run), "--data", dev, "--k", DIAG_K, "--seed", DIAG_SEED,
           "--gradients", "--grad-samples", GRAD_SAMPLES, *[x for f in merged for x in ("--merged", f)], *experts,
           "-o", diag]
    return cmd, digest(cmd, [dev], [*experts, *merged]), diag


def measure(run: Run) -> Path:
    """diagnose's measurements (pair, adapter, group and merge records) of the kept experts and every merge of
    stage merges: they need the merges, not their evaluation, so this part may run while the merges stage still
    evaluates (``collapse.measure(Run(cache=..., glue=..., log=...))``); the stage reuses the file while its
    inputs are the same (``fresh``) and records the command that made it."""
    cmd, key, diag = measure_command(run)
    if fresh(diag, key):
        run.commands.append(run.shown(["mergetool", *cmd]))
    else:
        run.mt(*cmd)
        made(diag, key)
    return diag


@stage("collapse", needs=("merges",))
def collapse(run: Run) -> list[Path]:
    """diagnose on the kept experts, their merges and the merging losses: the collapse paper's tables, Theorem 1
    against the merges, the L1 predictor per method and its comparison, the forecast against its baselines, the
    task selection repeated on every group of SELECT_SIZE, the figures."""
    kept = kept_tasks(run)
    gs = groups(kept)
    out = run.cache / "collapse"
    experts = [run.cache / "experts" / f"{t}.safetensors" for t in kept]
    # 1. the measurements (pair, adapter, group and merge records)
    diag = measure(run)
    dev = out / "dev.jsonl"
    losses = write_jsonl(out / "losses.jsonl", loss_records(read_jsonl(run.records / "merges.jsonl")))
    figs = out / "figures"
    # 2. from the records alone: the statistics, and the predictor per method and over the methods
    fits, todo = {}, []
    for m in [None, *methods_of(kept[:2])]:
        name = m or "all"
        fits[name] = out / f"fit-{name}.json"
        cmd = ["diagnose", "-q", "--records", diag, "--losses", losses, "--fit", fits[name],
               *(["--fit-method", m] if m else []), "--seed", DIAG_SEED, *(["--plot", figs] if m is None else []),
               "-o", out / f"stats-{name}.jsonl"]
        key = digest(cmd, [diag, losses])
        if not fresh(out / f"stats-{name}.jsonl", key):
            todo.append((cmd, out / f"stats-{name}.jsonl", key))
    cmd = ["diagnose", "-q", "--compare-fits", *[fits[m] for m in fits if m != "all"], "-o", out / "compare.jsonl"]
    key = digest(cmd, [diag, losses])
    if todo or not fresh(out / "compare.jsonl", key):
        todo.append((cmd, out / "compare.jsonl", key))
    run.mt_many([c for c, _, _ in todo], "collapse analyses")
    for _, f, key in todo:
        made(f, key)
    # 3. the task selection, from each random group of SELECT_SIZE
    sel_groups = {g: ms for g, ms in gs.items() if len(ms) == SELECT_SIZE}
    todo = []
    for g, members in sel_groups.items():
        f = out / f"select-{g}.jsonl"
        others = [run.cache / "experts" / f"{t}.safetensors" for t in kept if t not in members]
        mine = [run.cache / "experts" / f"{t}.safetensors" for t in members]
        cmd = ["diagnose", "-q", "--base", base_dir(run), "--data", dev, "--k", DIAG_K, "--seed", DIAG_SEED,
               "--select", SELECT_SIZE, *[x for c in others for x in ("--candidates", c)], *mine, "-o", f]
        key = digest(cmd, [dev], [*others, *mine])
        if not fresh(f, key):
            todo.append((cmd, f, key))
    run.mt_many([c for c, _, _ in todo], "task selection")
    for _, f, key in todo:
        made(f, key)
    chosen = {}
    for g in sel_groups:
        got = [r for r in read_jsonl(out / f"select-{g}.jsonl") if r.get("kind") == "selection"]
        if not got:
            raise SystemExit(f"experiments: {out / f'select-{g}.jsonl'} holds no selection record; see {run.log}")
        chosen[g] = got[0]
    merges, sel_rows, where = [], [], {}
    for g, s in chosen.items():
        new = sorted(s["group"])
        s["members_after"] = new
        if new == sorted(sel_groups[g]):
            continue
        f = out / "select" / g / ("+".join(new) + ".safetensors")  # a new proposal is a new file
        where[g] = f
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            merges.append(["merge", "-q", "-m", SELECT_METHOD, *TABLE3[SELECT_METHOD], "--dtype", "float16",
                           *[run.cache / "experts" / f"{t}.safetensors" for t in new], "-o", f,
                           "--name", f"{SELECT_METHOD}:sel-{g}"])
    run.mt_many(merges, "selection merges")
    bits = {(r["task"], r["model"]): r["correct"] for r in read_jsonl(run.records / "accuracy-examples.jsonl")}
    before = {(r["group"], r["task"]): r for r in read_jsonl(run.records / "merges.jsonl")
              if r["method"] == SELECT_METHOD}
    evals = {}
    for t in kept:
        mine = [g for g in where if t in chosen[g]["members_after"]]
        if not mine:
            continue
        f = data_dir(run) / "dev" / f"{t}.jsonl"
        e = out / "select" / f"eval-{t}.jsonl"
        fresh_eval(e, [str(where[g]) for g in mine])
        run.mt("eval", "-q", "--base", base_dir(run), *[x for g in mine for x in ("--adapter", where[g])], f,
               "-o", e, "--resume")
        ids = [r["id"] for r in read_jsonl(f)]
        for g in mine:
            c = correctness(e, ids, f"{SELECT_METHOD}:sel-{g}")
            evals[(g, t)] = (ratio_loss(c, bits[(t, "expert")]), c.count("1") / len(ids))
    for g, s in chosen.items():
        b = {t: before[(g, t)]["loss"] for t in sel_groups[g]}
        changed = g in where
        a = {t: evals[(g, t)][0][0] for t in s["members_after"]} if changed else b
        (wb, lb, mb), (wa, la, ma) = worst(b), worst(a)
        sel_rows.append({"group": g, "method": SELECT_METHOD, "before": sorted(sel_groups[g]), "after": s["members_after"],
                         "changed": changed, "worst_mds_before": s["worst_mds_before"],
                         "worst_mds_after": s["worst_mds_after"], "steps": s["steps"],
                         "worst_loss_before": lb, "worst_task_before": wb, "worst_loss_after": la,
                         "worst_task_after": wa, "mean_loss_before": mb, "mean_loss_after": ma, "loss_after": a})
    # 4. the records and figures
    run.write_records("collapse-diagnose", [r for r in read_jsonl(diag) if r.get("kind") in ("pair", "adapter", "group",
                                                                                             "merge")])
    stats = []
    for name in fits:
        for r in read_jsonl(out / f"stats-{name}.jsonl"):
            if r.get("kind") in ("stat", "model") and (name == "all" or r.get("kind") == "model"):
                stats.append({"fitted_on": name, **r})
    run.write_records("collapse-stats", stats)
    run.write_records("collapse-compare", read_jsonl(out / "compare.jsonl"))
    run.write_records("collapse-selection", sel_rows)
    FIGURE_DIR.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        if (figs / name).exists():
            shutil.copyfile(figs / name, FIGURE_DIR / name)
    return [run.records / "merges.jsonl", run.records / "accuracy.jsonl", dev, *experts]
