"""The experiments harness (experiments/): EXPERIMENTS.md's marked tables are exactly what the committed
records build (a changed record or a hand-edited table fails), and stages run in order, once, resumed when
their inputs are unchanged and rerun when they change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from experiments import harness, report

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "EXPERIMENTS.md"


def test_experiments_md_tables_are_the_records():
    doc = DOC.read_text()
    marked = [m["name"] for m in report.BLOCK.finditer(doc)]
    assert {"tasks", "timings"} <= set(marked)
    assert report.check(doc, report.tables()) == []
    assert report.fill(doc, report.tables()) == doc


def test_a_changed_record_or_table_is_caught(tmp_path):
    doc = DOC.read_text()
    rec = tmp_path / "records"
    shutil.copytree(harness.RECORDS, rec)
    rows = harness.read_jsonl(rec / "accuracy.jsonl")
    rows[0]["expert"] = rows[0]["expert"] + 0.01  # one expert's accuracy one point off
    harness.write_jsonl(rec / "accuracy.jsonl", rows)
    assert report.check(doc, report.tables(rec)) == ["tasks"]
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
    for t, task in enumerate(["ta", "tb", "tc"]):
        for i in range(12):
            rows.append({"id": f"{task}-{i}", "task": task, "split": "train" if i < 6 else "dev",
                         "prompt": f"Task {task} item {i}: the colour is", "choices": words, "answer": (i + t) % 3})
    harness.write_jsonl(cache / "data" / "tasks-train.jsonl", [r for r in rows if r["split"] == "train"])
    for task in ("ta", "tb", "tc"):
        harness.write_jsonl(cache / "data" / "dev" / f"{task}.jsonl",
                            [r for r in rows if r["split"] == "dev" and r["task"] == task])
    harness.write_jsonl(cache / "data" / "tasks-dev.jsonl", [r for r in rows if r["split"] == "dev"])
    harness.write_jsonl(rec / "data.jsonl", [{"task": t, "chance": 1 / 3, "majority": 1 / 3} for t in ("ta", "tb", "tc")])
    monkeypatch.setattr(stages, "EXPERT", ["--rank", "2", "--alpha", "4", "--epochs", "1"])
    monkeypatch.setattr(stages, "MIN_GAIN", -1.0)  # keep every task: the bar is not what is tested here
    monkeypatch.setattr(stages, "ALPHA", 1.01)
    monkeypatch.setattr(stages, "METHODS", {"mean": []})
    run = harness.Run(cache=cache, glue=tmp_path, records=rec, quiet=True, log=tmp_path / "log")
    stages.experts(run)
    stages.accuracy(run)
    acc = harness.read_jsonl(rec / "accuracy.jsonl")
    assert [r["task"] for r in acc] == ["ta", "tb", "tc"] and all(r["n"] == 6 and r["kept"] for r in acc)
    ex = {(r["task"], r["model"]): r["correct"] for r in harness.read_jsonl(rec / "accuracy-examples.jsonl")}
    assert all(r["expert"] == ex[(r["task"], "expert")].count("1") / 6 for r in acc)
    stages.merges(run)
    merged = harness.read_jsonl(rec / "merges.jsonl")
    assert {r["group"] for r in merged} == {"ta+tb", "ta+tc", "tb+tc", "g3-0"}
    assert len(merged) == 2 * 3 + 3
    bits = {(r["group"], r["task"]): r["correct"] for r in harness.read_jsonl(rec / "merges-examples.jsonl")}
    raw = {(r["adapter"], r["id"]): r["correct"] for r in harness.read_jsonl(cache / "merges" / "eval-ta.jsonl")}
    assert bits[("g3-0", "ta")] == "".join(str(raw[("mean:g3-0", f"ta-{i}")]) for i in range(6, 12))
    for r in merged:
        alone = ex[(r["task"], "expert")]
        if alone.count("1"):
            assert r["loss"] == pytest.approx(100 * (r["merged"] / (alone.count("1") / 6) - 1))
    # the stage resumes: nothing is merged or scored again
    before = (cache / "merges" / "eval-ta.jsonl").read_bytes()
    stages.merges(run)
    assert (cache / "merges" / "eval-ta.jsonl").read_bytes() == before
    assert harness.read_jsonl(rec / "merges.jsonl") == merged


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
