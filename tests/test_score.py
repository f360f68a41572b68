"""mergetool score and weight: the trial plan, planted pools, resume after kill -9, bad inputs, weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import lora_blob, random_lora, run_cli, signal_at

from mergetool.score import Group, plan

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("independent", [False, True])
def test_every_adapter_gets_n_trials_with_uniform_partners(independent):
    """Each adapter is counted in exactly N trials (one per trial index), every merge has M+1 members, and
    over many trials each other adapter is a partner equally often (χ² test, fixed seed)."""
    from scipy import stats

    P, M, N = 13, 4, 600
    groups = plan(P, M, N, seed=7, independent=independent)
    seen = {a: [] for a in range(P)}
    together = [[0] * P for _ in range(P)]
    for g in groups:
        assert len(g.members) == M + 1 and len(set(g.members)) == M + 1
        for a in g.counted:
            seen[a].append(g.trial)
            for b in g.members:
                if b != a:
                    together[a][b] += 1
    assert all(sorted(t) == list(range(N)) for t in seen.values())
    expected = N * M / (P - 1)
    for a in range(P):
        counts = [together[a][b] for b in range(P) if b != a]
        assert sum(counts) == N * M
        assert stats.chisquare(counts, [expected] * (P - 1)).pvalue > 1e-3
    if not independent:  # about N·P/(M+1) merges instead of N·P
        assert len(groups) == N * math.ceil(P / (M + 1))


def test_shared_and_independent_plans_agree_in_expectation():
    """A planted pool: adapters 0-3 always survive, 4-7 never, 8-11 survive exactly when adapter 0 is among
    their partners (probability M/(P-1)). Both schemes estimate the same expected scores."""
    P, M, N = 12, 3, 400

    def scores(groups):
        total = [0.0] * P
        for g in groups:
            for a in g.counted:
                total[a] += 1.0 if a < 4 else 0.0 if a < 8 else float(0 in g.members)
        return [t / N for t in total]

    shared, indep = scores(plan(P, M, N, 1)), scores(plan(P, M, N, 2, independent=True))
    assert shared[:8] == indep[:8] == [1.0] * 4 + [0.0] * 4
    for a in range(8, 12):
        assert abs(shared[a] - M / (P - 1)) < 0.07 and abs(indep[a] - M / (P - 1)) < 0.07


@pytest.mark.parametrize("P,M", [(104, 50), (13, 4), (60, 50)])
def test_control_trials_are_merges_without_the_adapter(P, M):
    """With the control, each adapter's data is evaluated under one merge per trial that does not hold it (a
    group of the same partition, uniform among those), and the score's groups are those of the plan without it.
    Where every group of a partition holds an adapter (P < 2(M+1): it is a topped-up member), that trial has no
    control."""
    from scipy import stats

    N = 300 if P == 13 else 5
    with_control, without = plan(P, M, N, seed=4, control=True), plan(P, M, N, seed=4)
    assert [(g.members, g.counted, g.trial) for g in with_control] == [(g.members, g.counted, g.trial) for g in without]
    by_trial = {}
    for gi, g in enumerate(with_control):
        assert not set(g.control) & set(g.members) and len(set(g.control)) == len(g.control)
        for a in g.control:
            by_trial.setdefault((a, g.trial), []).append(gi)
    for a in range(P):
        for t in range(N):
            others = [gi for gi, g in enumerate(with_control) if g.trial == t and a not in g.members]
            assert len(by_trial.get((a, t), [])) == min(1, len(others))
    if P == 13:  # three groups per partition: where two do not hold the adapter, each is drawn half the time
        two = [[gi for gi, g in enumerate(with_control) if g.trial == t and 0 not in g.members] for t in range(N)]
        first = [by_trial[(0, t)][0] == c[0] for t, c in enumerate(two) if len(c) == 2]
        assert len(first) > 100 and stats.binomtest(sum(first), len(first), 0.5).pvalue > 1e-3


def test_independent_control_merges_the_partners_alone():
    groups = plan(10, 3, 4, seed=1, independent=True, control=True)
    assert [(g.members, g.counted, g.trial) for g in groups[::2]] == \
        [(g.members, g.counted, g.trial) for g in plan(10, 3, 4, seed=1, independent=True)]
    for trial, ctl in zip(groups[::2], groups[1::2]):
        assert ctl.members == trial.members[1:] and ctl.counted == [] and ctl.control == trial.counted
        assert ctl.trial == trial.trial


def test_partners_from_draws_only_from_that_set():
    groups = plan(10, 3, 5, seed=0, scored=[0, 1], partner_pool=[5, 6, 7, 8, 9])
    assert len(groups) == 10 and all(set(g.members[1:]) <= {5, 6, 7, 8, 9} and g.watched == g.members[1:]
                                     for g in groups)
    assert isinstance(groups[0], Group)


# ----------------------------------------------------------------------------- end to end on a tiny model


def capitals(n):
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == "country-capital"][:n]


def make_pool(tmp_path, n, gain=30.0, zero=False, rank=8):
    rows = capitals(n)
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = tmp_path / "pool"
    pool.mkdir(exist_ok=True)
    for i, r in enumerate(rows):
        u = random_lora(i, rank=rank, targets={"up_proj": (128, 64)}, layers=[1], name=r["id"])
        u.meta["training"] = {"example": r["id"]}
        for m in u.modules.values():
            m.B *= 0.0 if zero else gain
        (pool / f"{r['id']}.safetensors").write_bytes(lora_blob(u))
    return data, pool, rows


def records(text):
    return {r["adapter"]: r for r in map(json.loads, text.splitlines())}


def test_planted_pool_scores_are_the_base_correctness(tiny_lm, tmp_path):
    """Adapters that change nothing (B = 0): every merge is the base model, so an adapter whose question the
    base answers always survives (S = 1) and one it misses never does (S = 0), in both schemes."""
    data, pool, rows = make_pool(tmp_path, 10, zero=True)
    base = {r["id"]: r["correct"] for r in map(json.loads, run_cli("eval", "--base", str(tiny_lm), str(data),
                                                                      check=True).stdout.decode().splitlines())}
    for extra in ([], ["--independent"]):
        r = run_cli("score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "2", "--method", "mean",
                    "--off-target", "100", *extra, str(pool), check=True)
        got = records(r.stdout.decode())
        assert set(got) == set(base)
        missed = sum(1 for v in base.values() if v == 0)
        for a, rec in got.items():
            assert rec["score"] == base[a] and rec["per_trial"] == [base[a]] * 2
            assert rec["control"] == base[a] and rec["contribution"] == 0 and rec["control_trials"] == 2
            assert rec["off_target"] in (0, None) and rec["off_target_n"] == missed - (base[a] == 0)
            assert rec["trials"] == 2 and rec["partners"] == 3 and rec["method"] == "mean"
            assert rec["finetuned"] == base[a] and rec["base_accuracy"] == base[a]
            assert rec["delta_trained"] == pytest.approx(0, abs=1e-6) and rec["norm_f"] == 0
            assert {"p_correct", "p_max", "gap", "rank", "perplexity", "length", "sigma_max", "seed"} <= set(rec)


def by_hand(tiny_lm, tmp_path, pool, data, names, members) -> dict[str, int]:
    """Each question's correctness under the merge (KnOTS) of ``members``, by merge and eval."""
    merged = tmp_path / "m.safetensors"
    run_cli("merge", "-m", "knots", *[str(pool / f"{names[i]}.safetensors") for i in members], "-o", str(merged),
            check=True)
    return {x["id"]: x["correct"] for x in map(json.loads, run_cli(
        "eval", "--base", str(tiny_lm), "--adapter", str(merged), str(data), check=True).stdout.decode().splitlines())}


