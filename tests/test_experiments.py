"""The experiments harness (experiments/): EXPERIMENTS.md's marked tables are exactly what the committed
records build (a changed record or a hand-edited table fails), and stages run in order, once, resumed when
their inputs are unchanged and rerun when they change."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from experiments import datamerge, harness, report, scores  # imported before a test patches stages.ALPHA

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "EXPERIMENTS.md"


def test_experiments_md_tables_are_the_records():
    doc = DOC.read_text()
    marked = [m["name"] for m in report.BLOCK.finditer(doc)]
    assert {"tasks", "timings", "score-task", "score-task-means", "score-task-bins", "score-task-spearman",
            "score-task-stability"} <= set(marked)
    assert report.check(doc, report.tables()) == []
    assert report.fill(doc, report.tables()) == doc


def test_a_changed_record_or_table_is_caught(tmp_path):
    doc = DOC.read_text()
    rec = tmp_path / "records"
    shutil.copytree(harness.RECORDS, rec)
    rows = harness.read_jsonl(rec / "accuracy.jsonl")
    rows[0]["expert"] = rows[0]["expert"] + 0.01  # one expert's accuracy one point off
    harness.write_jsonl(rec / "accuracy.jsonl", rows)
    # every table built from accuracy.jsonl: the tasks, and the collapse section's (its "alone" column)
    assert sorted(report.check(doc, report.tables(rec))) == ["collapse-loss-task", "tasks"]
    edited = doc.replace("| yes |", "| no |", 1)  # a table edited by hand
    assert edited != doc and report.check(edited, report.tables()) == ["tasks"]
    # a marked block whose records are gone is reported, not silently kept
    (rec / "data.jsonl").unlink()
    assert "tasks" in report.check(doc, report.tables(rec))


def test_fill_replaces_only_marked_blocks():
    doc = "a\n<!-- table:t -->\nold\n<!-- /table:t -->\nb <!-- table:u -->\nkeep\n<!-- /table:u -->\n"
    out = report.fill(doc, {"t": "| new |"})
    assert out == "a\n<!-- table:t -->\n| new |\n<!-- /table:t -->\nb <!-- table:u -->\nkeep\n<!-- /table:u -->\n"
    assert report.check(out, {"t": "| new |"}) == ["u"]


def test_the_data_stage_asks_for_the_glue_folder_in_one_line(tmp_path):
    """The GLUE tsv files are not in the repository: without --glue, or with a path that is not a folder, the
    data stage stops before it runs anything and says what to pass; the cache gets no data."""
    import subprocess
    import sys

    for extra, why in (([], "not given"), (["--glue", str(tmp_path / "nope")], "nope is not a folder")):
        p = subprocess.run([sys.executable, "-m", "experiments", "run", "data", "-q", "--cache", str(tmp_path / "c"),
                            *extra], capture_output=True, text=True, cwd=harness.ROOT)
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr.count("\n") == 1 and "--glue DIR" in p.stderr and why in p.stderr
        assert not (tmp_path / "c" / "data").exists()


def test_stages_run_in_order_once_and_again_when_inputs_change(tmp_path, monkeypatch):
    calls = []
    src = tmp_path / "input.txt"
    src.write_text("one")
    monkeypatch.setattr(harness, "STAGES", {})

    @harness.stage("first")
    def first(run):
        calls.append("first")
        run.write_records("first", [{"x": src.read_text()}])
        return [src]

    @harness.stage("second", needs=("first",))
    def second(run):
        calls.append("second")
        run.sh("true")
        run.write_records("second", [{"y": 1}])
        return []

    run = harness.Run(cache=tmp_path / "cache", glue=tmp_path, records=tmp_path / "records", quiet=True)
    harness.run_stages(run, ["second"], set())
    assert calls == ["first", "second"]
    m = json.loads((run.records / "manifest.json").read_text())
    assert m["stages"]["second"]["commands"] == ["true"]
    assert set(m["stages"]["first"]["records"]) == {"first.jsonl"}
    harness.run_stages(run, ["second"], set())  # finished, inputs unchanged: nothing runs
    assert calls == ["first", "second"]
    src.write_text("two")  # an input changed: the stage that read it runs again
    harness.run_stages(run, ["second"], set())
    assert calls == ["first", "second", "first"]
    harness.run_stages(run, ["second"], {"second"})
    assert calls[-1] == "second"
    # the same records with a new cache (a clone of the repository, whose manifest a run elsewhere wrote): the
    # stages' outputs in the cache are not there, so both run
    other = harness.Run(cache=tmp_path / "cache2", glue=tmp_path, records=run.records, quiet=True)
    harness.run_stages(other, ["second"], set())
    assert calls[-2:] == ["first", "second"]
    harness.run_stages(other, ["second"], set())
    assert calls[-2:] == ["first", "second"] and len(calls) == 6
    with pytest.raises(SystemExit, match="unknown stage"):
        harness.order(["nope"])


def test_merging_loss_standard_error_matches_a_bootstrap():
    """The ratio estimator's standard error (delta method) against a paired bootstrap of the same examples."""
    import random

    from experiments.stages import ratio_loss

    rng = random.Random(0)
    n = 300
    alone = "".join("1" if rng.random() < 0.8 else "0" for _ in range(n))
    merged = "".join(("1" if rng.random() < 0.85 else "0") if a == "1" else ("1" if rng.random() < 0.3 else "0")
                     for a in alone)
    loss, se = ratio_loss(merged, alone)
    assert loss == pytest.approx(100 * (merged.count("1") / alone.count("1") - 1))
    boot = []
    for _ in range(4000):
        idx = [rng.randrange(n) for _ in range(n)]
        m, a = sum(int(merged[i]) for i in idx), sum(int(alone[i]) for i in idx)
        boot.append(100 * (m / a - 1))
    mu = sum(boot) / len(boot)
    sd = (sum((b - mu) ** 2 for b in boot) / (len(boot) - 1)) ** 0.5
    assert se == pytest.approx(sd, rel=0.08)
    assert ratio_loss("0101", "0000") == (None, None)  # no example right alone: no loss


