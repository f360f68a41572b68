"""score's statistics respect its plan: the existence test and the intervals calibrated by simulation on the
real plan (P = 104, M = 50, N = 5: 15 merges), the bootstrap's ranks checked against expanded samples, the
summary computed from records and printed from a file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from scipy import stats

from mergetool.score import plan
from mergetool.stats import (binomial_fit, crossed_bootstrap, existence_test, weighted_midranks,
                             weighted_spearman)

P, M, N = 104, 50, 5
RUNS = 200


def logistic(z):
    return 1 / (1 + np.exp(-z))


def trials_of(groups, role="counted"):
    """(update, merge) per trial of the plan, for the counted members or the control ones."""
    a = np.array([x for g in groups for x in getattr(g, role)])
    m = np.array([gi for gi, g in enumerate(groups) for _ in getattr(g, role)])
    return a, m


@pytest.fixture(scope="module")
def shared():
    groups = plan(P, M, N, seed=0, control=True)
    return groups, *trials_of(groups)


def test_the_real_plan_has_fifteen_merges(shared):
    groups, a, m = shared
    assert len(groups) == 15 and len(a) == P * N and np.bincount(a).tolist() == [N] * P


def test_existence_test_holds_its_level_under_merge_effects(shared):
    """Outcomes with merge effects (logit-normal, σ = 1.5) and no update effect, 200 runs on the real plan: the
    within-merge permutation test rejects at most ~6 % at α = 0.05; the binomial χ², which takes the 520
    outcomes as independent, rejects far more."""
    groups, a, m = shared
    rng = np.random.default_rng(11)
    beta = rng.normal(0, 1.5, (RUNS, len(groups)))
    y = (rng.random((RUNS, len(a))) < logistic(beta[:, m])).astype(float)
    res = existence_test(a, m, y, permutations=199, seed=1)
    assert res["within"] and res["merges"] == 15 and res["shared_merges"] == 15
    assert (res["p"] <= 0.05).sum() <= 0.06 * RUNS
    naive = sum(binomial_fit(np.bincount(a, weights=row) / N, N)["p_value"] <= 0.05 for row in y)
    assert naive > 0.1 * RUNS


def test_existence_test_finds_a_planted_update_effect(shared):
    groups, a, m = shared
    rng = np.random.default_rng(12)
    beta = rng.normal(0, 1.5, (RUNS, len(groups)))
    alpha = np.where(np.arange(P) % 2 == 0, 1.5, -1.5)
    y = (rng.random((RUNS, len(a))) < logistic(beta[:, m] + alpha[a])).astype(float)
    assert (existence_test(a, m, y, permutations=199, seed=2)["p"] <= 0.05).mean() >= 0.95


def test_existence_test_of_an_independent_plan_shuffles_everything():
    """--independent: one trial per merge, the merges independent draws; no update effect: the test holds its
    level, and finds a planted effect."""
    groups = plan(P, M, N, seed=0, independent=True)
    a, m = trials_of(groups)
    rng = np.random.default_rng(13)
    beta = rng.normal(0, 1.5, (RUNS, len(groups)))
    y = (rng.random((RUNS, len(a))) < logistic(beta[:, m])).astype(float)
    res = existence_test(a, m, y, permutations=199, seed=3)
    assert not res["within"] and (res["p"] <= 0.05).sum() <= 0.06 * RUNS
    alpha = np.where(np.arange(P) % 2 == 0, 1.5, -1.5)
    y = (rng.random((RUNS, len(a))) < logistic(beta[:, m] + alpha[a])).astype(float)
    assert (existence_test(a, m, y, permutations=199, seed=3)["p"] <= 0.05).mean() >= 0.95


def test_intervals_cover_the_mean_of_s(shared):
    """Update and merge effects (logit-normal, σ = 1 each) and a contribution (+1 on the logit when the update is
    in the merge): the 95 % pigeonhole interval of mean S covers the population mean in about 95 % of runs (at
    least 88 % of 150), of the control and the contribution too; the binomial interval that takes the outcomes
    as independent covers it in about half."""
    groups, a, m = shared
    ca, cm = trials_of(groups, "control")
    rng = np.random.default_rng(14)
    big_a, big_b = rng.normal(size=1_000_000), rng.normal(size=1_000_000)
    truth = {"score": logistic(big_a + big_b + 1).mean(), "control": logistic(big_a + big_b).mean()}
    truth["contribution"] = truth["score"] - truth["control"]
    runs, covered, naive = 150, dict.fromkeys(truth, 0), 0
    for r in range(runs):
        al, be = rng.normal(size=P), rng.normal(size=len(groups))
        ys = (rng.random(len(a)) < logistic(al[a] + be[m] + 1)).astype(float)
        yc = (rng.random(len(ca)) < logistic(al[ca] + be[cm])).astype(float)
        out = crossed_bootstrap(P, {"score": (a, m, ys), "control": (ca, cm, yc)}, {}, replicates=300, seed=r)
        for k, v in truth.items():
            lo, hi = out["means"][k]
            covered[k] += lo <= v <= hi
        se = np.sqrt(ys.mean() * (1 - ys.mean()) / len(ys))
        naive += abs(ys.mean() - truth["score"]) <= 1.96 * se
    assert all(c >= 0.88 * runs for c in covered.values()), covered
    assert naive <= 0.75 * runs


def test_weighted_ranks_are_the_ranks_of_the_expanded_sample():
    rng = np.random.default_rng(5)
    v = rng.integers(0, 4, (20, 9)).astype(float)
    w = rng.integers(0, 3, (20, 9))
    w[:, 0] = 1
    r = weighted_midranks(v, w)
    x, y = rng.normal(size=(20, 9)), rng.integers(0, 3, (20, 9)).astype(float)
    rho = weighted_spearman(x, y, w)
    for i in range(20):
        keep = np.repeat(np.arange(9), w[i])
        expanded = stats.rankdata(v[i][keep])
        for j in np.flatnonzero(w[i]):
            assert r[i, j] == expanded[np.flatnonzero(keep == j)[0]]
        want = stats.spearmanr(x[i][keep], y[i][keep]).statistic
        assert rho[i] == pytest.approx(want) or (np.isnan(rho[i]) and np.isnan(want))


def fake_records(groups, seed=0, effect=0.0):
    """Score records of the real plan with outcomes drawn from update and merge effects (and a field that tracks
    the update effect)."""
    rng = np.random.default_rng(seed)
    al, be = rng.normal(size=P) * effect, rng.normal(size=len(groups))
    recs = []
    for x in range(P):
        tr = [(g.trial, gi) for gi, g in enumerate(groups) if x in g.counted]
        ct = [(g.trial, gi) for gi, g in enumerate(groups) if x in g.control]
        pt = [float(rng.random() < logistic(al[x] + be[gi])) for _, gi in tr]
        pc = [float(rng.random() < logistic(be[gi] - 1)) for _, gi in ct]
        s, c = sum(pt) / len(pt), sum(pc) / len(pc)
        recs.append({"adapter": f"q{x}", "task": "t", "level": "example", "score": s, "trials": N,
                     "per_trial": pt, "trial_merges": [gi for _, gi in tr], "control": c, "control_trials": len(pc),
                     "control_per_trial": pc, "control_merges": [gi for _, gi in ct], "contribution": s - c,
                     "gap": float(-al[x] + rng.normal(scale=0.1)), "norm_f": float(rng.normal()), "run": "k"})
    return recs


def test_summary_from_records(shared):
    from mergetool.errors import MergetoolError
    from mergetool.score_summary import summarize

    groups = shared[0]
    s = summarize(fake_records(groups, effect=2.0))
    assert s["design"] and s["merges"] == 15 and s["existence"]["p"] == s["existence"]["floor"]
    assert set(s["means"]) == {"score", "control", "contribution"}
    for v in s["means"].values():
        assert v["ci"][0] <= v["mean"] <= v["ci"][1]
    gap = next(r for r in s["spearman"] if r["measure"] == "score" and r["field"] == "gap")
    assert gap["rho"] < -0.5 and gap["ci"][1] < 0 and gap["p"] == gap["floor"] and not gap["exact"]
    assert {r["measure"] for r in s["spearman"]} == {"score", "contribution"}
    assert [b["bin"] for b in s["bins"]] == sorted({f"{r['score']:.2f}" for r in fake_records(groups, effect=2.0)})
    old = [{k: v for k, v in r.items() if k != "trial_merges"} for r in fake_records(groups)]
    assert not summarize(old)["design"] and "existence" not in summarize(old)
    with pytest.raises(MergetoolError, match="2 runs"):
        summarize(fake_records(groups)[:3] + [{**fake_records(groups)[3], "run": "other"}])


def test_summary_of_committed_records_from_the_command_line(shared, tmp_path):
    """score --summary FILE: the tables on stderr, the figure, the summary as JSON on stdout; nothing to run."""
    recs = fake_records(shared[0], effect=2.0)
    f = tmp_path / "s.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    png = tmp_path / "s.png"
    r = run_cli("score", "--summary", str(f), "--plot", str(png), check=True)
    err = r.stderr.decode()
    assert "S, control and contribution" in err and "ρ(contribution)" in err and "permutation test" in err
    assert "p ≤ 0.0001" in err
    got = json.loads(r.stdout)
    assert got["n"] == P and got["means"]["contribution"]["ci"] and png.read_bytes()[:4] == b"\x89PNG"
    bad = run_cli("score", "--summary", str(f), "--data", str(f))
    assert bad.returncode == 2 and b"runs nothing" in bad.stderr


def test_summary_says_when_s_is_not_told_apart_from_the_control(shared, tmp_path):
    """S beside a control as high as itself (the testbed's pools at M = 50): the summary says that the contribution's
    interval covers 0 and what that means for S; beside a control of 0, it says nothing of the kind."""
    note = "the contribution's interval covers 0"
    for control_as_s, said in ((True, True), (False, False)):
        recs = fake_records(shared[0], effect=2.0)
        for r in recs:
            pc = list(r["per_trial"]) if control_as_s else [0.0] * r["control_trials"]
            r.update(control_per_trial=pc[:r["control_trials"]] + [0.0] * (r["control_trials"] - len(pc)),
                     control_merges=r["control_merges"])
            r["control"] = sum(r["control_per_trial"]) / r["control_trials"]
            r["contribution"] = r["score"] - r["control"]
        f = tmp_path / f"s{int(control_as_s)}.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
        err = run_cli("score", "--summary", str(f), check=True).stderr.decode()
        assert (note in " ".join(err.split())) == said, err[-2000:]