def test_shared_trials_and_controls_equal_merging_each_group_by_hand(tiny_lm, tmp_path):
    """Each per_trial value is the adapter's correctness under the merge of its trial's group, and each control
    value its correctness under the merge its control trial names (a group without it), as merge + eval compute
    them one by one (KnOTS); contribution = score − control exactly; off_target is, over the other questions the
    base misses, the share each adapter answers alone (eval of the adapters alone)."""
    from mergetool.inputs import load_inputs

    data, pool, rows = make_pool(tmp_path, 8)
    r = run_cli("score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "2", "--seed", "3",
                "--off-target", "100", str(pool), check=True)  # every other question (K above the pool)
    got = records(r.stdout.decode())
    names = sorted(u.name for u in load_inputs([str(pool)]))
    groups = plan(len(names), 3, 2, seed=3, control=True)
    for gi, g in enumerate(groups[:3]):
        ev = by_hand(tiny_lm, tmp_path, pool, data, names, g.members)
        for a in g.counted:
            assert got[names[a]]["per_trial"][g.trial] == ev[names[a]]
            assert got[names[a]]["trial_merges"][g.trial] == gi
        for a in g.control:
            rec = got[names[a]]
            assert rec["control_per_trial"][rec["control_merges"].index(gi)] == ev[names[a]]
    for rec in got.values():
        assert rec["contribution"] == rec["score"] - rec["control"]
        assert rec["control"] == sum(rec["control_per_trial"]) / rec["control_trials"]
    flags = [x for n in names for x in ("--adapter", str(pool / f"{n}.safetensors"))]
    alone = {(x["adapter"], x["id"]): x["correct"] for x in map(json.loads, run_cli(
        "eval", "--base", str(tiny_lm), *flags, str(data), check=True).stdout.decode().splitlines())}
    base = {x["id"]: x["correct"] for x in map(json.loads, run_cli(
        "eval", "--base", str(tiny_lm), str(data), check=True).stdout.decode().splitlines())}
    for n in names:
        others = [alone[(n, q)] for q in names if q != n and base[q] == 0]
        assert got[n]["off_target_n"] == len(others)
        assert got[n]["off_target"] == (sum(others) / len(others) if others else None)