def test_groups_are_every_pair_and_distinct_random_groups():
    from experiments.stages import GROUP_SIZES, GROUPS_PER_SIZE, groups

    tasks = [f"t{i:02d}" for i in range(16)]
    g = groups(tasks)
    assert groups(list(reversed(tasks))) == g  # fixed by the seed, not the order given
    sizes = [len(m) for m in g.values()]
    assert sizes.count(2) == 120 and all(sizes.count(k) == GROUPS_PER_SIZE for k in GROUP_SIZES)
    assert len({tuple(m) for m in g.values()}) == len(g) >= 120 + 30
    assert all(m == sorted(set(m)) for m in g.values())


@pytest.mark.slow
def test_expert_accuracy_and_merge_stages_on_a_tiny_model(tiny_lm, tmp_path, monkeypatch):
    """The stages' mergetool calls and records, end to end on a tiny random Llama and three small tasks: every
    (group, method, task) gets a record whose accuracy is its eval records' and whose loss is the ratio."""
    from experiments import stages

    cache, rec = tmp_path / "cache", tmp_path / "records"
    (cache / "data" / "dev").mkdir(parents=True)
    (cache / "smollm2-135m").symlink_to(tiny_lm, target_is_directory=True)
    words = [" red", " blue", " green"]
    rows = []
    tasks = ["ta", "tb", "tc", "td"]
    for t, task in enumerate(tasks):
        for i in range(12):
            rows.append({"id": f"{task}-{i}", "task": task, "split": "train" if i < 6 else "dev",
                         "prompt": f"Task {task} item {i}: the colour is", "choices": words, "answer": (i + t) % 3})
    harness.write_jsonl(cache / "data" / "tasks-train.jsonl", [r for r in rows if r["split"] == "train"])
    for task in tasks:
        harness.write_jsonl(cache / "data" / "dev" / f"{task}.jsonl",
                            [r for r in rows if r["split"] == "dev" and r["task"] == task])
    harness.write_jsonl(cache / "data" / "tasks-dev.jsonl", [r for r in rows if r["split"] == "dev"])
    harness.write_jsonl(rec / "data.jsonl", [{"task": t, "chance": 1 / 3, "majority": 1 / 3} for t in tasks])
    monkeypatch.setattr(stages, "EXPERT", ["--rank", "2", "--alpha", "4", "--epochs", "1"])
    monkeypatch.setattr(stages, "MIN_GAIN", -1.0)  # keep every task: the bar is not what is tested here
    monkeypatch.setattr(stages, "ALPHA", 1.01)
    monkeypatch.setattr(stages, "METHODS", {"mean": [], "task-arithmetic": ["--lambda", "0.4"]})
    monkeypatch.setattr(stages, "GROUP_SIZES", (3,))
    monkeypatch.setattr(stages, "GROUPS_PER_SIZE", 1)
    run = harness.Run(cache=cache, glue=tmp_path, records=rec, quiet=True, log=tmp_path / "log")
    stages.experts(run)
    stages.accuracy(run)
    acc = harness.read_jsonl(rec / "accuracy.jsonl")
    assert [r["task"] for r in acc] == tasks and all(r["n"] == 6 and r["kept"] for r in acc)
    ex = {(r["task"], r["model"]): r["correct"] for r in harness.read_jsonl(rec / "accuracy-examples.jsonl")}
    assert all(r["expert"] == ex[(r["task"], "expert")].count("1") / 6 for r in acc)
    stages.merges(run)
    merged = harness.read_jsonl(rec / "merges.jsonl")
    pairs = {"ta+tb", "ta+tc", "ta+td", "tb+tc", "tb+td", "tc+td"}
    assert {r["group"] for r in merged} == pairs | {"g3-0"}
    assert len(merged) == 2 * (2 * 6 + 3)
    bits = {(r["group"], r["task"]): r["correct"] for r in harness.read_jsonl(rec / "merges-examples.jsonl")}
    g3 = next(r["members"] for r in merged if r["group"] == "g3-0")
    raw = {(r["adapter"], r["id"]): r["correct"] for r in harness.read_jsonl(cache / "merges" / f"eval-{g3[0]}.jsonl")}
    assert bits[("g3-0", g3[0])] == "".join(str(raw[("mean:g3-0", f"{g3[0]}-{i}")]) for i in range(6, 12))
    for r in merged:
        alone = ex[(r["task"], "expert")]
        if alone.count("1"):
            assert r["loss"] == pytest.approx(100 * (r["merged"] / (alone.count("1") / 6) - 1))
    # the stage resumes: nothing is merged or scored again
    before = (cache / "merges" / "eval-ta.jsonl").read_bytes()
    files = stages.merges(run)
    assert (cache / "merges" / "eval-ta.jsonl").read_bytes() == before
    assert harness.read_jsonl(rec / "merges.jsonl") == merged
    # finished only where its evaluations are in the cache: a new cache with the same accuracy records runs it
    run.record_stage("merges", 0.0, 0.0, files, {}, "test")
    assert run.finished("merges")
    (cache / "merges" / "eval-ta.jsonl").rename(tmp_path / "eval-ta.jsonl")
    assert not run.finished("merges")
    (tmp_path / "eval-ta.jsonl").rename(cache / "merges" / "eval-ta.jsonl")
    # collapse: diagnose on the experts, merges and losses; the selection from the group of three (one candidate).
    # The tiny random model's experts hardly differ, so the losses are planted (the analyses need some spread)
    from experiments import collapse

    merged = [{**r, "loss": -5.0 * (i % 7)} for i, r in enumerate(merged)]
    harness.write_jsonl(rec / "merges.jsonl", merged)
    monkeypatch.setattr(collapse, "SELECT_SIZE", 3)
    monkeypatch.setattr(collapse, "SELECT_METHOD", "mean")
    monkeypatch.setattr(collapse, "DIAG_K", 2)
    monkeypatch.setattr(collapse, "GRAD_SAMPLES", 2)
    monkeypatch.setattr(collapse, "FIGURE_DIR", tmp_path / "figures")
    collapse.collapse(run)
    diag = harness.read_jsonl(rec / "collapse-diagnose.jsonl")
    assert {"+".join(sorted((r["a"], r["b"]))) for r in diag if r["kind"] == "pair"} == pairs
    assert sorted(r["merged"] for r in diag if r["kind"] == "merge") == sorted(
        f"{m}:{g}" for g in pairs | {"g3-0"} for m in ("mean", "task-arithmetic"))
    stats = harness.read_jsonl(rec / "collapse-stats.jsonl")
    assert {r["test"] for r in stats if r["kind"] == "stat"} >= {"anova1", "merging_loss", "theorem1_bounds"}
    assert {r["fitted_on"] for r in stats if r["kind"] == "model"} == {"all", "mean", "task-arithmetic"}
    assert harness.read_jsonl(rec / "collapse-compare.jsonl")[0]["kind"] == "comparison"
    sel = harness.read_jsonl(rec / "collapse-selection.jsonl")
    assert [r["group"] for r in sel] == ["g3-0"]
    loss = {(r["group"], r["task"]): r["loss"] for r in merged if r["method"] == "mean"}
    for r in sel:
        assert r["worst_loss_before"] == min(loss[(r["group"], t)] for t in r["before"])
        if r["changed"] and r["worst_loss_after"] is not None:
            raw = {(x["adapter"], x["id"]): x["correct"] for t in r["after"]
                   for x in harness.read_jsonl(cache / "collapse" / "select" / f"eval-{t}.jsonl")}
            t = r["worst_task_after"]
            c = "".join(str(raw[(f"mean:sel-{r['group']}", x["id"])]) for x in
                        harness.read_jsonl(cache / "data" / "dev" / f"{t}.jsonl"))
            assert r["worst_loss_after"] == pytest.approx(stages.ratio_loss(c, ex[(t, "expert")])[0])
        else:
            assert r["after"] == r["before"] and r["worst_loss_after"] == r["worst_loss_before"]
    gone = cache / "merges" / "ta+tb" / "mean.safetensors"  # a merge missing from the cache: named, not a traceback
    gone.rename(tmp_path / "gone.safetensors")
    with pytest.raises(SystemExit, match=r"1 merges of stage merges are not in .*ta\+tb/mean.safetensors.*--redo merges"):
        collapse.measure_command(run)
    (tmp_path / "gone.safetensors").rename(gone)
    built = {n: f(rec) for n, f in report.TABLES.items() if n.startswith("collapse")}
    assert len(built) == 10 and "| 3 | 1 |" in built["collapse-loss-size"] and "| g3-0 |" in built["collapse-selection"]
    assert "(–)" not in built["collapse-pair-metrics"]  # every cell has its Mantel p (exact: 4 tasks, 24 relabellings)
    # datamerge: the data-aware merges given the first 3 dev examples of each task, judged on the other 3
    # (datamerge, report and scores are imported at the top, before stages.ALPHA was patched above)

    monkeypatch.setattr(scores, "ALPHA", 1.01)
    monkeypatch.setattr(datamerge, "DM_SEARCH", 3)
    monkeypatch.setattr(datamerge, "DM_HELD", 3)
    monkeypatch.setattr(datamerge, "DATA_FREE", {"mean": [], "task-arithmetic": ["--lambda", "0.4"]})
    monkeypatch.setattr(datamerge, "DATA_AWARE", {"regmean": [], "auto-worst": ["--objective", "worst", "--holdout",
                                                                                 "0", "--budget", "4"]})
    datamerge.datamerge(run)
    dm = harness.read_jsonl(rec / "datamerge.jsonl")
    assert len(dm) == 4 * 4 and {r["kind"] for r in dm} == {"data-free", "data-aware"}
    raw = {(r["adapter"], r["id"]): r["correct"] for r in
           harness.read_jsonl(cache / "datamerge" / "search3-held3" / "eval-tb.jsonl")}
    r = next(r for r in dm if r["method"] == "regmean" and r["task"] == "tb")
    assert r["merged_held"] == sum(raw[("regmean", f"tb-{i}")] for i in range(9, 12)) / 3
    assert r["merged_search"] == sum(raw[("regmean", f"tb-{i}")] for i in range(6, 9)) / 3
    assert r["alone_held"] == max(ex[("tb", "expert")][3:].count("1"), 1) / 3
    summ = {s["method"]: s for s in harness.read_jsonl(rec / "datamerge-summary.jsonl")}
    best = summ["mean"]["best_data_free"]
    assert best in ("mean", "task-arithmetic") and "vs_best" not in summ[best]
    assert summ[best]["mean_search"] == max(summ[m]["mean_search"] for m in ("mean", "task-arithmetic"))
    assert all(-2 <= s["vs_best"]["diff"] <= 2 for m, s in summ.items() if m != best)
    assert "auto-worst" in report.datamerge(rec) and "| tb | 3 |" in report.datamerge_tasks(rec)
    made = (cache / "datamerge" / "search3-held3" / "regmean.safetensors").stat().st_mtime_ns
    datamerge.datamerge(run)  # resumes: nothing merged again
    assert (cache / "datamerge" / "search3-held3" / "regmean.safetensors").stat().st_mtime_ns == made


