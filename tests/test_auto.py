"""``merge --method auto``: a planted pool where only one subset merges well, the trace resumed after kill -9 to
the same bytes, the held-out report, and every bad input one line with nothing written."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import random_lora, run_cli, signal_at

from mergetool.blobs import blob_bytes
from mergetool.examples import check_examples
from mergetool.merging import dev_data
from mergetool.merging.auto import Budget, auto_merge, parse_budget
from mergetool.model import load_model, resolve_base
from mergetool.updates import metadata_for, to_tensors

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TASKS = ["country-capital", "country-currency"]


def dev_rows(n=8, choices=4) -> list[dict]:
    """n questions per task, the right answer and choices − 1 others."""
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    out = []
    for t in TASKS:
        for r in [r for r in rows if r["task"] == t][:n]:
            right = r["choices"][r["answer"]]
            keep = [c for c in r["choices"] if c != right][:choices - 1]
            at = r["answer"] % choices
            out.append({"id": r["id"], "task": t, "prompt": r["prompt"], "choices": keep[:at] + [right] + keep[at:],
                        "answer": at})
    return out


@pytest.fixture(scope="module")
def pool(tiny_lm, tmp_path_factory):
    """Two experts that know their task's dev answers (trained on them: a random model only memorises), and a
    poison: a large random update, labelled with the first task, that ruins every merge it is in."""
    from mergetool.train import LoraSpec, target_modules, train_task

    d = tmp_path_factory.mktemp("auto")
    rows = dev_rows()
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, tok = load_model(resolve_base(str(tiny_lm)), CPU)
    spec = LoraSpec(rank=8, alpha=16, targets=["q_proj", "v_proj", "up_proj"], lr=3e-2, epochs=20, batch_size=8)
    names = target_modules(model, spec, default_middle=False)
    files = []
    for t in TASKS:
        items = [(r["prompt"], r["choices"][r["answer"]]) for r in rows if r["task"] == t]
        ad, _ = train_task(model, tok, items, spec, names)
        u = ad.expert(0, t, {"kind": "lora", "task": t, "base_model": "tiny"})
        ad.remove()
        files.append(d / f"{t}.safetensors")
        files[-1].write_bytes(blob_bytes(to_tensors(u), metadata_for(u)))
    shapes = {"q_proj": (64, 64), "v_proj": (32, 64), "up_proj": (128, 64)}
    poison = random_lora(99, rank=8, alpha=16, targets=shapes, name="poison", task=TASKS[0])
    for m in poison.modules.values():
        m.B *= 40
    files.append(d / "poison.safetensors")
    files[-1].write_bytes(blob_bytes(to_tensors(poison), metadata_for(poison)))
    return d, files, model, tok


def _load(files):
    from mergetool.inputs import load_inputs

    return load_inputs([str(f) for f in files], None, False)


def test_auto_finds_the_one_good_subset(pool, tiny_lm):
    d, files, model, tok = pool
    ups = _load(files)
    exs = check_examples(dev_rows(), "dev")
    for e in exs:
        e.context = e.rec["prompt"]
    dev = dev_data(ups, exs, "auto", ("mc",))
    kw = dict(holdout=0.25, objective="mean", budget=Budget(candidates=26), population=8, seed=0, device=CPU)
    kept = auto_merge(model, tok, ups, dev, drop=True, **kw).meta["auto"]
    assert kept["dropped"] == ["poison"]
    assert kept["recipe"]["members"] == TASKS
    stuck = auto_merge(model, tok, ups, dev, drop=False, **kw).meta["auto"]
    assert stuck["dropped"] == []
    # leaving the poison out is what the search found best, on the examples it searched and on the held-out ones
    assert kept["dev"]["objective"] > stuck["dev"]["objective"]
    assert kept["holdout"]["mean"] > stuck["holdout"]["mean"]
    assert set(kept["holdout"]["n"]) == set(TASKS) and all(n == 2 for n in kept["holdout"]["n"].values())


def _auto_args(d, files, tiny_lm, trace, out):
    return ["merge", "-m", "auto", "--data", str(d / "dev.jsonl"), "--base", str(tiny_lm), *map(str, files),
            "--drop", "--budget", "28", "--population", "4", "--holdout", "0.25", "--trace", str(trace), "-o", str(out),
            "--name", "auto"]


def test_trace_resumes_after_kill_9_to_the_same_result(pool, tiny_lm, tmp_path):
    d, files, _, _ = pool
    whole = run_cli(*_auto_args(d, files, tiny_lm, tmp_path / "whole.jsonl", tmp_path / "whole.safetensors"))
    assert whole.returncode == 0, whole.stderr.decode()
    trace, out = tmp_path / "t.jsonl", tmp_path / "out.safetensors"
    # kill -9 as the trace's 13th line begins: the run and reference lines, two whole batches of 4 candidates and
    # 2 of the third (an event, not a moment: the same cut however busy the machine is)
    killed = signal_at("mergetool.merging.auto:Search._write#13", signal.SIGKILL, *_auto_args(d, files, tiny_lm,
                                                                                                  trace, out))
    assert killed.returncode == -signal.SIGKILL and not out.exists(), killed.stderr.decode()
    assert trace.read_text().count('"kind": "candidate"') == 10
    again = run_cli(*_auto_args(d, files, tiny_lm, trace, out))
    assert again.returncode == 0, again.stderr.decode()
    # the rest was continued from the trace, not judged again; the batch cut short is judged again, whole
    assert b"continuing " + str(trace).encode() + b": 8 candidates judged before" in again.stderr, again.stderr
    assert out.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "elapsed"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(trace) == strip(tmp_path / "whole.jsonl")
    meta = json.loads(json.loads(out.read_bytes()[8:8 + int.from_bytes(out.read_bytes()[:8], "little")])
                      ["__metadata__"]["mergetool"])
    assert meta["auto"]["judged"] == 28 and meta["auto"]["recipe"]["method"] == meta["method"]
    # a trace is the search's own: another search refuses it, and leaves it as it was
    before = trace.read_bytes()
    other = run_cli(*_auto_args(d, files[:2], tiny_lm, trace, tmp_path / "o.safetensors"))
    assert other.returncode == 1 and b"is the trace of another search" in other.stderr
    assert trace.read_bytes() == before and not (tmp_path / "o.safetensors").exists()


def test_budget_parses_candidates_and_seconds():
    assert parse_budget("64") == Budget(candidates=64)
    assert parse_budget("90s") == Budget(seconds=90.0) and parse_budget("2m") == Budget(seconds=120.0)
    from mergetool.errors import UsageError

    for bad in ("0", "-3", "fast", "nans", "infm"):
        with pytest.raises(UsageError):
            parse_budget(bad)


def _one_line(r):
    lines = r.stderr.decode().strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("mergetool merge: error: ")


@pytest.mark.parametrize("case", ["no-data-for-a-task", "one-example", "nan", "data-free-method", "auto-option",
                                  "holdout-too-large", "budget-seconds-for-lorahub"])
def test_bad_inputs_are_one_line_and_write_nothing(pool, tiny_lm, tmp_path, case):
    d, files, _, _ = pool
    rows = dev_rows()
    method, extra = "regmean", []
    if case == "no-data-for-a-task":
        rows = [r for r in rows if r["task"] != TASKS[1]]
    elif case == "one-example":
        rows = [r for r in rows if r["task"] != TASKS[1]] + [r for r in rows if r["task"] == TASKS[1]][:1]
    elif case == "data-free-method":
        method = "ties"
    elif case == "auto-option":
        extra = ["--drop"]
    elif case == "holdout-too-large":
        method, extra = "auto", ["--holdout", "0.9"]
    elif case == "budget-seconds-for-lorahub":
        method, extra = "lorahub", ["--budget", "30s"]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if case == "nan":
        text = text.replace('"answer": 1', '"answer": NaN', 1)
    (tmp_path / "dev.jsonl").write_text(text)
    out, trace = tmp_path / "out.safetensors", tmp_path / "t.jsonl"
    r = run_cli("merge", "-m", method, "--data", str(tmp_path / "dev.jsonl"), "--base", str(tiny_lm),
                *map(str, files[:2]), *extra, "-o", str(out))
    assert r.returncode in (1, 2) and _one_line(r), r.stderr.decode()
    assert not out.exists() and not trace.exists()
    want = {"no-data-for-a-task": b"matches no task in the data", "one-example": b"has 1 dev example",
            "nan": b"'answer' must be an index", "data-free-method": b"ties does not read data",
            "auto-option": b"regmean does not take --drop", "holdout-too-large": b"the search needs at least 2",
            "budget-seconds-for-lorahub": b"lorahub's budget counts candidates"}[case]
    assert want in r.stderr


def test_data_aware_merges_from_the_command_line_into_eval(pool, tiny_lm, tmp_path):
    """merge --data writes what it learned into the metadata, and pipes into eval like any merge."""
    from mergetool.blobs import read_blobs
    from mergetool.updates import from_blob

    d, files, _, _ = pool
    common = ["--data", str(d / "dev.jsonl"), "--base", str(tiny_lm), *map(str, files[:2])]
    r = run_cli("merge", "-m", "adamerging", "--steps", "2", "--granularity", "task", *common, "-o",
                str(tmp_path / "ada.safetensors"))
    assert r.returncode == 0, r.stderr.decode()
    meta = from_blob(read_blobs(str(tmp_path / "ada.safetensors"))[0], "ada").meta
    coef = meta["params"]["coefficients"]
    assert meta["method"] == "adamerging" and len(coef) == 3 * 2  # q, v, up of two layers
    assert all(len(set(c)) == 2 and c == next(iter(coef.values())) for c in coef.values())  # task-wise: one per task
    assert meta["data"]["tasks"] == {t: 8 for t in TASKS} and meta["data"]["steps"] == 2
    merged = run_cli("merge", "-m", "regmean", *common)
    assert merged.returncode == 0, merged.stderr.decode()
    ev = run_cli("eval", "--base", str(tiny_lm), "--adapter", "-", "--summary", str(d / "dev.jsonl"),
                 input=merged.stdout)
    assert ev.returncode == 0, ev.stderr.decode()
    rows = [json.loads(x) for x in ev.stdout.decode().splitlines()]
    assert {r["task"] for r in rows} == set(TASKS) and all(r["adapter"] == "regmean-merge" for r in rows)