def test_independent_control_merges_the_partners_alone_by_hand(tiny_lm, tmp_path):
    """--independent: the control of a trial is the merge of that trial's partners without the adapter."""
    from mergetool.inputs import load_inputs

    data, pool, rows = make_pool(tmp_path, 6)
    r = run_cli("score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "2", "--seed", "1",
                "--independent", str(pool), check=True)
    got = records(r.stdout.decode())
    names = sorted(u.name for u in load_inputs([str(pool)]))
    groups = plan(len(names), 2, 2, seed=1, independent=True, control=True)
    for gi in (1, 3):
        g = groups[gi]
        (a,) = g.control
        assert g.members == groups[gi - 1].members[1:]
        ev = by_hand(tiny_lm, tmp_path, pool, data, names, g.members)
        assert got[names[a]]["control_per_trial"][g.trial] == ev[names[a]]
        assert got[names[a]]["control_merges"][g.trial] == gi


def test_no_control_gives_the_same_scores(tiny_lm, tmp_path):
    """The control adds fields, not changes: --no-control gives the same per-trial values from the same merges
    (the paper's S alone, at half the evaluations), with the control's fields null."""
    data, pool, rows = make_pool(tmp_path, 10)
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "3", "--seed", "2", str(pool)]
    with_it = records(run_cli(*args, check=True).stdout.decode())
    without = records(run_cli(*args, "--no-control", check=True).stdout.decode())
    for a, rec in without.items():
        for k in ("score", "per_trial", "trial_merges", "finetuned", "gap", "norm_f"):
            assert rec[k] == with_it[a][k], k
        assert rec["control"] is rec["contribution"] is rec["off_target"] is None
        assert rec["control_trials"] == rec["off_target_n"] == 0 and rec["run"] != with_it[a]["run"]
        assert with_it[a]["control_trials"] == 3


def test_resume_after_kill_gives_the_uninterrupted_records(tiny_lm, tmp_path):
    data, pool, rows = make_pool(tmp_path, 40)
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "4", "--merge-chunk", "1",
            str(pool)]
    whole = records(run_cli(*args, check=True).stdout.decode())
    out = tmp_path / "s.jsonl"
    side = tmp_path / "s.jsonl.trials"
    # kill -9 as the 7th finished group is counted (its line written, its records not): an event, not a moment,
    # so the run is cut at the same place however busy the machine is
    killed = signal_at("mergetool.score_run:Collector.add#7", signal.SIGKILL, *args, "-o", str(out))
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    done_before = sum(1 for x in side.read_text().splitlines() if '"group"' in x)
    assert done_before == 7
    with side.open("a") as f:
        f.write('{"kind": "group", "gro')  # a line cut by the kill
    r = run_cli(*args, "-o", str(out), "--resume", check=True)
    assert f"({done_before} done before)" in r.stderr.decode()
    again = records(out.read_text())
    assert not side.exists() and set(again) == set(whole)
    for a, rec in whole.items():
        for k in ("per_trial", "score", "trial_merges", "control", "control_per_trial", "control_merges",
                  "contribution", "off_target", "off_target_n"):
            assert again[a][k] == rec[k], k
        assert rec["control_trials"] == 4
        for k in ("p_correct", "gap", "delta_trained", "perplexity", "norm_f"):
            assert again[a][k] == pytest.approx(rec[k], rel=1e-4, abs=1e-6)