def test_pools_table_from_its_records(tmp_path):
    harness.write_jsonl(tmp_path / "pools.jsonl", [
        {"condition": "sentence", "questions": 482, "known_by_base": 355, "trained": 127, "kept": 100,
         "dropped": 27, "seconds": 1800.0, "passage_words": 39.9},
        {"condition": "prose", "questions": 482, "known_by_base": 355, "trained": 127, "kept": 60,
         "dropped": 67, "seconds": 3000.0, "passage_words": 67.7}])
    md = report.tables(tmp_path)["pools"]
    assert md.splitlines()[2] == "| sentence | 40 | 482 | 355 | 127 | 100 | 27 | 30 min |"
    assert md.splitlines()[3] == "| prose | 68 | 482 | 355 | 127 | 60 | 67 | 50 min |"
    assert set(report.tables(tmp_path)) == {"pools"}  # the tables whose records exist, and only those


def test_score_task_pool_drops_an_expert_at_the_majority_rate():
    """An expert that answers the majority label (CoLA's: 64 % where 64 % are that label) is not counted as
    having learned its task; one far above it is; a task the bar dropped is not scored at all."""
    from experiments.scores import learned

    acc = [{"task": "cola", "n": 100, "expert": 0.64, "majority": 0.64, "kept": True},
           {"task": "sst2", "n": 100, "expert": 0.76, "majority": 0.52, "kept": True},
           {"task": "near", "n": 100, "expert": 0.70, "majority": 0.62, "kept": True},
           {"task": "region", "n": 100, "expert": 0.51, "majority": 0.16, "kept": False}]
    tasks, rows = learned(acc)
    assert tasks == ["sst2"]
    assert [r["task"] for r in rows] == ["cola", "near", "sst2"] and not rows[0]["learned"]
    from scipy.stats import binom

    assert rows[1]["p_vs_majority"] == pytest.approx(binom.sf(69, 100, 0.62)) and rows[1]["p_vs_majority"] > 0.05
    json.dumps(rows)  # plain JSON types