def test_resume_refuses_another_plan(tiny_lm, tmp_path):
    data, pool, _ = make_pool(tmp_path, 6)
    out = tmp_path / "s.jsonl"
    side = tmp_path / "s.jsonl.trials"
    side.write_text('{"kind": "plan", "key": "0000"}\n')
    r = run_cli("score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "2", str(pool),
                "-o", str(out), "--resume")
    assert r.returncode == 1 and b"another" in r.stderr and b"Traceback" not in r.stderr


def test_resume_refuses_a_retrained_adapter_and_files_score_did_not_write(tiny_lm, tmp_path):
    """An adapter retrained under the same name changes the plan (its content is in the key); progress and records
    files that are not score's are refused in one line, and left as they were."""
    data, pool, rows = make_pool(tmp_path, 6)
    out = tmp_path / "s.jsonl"
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "2", "-o", str(out)]
    run_cli(*args, str(pool), check=True)
    u = random_lora(99, rank=8, targets={"up_proj": (128, 64)}, layers=[1], name=rows[0]["id"])
    (pool / f"{rows[0]['id']}.safetensors").write_bytes(lora_blob(u))  # the same name, other weights
    before = out.read_text()
    r = run_cli(*args, str(pool), "--resume")
    assert r.returncode == 1 and b"other adapters, data or options" in r.stderr and out.read_text() == before
    for side_text, out_text in (("not json\n", ""), ('{"kind": "plan", "key": 1}\n[1]\n', ""),
                                (None, '{"score": 1}\n'), (None, "garbage\n{\"adapter\": \"x\"")):
        side = tmp_path / "s.jsonl.trials"
        side.unlink(missing_ok=True)
        if side_text is not None:
            side.write_text(side_text)
        out.write_text(out_text)
        r = run_cli(*args, str(pool), "--resume")
        err = r.stderr.decode().strip().splitlines()
        assert r.returncode == 1 and len(err) == 1 and "internal" not in err[0], err
        assert out.read_text() == out_text and (side_text is None or side.read_text() == side_text)


def test_records_to_stdout_with_a_dash(tiny_lm, tmp_path):
    data, pool, _ = make_pool(tmp_path, 4)
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "1", str(pool)]
    r = run_cli(*args, "-o", "-", cwd=tmp_path, check=True)
    assert len(r.stdout.splitlines()) == 4 and not (tmp_path / "-").exists()
    r = run_cli(*args, "-o", "-", "--resume")
    assert r.returncode == 2 and b"not stdout" in r.stderr


def test_resume_of_a_finished_run_has_nothing_to_do(tiny_lm, tmp_path):
    """A finished run removes its .trials file and its records carry the plan's key: resuming it is done at once
    (exit 0, the records untouched, no model loaded), and resuming it with other options is refused."""
    data, pool, _ = make_pool(tmp_path, 6)
    out = tmp_path / "s.jsonl"
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "2", str(pool), "-o", str(out)]
    run_cli(*args, check=True)
    before = out.read_text()
    assert all(json.loads(x)["run"] for x in before.splitlines())
    r = run_cli(*args, "--resume")
    assert r.returncode == 0 and b"nothing to do" in r.stderr and out.read_text() == before, r.stderr
    r = run_cli(*args[:-2], "--seed", "5", "-o", str(out), "--resume")
    assert r.returncode == 1 and b"other adapters, data or options" in r.stderr
    assert out.read_text() == before


@pytest.mark.parametrize("args,code,needle", [
    (["@pool"], 2, "--data"),
    (["--data", "@data"], 2, "no adapters"),
    (["--data", "@data", "--level", "sentence", "@pool"], 2, "unknown level"),
    (["--data", "@data", "--resume", "@pool", "@stdout"], 2, "needs -o"),
    (["--data", "@data", "-M", "0", "@pool"], 2, "at least 1"),
    (["--data", "@data", "-M", "9", "@pool"], 1, "need 10 adapters"),
    (["--data", "@data", "--method", "slerp", "@pool"], 2, "at most 2"),
    (["--data", "@data", "--method", "nope", "@pool"], 2, "unknown method"),
    (["--data", "@data", "--density", "nan", "@pool"], 2, "finite"),
    (["--data", "@data", "--plot", "x.pdf", "@pool"], 2, ".png"),
    (["--data", "@other", "@pool"], 1, "matches no example id"),
    (["--data", "@data", "--level", "task", "@pool"], 1, "matches no task"),
])
def test_bad_inputs(args, code, needle, tiny_lm, tmp_path, capsys):
    """Each bad input: one line, its exit code, no output (run in-process: these fail before any model loads)."""
    from mergetool.cli.main import run

    data, pool, rows = make_pool(tmp_path, 6)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "id": r["id"] + "-x"}) + "\n" for r in rows))
    subst = {"@pool": str(pool), "@data": str(data), "@other": str(other)}
    out = tmp_path / "s.jsonl"
    to = [] if "@stdout" in args else ["-o", str(out)]
    rc = run(["score", "--base", str(tiny_lm), *[subst.get(a, a) for a in args if a != "@stdout"], *to])
    got = capsys.readouterr()
    assert rc == code and needle in got.err and "Traceback" not in got.err, got.err
    assert len(got.err.strip().splitlines()) == 1 and not out.exists() and not got.out


def test_summary_and_plot(tiny_lm, tmp_path):
    data, pool, _ = make_pool(tmp_path, 12)
    png = tmp_path / "s.png"
    r = run_cli("score", "--base", str(tiny_lm), "--data", str(data), "-M", "3", "-N", "3", str(pool),
                "--plot", str(png), check=True)
    err = r.stderr.decode()
    assert "Binomial(N=3" in err and "Spearman" in err and "gap" in err
    assert png.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- statistics


def test_binomial_fit_and_correlations():
    from scipy import stats

    from mergetool.stats import binomial_fit, binned, correlate

    bimodal = [0.0] * 40 + [1.0] * 40  # mergeability is a trait: far from any binomial
    fit = binomial_fit(bimodal, 5)
    assert fit["p"] == 0.5 and fit["observed"] == [40, 0, 0, 0, 0, 40]
    assert fit["p_value"] < 1e-10 and fit["dispersion"] > 4
    assert fit["expected"] == pytest.approx([80 * stats.binom.pmf(k, 5, 0.5) for k in range(6)])
    c = correlate([1, 2, 3, 4, 5], [2, 4, 5, 4, 6])
    assert c["spearman"] == pytest.approx(stats.spearmanr([1, 2, 3, 4, 5], [2, 4, 5, 4, 6]).statistic)
    assert correlate([1, 1, 1], [1, 2, 3])["spearman"] is None
    rows = binned([{"score": s, "x": s * 2} for s in (0.0, 0.0, 0.4, 1.0)], "score", ["x"], 5)
    assert [r["bin"] for r in rows] == ["0.00", "0.40", "1.00"] and rows[0]["n"] == 2 and rows[0]["x_mean"] == 0


# ----------------------------------------------------------------------------- weight


def test_weight_from_base_accuracy_by_hand(tmp_path):
    acc = tmp_path / "acc.jsonl"
    acc.write_text('{"task": "a", "adapter": null, "n": 10, "accuracy": 0.9}\n'
                   '{"task": "b", "adapter": null, "n": 10, "accuracy": 0.3}\n'
                   '{"task": "c", "adapter": null, "n": 10, "accuracy": 0.5}\n')
    got = [json.loads(x) for x in run_cli("weight", "--records", str(acc), "--tau", "0.5", check=True).stdout.splitlines()]
    s = [0.1 / 0.5, 0.7 / 0.5, 0.5 / 0.5]
    z = sum(math.exp(x) for x in s)
    assert [g["adapter"] for g in got] == ["a", "b", "c"]
    assert [g["weight"] for g in got] == pytest.approx([math.exp(x) / z for x in s])
    mx = [json.loads(x)["weight"] for x in run_cli("weight", "--records", str(acc), "--tau", "0.5", "--normalize",
                                                  "max", check=True).stdout.splitlines()]
    assert mx == pytest.approx([math.exp(x - max(s)) for x in s])