def _simulated_run(groups, effect, rng):
    """score records of one run of the plan: a task's accuracy under merge g is Binomial(n, logistic(effect of the
    task + effect of g)) / n, n the stage's dev examples per task, the merge effects N(0, 1)."""
    import numpy as np

    from experiments.scores import TASK_DEV as n_dev

    beta = rng.normal(0, 1, len(groups))
    out = {a: {"adapter": f"t{a}", "per_trial": [], "trial_merges": []} for a in range(len(effect))}
    for gi, g in enumerate(groups):
        for a in g.counted:
            out[a]["per_trial"].append(rng.binomial(n_dev, 1 / (1 + np.exp(-effect[a] - beta[gi]))) / n_dev)
            out[a]["trial_merges"].append(gi)
    for r in out.values():
        r["score"] = sum(r["per_trial"]) / len(r["per_trial"])
    return list(out.values())


def test_cross_seed_spearman_holds_its_level_and_covers_the_truth():
    """The stability of S across two seeds, simulated on the stage's plan (13 tasks, M = 5, N = 5; seeds 0 and 1)
    with merge effects shared by a merge's members, 200 runs each. No task effect (the true ρ is 0): the
    permutation p rejects at about α (at most 9 % at α = 0.05) and the interval, which resamples tasks and both
    runs' merges, holds 0 in at least 95 %. Task effects (logit-normal, σ = 1.5): the test finds the agreement in
    at least 90 % of runs (199 of 200 when written), and the interval covers the mean ρ of 3000 simulated runs in
    at least 97 % (198 of 200 when written: conservative, as the pigeonhole bootstrap is; resampling the merges
    alone, not the tasks, covers it in 183)."""
    import numpy as np
    from scipy import stats

    from experiments.scores import TASK_M, TASK_N, TASK_SEEDS, cross_seed
    from mergetool.score import plan

    P, runs = 13, 200
    plans = [plan(P, TASK_M, TASK_N, seed=s) for s in TASK_SEEDS]
    rng = np.random.default_rng(7)
    rhos = []
    for _ in range(3000):
        effect = rng.normal(0, 1.5, P)
        a, b = (_simulated_run(g, effect, rng) for g in plans)
        rhos.append(stats.spearmanr([x["score"] for x in a], [x["score"] for x in b]).statistic)
    truth = {0.0: 0.0, 1.5: float(np.mean(rhos))}
    for sigma, p_max, p_min, cover_min in ((0.0, 0.09, 0, 0.95), (1.5, 1, 0.9, 0.97)):
        rejected = covered = 0
        for r in range(runs):
            effect = rng.normal(0, sigma, P)
            res = cross_seed([_simulated_run(g, effect, rng) for g in plans], replicates=300, seed=r)
            assert res["n"] == P and res["merges"] == 2 * len(plans[0])
            rejected += res["p"] <= 0.05
            covered += res["ci"][0] <= truth[sigma] <= res["ci"][1]
        assert p_min * runs <= rejected <= p_max * runs, (sigma, rejected)
        assert covered >= cover_min * runs, (sigma, covered)