def test_weight_by_score_and_per_example_records(tmp_path):
    sc = tmp_path / "s.jsonl"
    sc.write_text('{"adapter": "x", "score": 1.0}\n{"adapter": "y", "score": 0.0}\n')
    got = [json.loads(x) for x in run_cli("weight", "--by", "score", "--records", str(sc), "--tau", "1",
                                          check=True).stdout.splitlines()]
    assert got[1]["weight"] == pytest.approx(math.e / (1 + math.e))  # the less mergeable weighs more
    recs = tmp_path / "r.jsonl"
    recs.write_text("".join(json.dumps({"id": str(i), "task": "t", "adapter": None, "correct": int(i < 3)}) + "\n"
                            for i in range(4)))
    w = json.loads(run_cli("weight", "--records", str(recs), check=True).stdout)
    assert w == {"adapter": "t", "weight": 1.0}


def test_weight_pipes_into_merge(tmp_path):
    """mergetool weight ... experts/ | mergetool merge -m linear --weights - experts/"""
    pool = tmp_path / "experts"
    pool.mkdir()
    us = [random_lora(i, name=f"e{i}", task=f"t{i}") for i in range(3)]
    for u in us:
        (pool / f"{u.name}.safetensors").write_bytes(lora_blob(u))
    acc = tmp_path / "acc.jsonl"
    acc.write_text("".join(json.dumps({"task": f"t{i}", "adapter": None, "n": 5, "accuracy": a}) + "\n"
                           for i, a in enumerate([0.2, 0.9, 0.6])))
    cmd = (f"{sys.executable} -m mergetool weight --records {acc} --tau 0.5 {pool} | "
           f"{sys.executable} -m mergetool merge -m linear --weights - {pool} -o {tmp_path / 'm.safetensors'}")
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True)
    assert p.returncode == 0, p.stderr
    from mergetool.blobs import read_blobs
    from mergetool.updates import from_blob

    m = from_blob(read_blobs(str(tmp_path / "m.safetensors"))[0], "m")
    w = torch.softmax(torch.tensor([0.8, 0.1, 0.4]) / 0.5, 0)
    for k, mm in m.modules.items():
        want = sum(float(w[i]) * us[i].modules[k].delta() for i in range(3))
        assert torch.allclose(mm.delta(), want, atol=1e-6)


@pytest.mark.parametrize("args,stdin,needle", [
    (["--tau", "0"], b"", "positive finite"),
    (["--tau", "nan"], b"", "positive finite"),
    (["--by", "votes"], b"", "unknown basis"),
    (["--normalize", "l2"], b"", "unknown normalisation"),
    ([], b'{"task": "t", "adapter": "x", "accuracy": 0.5}\n', "no base-model rows"),
    ([], b'{"task": "t", "adapter": null, "accuracy": 1.5}\n', "outside [0, 1]"),
    ([], b'{"task": "t", "adapter": null, "accuracy": NaN}\n', "finite"),
    (["--by", "score"], b'{"adapter": "x", "score": 0.5}\n{"adapter": "x", "score": 0.1}\n', "second score"),
])
def test_weight_bad_inputs(args, stdin, needle, tmp_path, capsys):
    from mergetool.cli.main import run

    src = tmp_path / "in.jsonl"
    src.write_bytes(stdin or b"{}\n")
    rc = run(["weight", *args, "--records", str(src)])
    got = capsys.readouterr()
    assert rc in (1, 2) and needle in got.err and "Traceback" not in got.err and not got.out, got.err


# ----------------------------------------------------------------------------- hardening (issue 22)


def test_outputs_on_inputs_are_refused_before_anything_is_written(tiny_lm, tmp_path):
    """-o inside the pool directory or the base model's directory, and an input named like the progress file
    (-o X with an input X.trials), are refused before any work: the inputs stay as they were."""
    data, pool, rows = make_pool(tmp_path, 4)
    victim = pool / f"{rows[0]['id']}.safetensors"
    before, weights = victim.read_bytes(), (tiny_lm / "model.safetensors").read_bytes()
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "1", str(pool)]
    for out in (victim, pool / "new.jsonl", tiny_lm / "model.safetensors"):
        r = run_cli(*args, "-o", str(out))
        assert r.returncode == 2 and b"inside the input directory" in r.stderr, r.stderr
    assert victim.read_bytes() == before and (tiny_lm / "model.safetensors").read_bytes() == weights
    assert not (pool / "new.jsonl").exists()
    side_named = tmp_path / "q.jsonl.trials"
    side_named.write_bytes(data.read_bytes())
    r = run_cli("score", "--base", str(tiny_lm), "--data", str(side_named), "-M", "2", "-N", "1", str(pool),
                "-o", str(tmp_path / "q.jsonl"))
    assert r.returncode == 2 and b"is the input" in r.stderr and side_named.read_bytes() == data.read_bytes()
    alien = tmp_path / "s.jsonl.trials"
    alien.write_text("my notes\n")
    r = run_cli(*args, "-o", str(tmp_path / "s.jsonl"))
    assert r.returncode == 1 and b"not a score progress file" in r.stderr and alien.read_text() == "my notes\n"


def test_a_failed_rerun_leaves_the_earlier_records_and_names_the_merge(tiny_lm, tmp_path):
    """A complete -o file survives a rerun (without --resume) that fails midway: the new records replace it
    only when the new run completes. The failure, a merge that overflows to Inf, names the adapters of the
    group, not a module."""
    data, pool, rows = make_pool(tmp_path, 6)
    out = tmp_path / "s.jsonl"
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "2", "--method", "mean",
            str(pool), "-o", str(out)]
    run_cli(*args, check=True)
    before = out.read_text()
    r = run_cli(*args, "--lambda", "1e39")
    err = [x for x in r.stderr.decode().splitlines() if "error:" in x]
    assert r.returncode == 1 and len(err) == 1 and "Traceback" not in r.stderr.decode(), r.stderr
    what = err[0].split("error: ", 1)[1].split(": ")[0]  # mergetool score: error: WHAT: WHY; FIX
    assert what.startswith("the merge of ") and "NaN or Inf" in err[0] and "base_model.model" not in what, err
    assert sum(x["id"] in what for x in rows) == 3  # the group's three adapters, by name
    assert out.read_text() == before
    again = run_cli(*args, "--seed", "7", check=True)  # a good rerun does replace them
    assert out.read_text() != before and not (tmp_path / "s.jsonl.trials").exists(), again.stderr


def test_resume_key_holds_the_data_content_and_the_dtype(tiny_lm, tmp_path):
    """--resume of an interrupted run refuses data whose ids are the same but whose contents differ, and another
    --dtype: both change the numbers."""
    data, pool, rows = make_pool(tmp_path, 6)
    out = tmp_path / "s.jsonl"
    side = tmp_path / "s.jsonl.trials"
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "2", "-N", "2", str(pool), "-o", str(out)]
    run_cli(*args, check=True)
    lines = out.read_text().splitlines()
    key = json.loads(lines[0])["run"]
    out.write_text(lines[0] + "\n")  # as if interrupted after one record, its progress beside it
    side.write_text(json.dumps({"kind": "plan", "key": key}) + "\n")
    edited = [dict(r, choices=list(reversed(r["choices"])), answer=len(r["choices"]) - 1 - r["answer"]) for r in rows]
    other = tmp_path / "q2.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in edited))
    for extra in (["--data", str(other)], ["--dtype", "bfloat16"]):
        cmd = list(args)
        if extra[0] == "--data":
            cmd[cmd.index("--data") + 1] = extra[1]
        else:
            cmd += extra
        r = run_cli(*cmd, "--resume")
        assert r.returncode == 1 and b"other adapters, data or options" in r.stderr, r.stderr
    r = run_cli(*args, "--resume", check=True)
    assert len(out.read_text().splitlines()) == 6


def test_partners_named_like_the_pool_are_refused_unless_the_same(tiny_lm, tmp_path):
    data, pool, rows = make_pool(tmp_path, 6)
    partners = tmp_path / "partners"
    partners.mkdir()
    same = pool / f"{rows[1]['id']}.safetensors"
    (partners / same.name).write_bytes(same.read_bytes())  # the same adapter: drawn as itself
    u = random_lora(77, rank=8, targets={"up_proj": (128, 64)}, layers=[1], name=rows[2]["id"])
    (partners / "impostor.safetensors").write_bytes(lora_blob(u))  # a pool adapter's name, other weights
    scored = tmp_path / "scored"
    scored.mkdir()
    for r in rows[:3]:
        (scored / f"{r['id']}.safetensors").write_bytes((pool / f"{r['id']}.safetensors").read_bytes())
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "1", "-N", "1", str(scored)]
    r = run_cli(*args, "--partners-from", str(partners))
    assert r.returncode == 1 and b"other contents" in r.stderr and rows[2]["id"].encode() in r.stderr, r.stderr
    (partners / "impostor.safetensors").unlink()
    for r_ in rows[3:]:
        (partners / f"{r_['id']}.safetensors").write_bytes((pool / f"{r_['id']}.safetensors").read_bytes())
    got = records(run_cli(*args, "--partners-from", str(partners), check=True).stdout.decode())
    assert set(got) == {r["id"] for r in rows[:3]} and all(g["control_trials"] == 1 for g in got.values())