def test_cross_seed_is_the_spearman_of_the_two_runs_scores():
    from scipy import stats

    from experiments.scores import cross_seed

    a = [{"adapter": f"t{i}", "score": s, "per_trial": [s], "trial_merges": [i % 3]}
         for i, s in enumerate([0.1, 0.5, 0.3, 0.9, 0.7, 0.2])]
    b = [{"adapter": f"t{i}", "score": s, "per_trial": [s], "trial_merges": [i % 2]}
         for i, s in enumerate([0.2, 0.4, 0.1, 0.8, 0.9, 0.3])]
    res = cross_seed([a, list(reversed(b))], replicates=200)  # matched by adapter, not by position
    assert res["rho"] == pytest.approx(stats.spearmanr([0.1, 0.5, 0.3, 0.9, 0.7, 0.2],
                                                       [0.2, 0.4, 0.1, 0.8, 0.9, 0.3]).statistic)
    assert res["exact"] and res["merges"] == 5 and res["ci"][0] <= res["rho"] <= res["ci"][1]


def test_score_task_tables_from_their_records(tmp_path):
    """The task-level tables from small records: the per-task rows sorted by S with the other seed's S beside,
    the tasks not scored named with their p-value, p-values with significant digits and a Monte Carlo floor."""
    base = {"partners": 5, "trials": 5, "method": "knots", "params": {"inner": "ties", "density": 0.2},
            "base_accuracy": 0.5, "finetuned": 0.8, "control": 0.4, "merging_loss": -12.5, "off_target": 0.01}
    harness.write_jsonl(tmp_path / "score-task.jsonl", [
        {**base, "task": "a", "seed": 0, "score": 0.7, "contribution": 0.3},
        {**base, "task": "b", "seed": 0, "score": 0.9, "contribution": 0.5},
        {**base, "task": "a", "seed": 1, "score": 0.65, "contribution": 0.25},
        {**base, "task": "b", "seed": 1, "score": 0.85, "contribution": 0.45}])
    harness.write_jsonl(tmp_path / "score-task-pool.jsonl", [
        {"task": "cola", "expert": 0.64, "majority": 0.64, "p_vs_majority": 0.5453, "learned": False}])
    harness.write_jsonl(tmp_path / "score-task-stability.jsonl", [
        {"seeds": [0, 1], "n": 13, "partners": 5, "trials": 5, "merges": 30, "rho": 0.8, "ci": [0.41, 0.95],
         "p": 0.0001, "floor": 0.0001}])
    t = report.tables(tmp_path)
    assert set(t) == {"score-task", "score-task-stability"}
    rows = t["score-task"].splitlines()
    assert rows[2] == "| b | 0.50 | 0.80 | 0.900 | 0.850 | 0.400 | 0.500 | -12.5 | +0.010 |"
    assert rows[3].startswith("| a | 0.50 | 0.80 | 0.700 | 0.650 |")
    assert "Not scored: cola (expert 64.0% against a majority label of 64.0%, p = 0.55)." in rows[-1]
    assert t["score-task-stability"].splitlines()[2] == "| 0 and 1 | 13 | 5 | 5 | 30 | 0.80 [0.41, 0.95] | ≤ 0.0001 |"


def test_committed_score_task_records_agree_with_each_other():
    """The committed task-level records are one another's: each seed's summary is score's summary of that seed's
    records (what `score --summary` prints), and the stability record is the Spearman of the two seeds' S."""
    from experiments.scores import cross_seed
    from mergetool.score_summary import summarize

    recs = harness.read_jsonl(harness.RECORDS / "score-task.jsonl")
    summ = {s["seed"]: s for s in harness.read_jsonl(harness.RECORDS / "score-task-summary.jsonl")}
    seeds = sorted({r["seed"] for r in recs})
    assert seeds == sorted(summ) and len(seeds) == 2
    for s in seeds:
        again = json.loads(json.dumps(summarize([r for r in recs if r["seed"] == s]), default=lambda x: x.item()))
        assert {"seed": s, **again} == summ[s]
    stab = harness.read_jsonl(harness.RECORDS / "score-task-stability.jsonl")[0]
    again = cross_seed([[r for r in recs if r["seed"] == s] for s in seeds])
    assert {k: stab[k] for k in again} == again


def _paired_sim(rng, shift: float, tasks: int = 13, n: int = 40):
    """Two merges judged on the same examples: each example has its own difficulty p_i, merge b answers with
    p_i, merge a with p_i + shift (clipped); the expert's accuracy alone is fixed per task."""
    import numpy as np

    a, b, alone, truth = {}, {}, {}, 0.0
    for t in range(tasks):
        p = rng.uniform(0.1, 0.8, n)
        pa = np.clip(p + shift, 0, 1)
        a[t], b[t] = (rng.random(n) < pa).astype(int), (rng.random(n) < p).astype(int)
        alone[t] = rng.uniform(0.5, 0.9)
        truth += (pa - p).sum() / (n * alone[t]) / tasks
    return a, b, alone, truth