def test_task_level_with_two_adapters_of_one_task(tiny_lm, tmp_path):
    """Two adapters of one task in one merge group (and as each other's control) once gave 'internal: TypeError':
    each is scored on its task's examples, evaluated once per merge. Adapters that change nothing score the base's
    accuracy, and their control is the same."""
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    tasks = sorted({r["task"] for r in rows})[:2]
    mine = [r for t in tasks for r in [x for x in rows if x["task"] == t][:5]]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in mine))
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, t in enumerate([tasks[0], tasks[0], tasks[1], tasks[1]]):
        u = random_lora(i, rank=4, targets={"up_proj": (128, 64)}, layers=[1], name=f"e{i}", task=t)
        for m in u.modules.values():
            m.B *= 0.0
        (pool / f"e{i}.safetensors").write_bytes(lora_blob(u))
    base = {x["task"]: x["accuracy"] for x in map(json.loads, run_cli(
        "eval", "--base", str(tiny_lm), "--summary", str(data), check=True).stdout.decode().splitlines())}
    r = run_cli("score", "--base", str(tiny_lm), "--data", str(data), "--level", "task", "-M", "1", "-N", "3",
                str(pool), check=True)
    got = records(r.stdout.decode())
    assert len(got) == 4
    for rec in got.values():
        assert rec["score"] == pytest.approx(base[rec["task"]]) and rec["control"] == pytest.approx(base[rec["task"]])
        assert rec["off_target"] == pytest.approx(0) and rec["off_target_n"] == 1


def test_device_and_fifo_outputs_keep_no_progress(tiny_lm, tmp_path):
    """-o /proc/self/fd/1 writes the records through to stdout; a device or FIFO keeps no progress file and
    --resume into one is refused."""
    data, pool, _ = make_pool(tmp_path, 4)
    args = ["score", "--base", str(tiny_lm), "--data", str(data), "-M", "1", "-N", "1", str(pool)]
    r = run_cli(*args, "-o", "/proc/self/fd/1", check=True)
    assert len(r.stdout.splitlines()) == 4
    r = run_cli(*args, "-o", "/dev/null", "--resume")
    assert r.returncode == 2 and b"device or a FIFO" in r.stderr and not Path("/dev/null.trials").exists()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    p = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        run_cli(*args, "-o", str(fifo), check=True)
        got = p.communicate()[0]  # cat ends when the writer closes the FIFO: no clock needed
    finally:
        p.kill()
    assert len(got.splitlines()) == 4
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pipe", "pool", "q.jsonl"]


def test_plot_checked_before_the_run(tiny_lm, tmp_path, capsys):
    from mergetool.cli.main import run

    data, pool, _ = make_pool(tmp_path, 4)
    for plot in (str(tmp_path / "missing" / "s.png"), str(tmp_path)):
        rc = run(["score", "--base", str(tiny_lm), "--data", str(data), "-M", "1", "-N", "1", str(pool),
                  "--plot", plot, "-o", str(tmp_path / "s.jsonl")])
        err = capsys.readouterr().err
        assert rc == 2 and "--plot" in err and not (tmp_path / "s.jsonl").exists(), err


def test_a_run_stopped_before_any_result_leaves_no_files(tmp_path):
    """score's progress sink: a run that fails before its first result (the refusal of a model whose forward
    changes its weights comes from the Ray workers, which load the model only when the run starts) leaves neither
    its progress file nor an empty output; once a group's results are logged, the progress stays and resumes."""
    from mergetool.score_run import Progress

    out = tmp_path / "s.jsonl"
    p = Progress(str(out), "key", resume=False)
    with pytest.raises(RuntimeError), p.sink():
        raise RuntimeError("refused on the workers")
    assert list(tmp_path.iterdir()) == []
    p = Progress(str(out), "key", resume=False)
    with pytest.raises(KeyboardInterrupt), p.sink():
        p.log({"kind": "group", "group": 0, "results": {"0": 1.0}})
        raise KeyboardInterrupt
    assert (tmp_path / "s.jsonl.trials").exists()
    assert Progress(str(out), "key", resume=True).groups == {0: {0: 1.0}}