def test_datamerge_paired_difference_holds_its_level_and_covers_the_truth():
    """The paired sign-flip test rejects about α of the time when the two merges are exchangeable on every
    example (200 simulated comparisons on the experiment's plan, 13 tasks × 40 held-out examples), and almost
    always when one is 15 points better; the stratified bootstrap interval covers the true difference."""
    import numpy as np

    from experiments.datamerge import paired_difference

    rng = np.random.default_rng(0)
    null = [paired_difference(*_paired_sim(rng, 0.0)[:3], replicates=999, permutations=999, seed=i) for i in range(200)]
    assert sum(r["p"] < 0.05 for r in null) / 200 <= 0.08
    assert sum(r["ci"][0] <= 0 <= r["ci"][1] for r in null) / 200 >= 0.9
    hits = covered = 0
    err = []
    for i in range(40):
        a, b, alone, truth = _paired_sim(rng, 0.15)
        r = paired_difference(a, b, alone, replicates=999, permutations=999, seed=i)
        hits += r["p"] < 0.05
        covered += r["ci"][0] <= truth <= r["ci"][1]
        err.append(r["diff"] - truth)
    assert hits >= 38 and covered >= 34
    assert abs(np.mean(err)) < 0.02  # unbiased: the mean error of 40 estimates (each of se about 0.045)
    r = paired_difference(a, a, alone, replicates=99, permutations=99)
    assert r["diff"] == 0 and r["p"] == 1.0 and r["floor"] == 0.01


@pytest.mark.slow
def test_score_pool_stage_on_a_tiny_model(tiny_lm, tmp_path, monkeypatch):
    """The example-level stage end to end on a tiny random Llama and two pools of 8 planted per-example experts:
    every run's records are score's (contribution = S − control), the stability row is the Spearman of the two
    runs' S, and the tables build from the records. (Each score run resumes with --resume: test_score's
    test_resume_of_a_finished_run_has_nothing_to_do; a second run of the stage is left out for CI's time.)"""
    from scipy.stats import spearmanr

    from conftest import lora_blob, random_lora
    from experiments import pool_scores

    cache, rec = tmp_path / "cache", tmp_path / "records"
    rec.mkdir()
    (cache / "smollm2-135m").parent.mkdir(parents=True)
    (cache / "smollm2-135m").symlink_to(tiny_lm, target_is_directory=True)
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["task"] == "country-capital"][:4] + [r for r in rows if r["task"] == "country-currency"][:4]
    questions, pools = {}, []
    for c, cond in enumerate(("sentence", "prose")):
        data = tmp_path / f"{cond}.jsonl"
        data.write_text("".join(json.dumps({**r, "text": r["text"] if c == 0 else " ".join(reversed(r["text"].split()))})
                                + "\n" for r in rows))
        questions[cond] = data
        pool = cache / f"pool-{cond}"
        pool.mkdir()
        for i, r in enumerate(rows):
            u = random_lora(10 * c + i, rank=8, targets={"up_proj": (128, 64)}, layers=[1], name=r["id"])
            u.meta["training"], u.meta["task"] = {"example": r["id"]}, r["task"]
            for m in u.modules.values():
                m.B *= 30.0
            (pool / f"{r['id']}.safetensors").write_bytes(lora_blob(u))
        pools.append({"condition": cond, "kept_ids": sorted(r["id"] for r in rows)})
    harness.write_jsonl(rec / "pools.jsonl", pools)
    monkeypatch.setattr(pool_scores, "QUESTIONS", questions)
    monkeypatch.setattr(pool_scores, "RUNS", {"knots-M50-N5": ("mean", 2, 2, 0), "other": ("ties", 2, 3, 1)})
    monkeypatch.setattr(pool_scores, "STABILITY", [("seed", "knots-M50-N5", "other")])
    monkeypatch.setattr(pool_scores, "LOCAL_M", 1)
    run = harness.Run(cache=cache, glue=tmp_path, records=rec, quiet=True, log=tmp_path / "log")
    pool_scores.score_pool(run)
    recs = harness.read_jsonl(rec / "score-pool.jsonl")
    assert len(recs) == 2 * 2 * 8
    raw = {(r["adapter"]): r for r in harness.read_jsonl(cache / "score-pool" / "prose" / "other.jsonl")}
    for r in recs:
        assert r["contribution"] == pytest.approx(r["score"] - r["control"], abs=1e-5)
        if (r["condition"], r["run"]) == ("prose", "other"):
            assert r["score"] == pytest.approx(raw[r["adapter"]]["score"]) and len(r["per_trial"]) == 3
    for st in harness.read_jsonl(rec / "score-pool-stability.jsonl"):
        a, b = ({r["adapter"]: r["score"] for r in recs if r["condition"] == st["condition"] and r["run"] == x}
                for x in (st["a"], st["b"]))
        names = sorted(a)
        want = spearmanr([a[n] for n in names], [b[n] for n in names]).statistic
        assert st["rho"] == pytest.approx(want) or (st["rho"] is None and math.isnan(want))
    summ = harness.read_jsonl(rec / "score-pool-summary.jsonl")
    assert [(s["condition"], s["run"]) for s in summ] == [(c, x) for c in ("sentence", "prose") for x in ("knots-M50-N5", "other")]
    for loc in harness.read_jsonl(rec / "score-pool-locality.jsonl"):  # the S = 1 experts of the main run, fixed
        main = [r for r in recs if r["condition"] == loc["condition"] and r["run"] == "knots-M50-N5"]
        assert loc["fixed"] == sum(r["score"] == 1 for r in main)
    fc = harness.read_jsonl(rec / "score-pool-forecast.jsonl")
    assert [f["condition"] for f in fc] == ["sentence", "prose"]
    built = {n: report.TABLES[n](rec) for n in ("pool-scores", "pool-spearman", "pool-bins", "pool-stability",
                                                 "pool-forecast", "pool-methods", "pool-locality")}
    assert built["pool-scores"].count("\n| prose |") == 2


def test_many_mergetool_commands_run_in_one_process_and_stop_at_the_first_failure(tmp_path):
    """``Run.mt_many``: the commands run in order through the CLI's entry point; the first that fails stops the
    batch and the stage, and the manifest gets only the commands that ran to the end."""
    run = harness.Run(cache=tmp_path, glue=tmp_path, records=tmp_path / "records", quiet=True, log=tmp_path / "log")
    run.mt_many([["merge", "--list-methods"]], "ok")
    assert run.commands == ["mergetool merge --list-methods"]
    run.commands = []
    with pytest.raises(SystemExit, match="nosuch"):
        run.mt_many([["merge", "--list-methods"], ["merge", "-m", "nosuch", tmp_path / "a.safetensors"],
                     ["merge", "--list-methods"]], "stops")
    assert run.commands == ["mergetool merge --list-methods"]
    assert "nosuch" in (tmp_path / "log").read_text()


def test_a_stage_clock_adds_the_runs_a_kill_cut_short(tmp_path, monkeypatch):
    """``Clock``: an attempt that raises leaves its seconds in the clock file; the next adds to them and, when it
    finishes, removes the file and reports both runs."""
    import time

    monkeypatch.setattr(harness.Clock, "TICK", 0.05)
    p = tmp_path / "s.clock"
    with pytest.raises(KeyboardInterrupt), harness.Clock(p):
        time.sleep(0.2)
        raise KeyboardInterrupt
    first = harness.json.loads(p.read_text())
    assert first["runs"] == 1 and 0.1 <= first["seconds"] <= 5
    with harness.Clock(p) as c:
        time.sleep(0.1)
    assert c.runs == 2 and c.total >= first["seconds"] + 0.05 and not p.exists()


def test_parallel_mergetool_commands_stop_at_a_failure(tmp_path):
    """``Run.mt_parallel``: independent commands two at a time; every one that succeeds goes into the manifest,
    and one that fails stops the others and the stage."""
    run = harness.Run(cache=tmp_path, glue=tmp_path, records=tmp_path / "records", quiet=True, log=tmp_path / "log")
    run.mt_parallel([["merge", "--list-methods"], ["merge", "--list-methods"]], "ok", jobs=2, threads=1)
    assert run.commands == ["mergetool merge --list-methods"] * 2
    with pytest.raises(SystemExit, match="nosuch"):
        run.mt_parallel([["merge", "-m", "nosuch", tmp_path / "a.safetensors"], ["merge", "--list-methods"]],
                        "stops", jobs=1, threads=1)
