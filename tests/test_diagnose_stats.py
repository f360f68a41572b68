"""diagnose's statistics against known truth: the task bootstrap's coverage on dyadic data with task effects, the
permutation ANOVAs' level under group- and merge-level effects (and their power), the two-way F against a full
least-squares fit, the smallest ball against an exact solver, the predictor's baselines, the comparison of fits
and Theorem 1 against merges, each on data whose answer is known."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from scipy import stats

from mergetool.diagnose import analysis, compare, forecast, predict, resample
from mergetool.diagnose.core import Records
from mergetool.diagnose.representation import meb


def test_weighted_correlations_equal_scipy_on_the_replicated_data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.normal(size=40)
    x[5] = x[6] = x[7]  # ties
    W = rng.integers(0, 4, size=(5, 40))
    got_p = resample.weighted_corrs(x, y, W, "pearson")
    got_s = resample.weighted_corrs(x, y, W, "spearman")
    for b in range(5):
        xr, yr = np.repeat(x, W[b]), np.repeat(y, W[b])
        assert got_p[b] == pytest.approx(stats.pearsonr(xr, yr)[0], abs=1e-12)
        assert got_s[b] == pytest.approx(stats.spearmanr(xr, yr)[0], abs=1e-12)
    assert resample.weighted_corr(np.ones(5), np.arange(5.0), np.ones(5, int), "pearson") is None


def test_task_bootstrap_weights_count_the_ways_a_unit_can_be_formed():
    w = resample.task_weights([["a", "b"], ["a", "c"], ["c"]], 500, 1)
    counts = resample.task_weights([["a"], ["b"], ["c"]], 500, 1)  # the same draws: one unit per task
    assert (w[:, 0] == counts[:, 0] * counts[:, 1]).all() and (w[:, 2] == counts[:, 2]).all()
    assert (counts.sum(1) == 3).all()


def _dyadic(T: int, rng) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """All pairs of T tasks: x_ab = v_a + v_b + e_ab, y_ab = x_ab + u_a + u_b + n_ab (unit variances), so pairs
    that share a task are correlated; the population correlation is √(3/6)."""
    v, u = rng.normal(size=T), rng.normal(size=T)
    pairs = list(itertools.combinations(range(T), 2))
    x = np.array([v[a] + v[b] for a, b in pairs]) + rng.normal(size=len(pairs))
    y = x + np.array([u[a] + u[b] for a, b in pairs]) + rng.normal(size=len(pairs))
    return [[str(a), str(b)] for a, b in pairs], x, y


def test_the_task_bootstrap_covers_the_population_correlation_where_the_pair_bootstrap_does_not():
    truth = math.sqrt(0.5)
    rng = np.random.default_rng(3)
    cover_task = cover_pair = 0
    sims = 150
    for s in range(sims):
        tasks, x, y = _dyadic(12, rng)
        es = [(i, x[i], y[i]) for i in range(len(x))]
        by_task = resample.correlation_intervals(es, resample.task_weights(tasks, 400, s))
        by_pair = resample.correlation_intervals(es, resample.unit_weights(len(x), 400, s))
        cover_task += by_task["pearson_ci"][0] <= truth <= by_task["pearson_ci"][1]
        cover_pair += by_pair["pearson_ci"][0] <= truth <= by_pair["pearson_ci"][1]
    assert cover_task / sims >= 0.85, cover_task / sims
    assert cover_pair / sims < cover_task / sims - 0.1, (cover_pair / sims, cover_task / sims)


def _losses(rng, groups: int, method_effect: float, task_effect: float = 0.0) -> list[dict]:
    """Merged groups of 3-5 of 8 tasks under 4 methods, with a group effect, a merge (group × method) effect
    shared by the merge's members, member noise, and the planted method and task effects."""
    tasks = [f"t{i}" for i in range(8)]
    methods = ["mean", "ties", "dare", "knots"]
    out = []
    for g in range(groups):
        members = rng.choice(tasks, size=int(rng.integers(3, 6)), replace=False).tolist()
        ge = rng.normal() * 10
        for mi, m in enumerate(methods):
            me = rng.normal() * 8
            for t in members:
                out.append({"group": f"g{g}", "adapters": members, "adapter": t, "task": t, "method": m,
                            "loss": ge + me + method_effect * mi + task_effect * int(t[1:]) + rng.normal() * 2})
    return out


def test_the_permutation_anovas_hold_their_level_under_shared_effects_and_find_planted_ones():
    rng = np.random.default_rng(7)
    rejects = {"perm": 0, "F": 0, "task": 0}
    sims = 200
    for s in range(sims):
        cells = _losses(rng, 10, 0.0)
        d = analysis._Design(cells)
        F, df, dof = d.given(d.codes["method"], d.codes["task"])
        p = resample.permutation_p(lambda c: d.given(c, d.codes["task"])[0], F,
                                   lambda r: d.permuted("method", r), 99, s)
        rejects["perm"] += p <= 0.05
        rejects["F"] += stats.f.sf(F, df, dof) <= 0.05
        Ft = d.given(d.codes["task"], d.codes["method"])[0]
        pt = resample.permutation_p(lambda c: d.given(c, d.codes["method"])[0], Ft,
                                    lambda r: d.permuted("task", r), 99, s)
        rejects["task"] += pt <= 0.05
    assert rejects["perm"] / sims <= 0.08 and rejects["task"] / sims <= 0.08, rejects
    assert rejects["F"] / sims > 0.2, rejects  # the F-test, blind to the shared merge effects, rejects far too often
    power = 0
    for s in range(30):
        out = {(r["test"], r.get("factor")): r for r in analysis.anovas(_losses(rng, 10, 10.0, 4.0), s, 99)}
        power += out[("anova2", None)]["method"]["p_permutation"] <= 0.05 and \
            out[("anova2", None)]["task"]["p_permutation"] <= 0.05
    assert power >= 27, power


def test_two_way_F_equals_a_full_least_squares_fit():
    rng = np.random.default_rng(2)
    cells = _losses(rng, 6, 2.0, 1.0)
    d = analysis._Design(cells)
    y = d.y
    A, B = d.codes["method"], d.codes["task"]

    def rss(cols):
        X = np.stack([np.ones(len(y))] + cols, 1)
        beta = np.linalg.lstsq(X, y, rcond=None)[0]
        return float(((y - X @ beta) ** 2).sum()), np.linalg.matrix_rank(X)

    da = [(A == k).astype(float) for k in range(1, A.max() + 1)]
    db = [(B == k).astype(float) for k in range(1, B.max() + 1)]
    full, rank = rss(da + db)
    red, _ = rss(db)
    want = ((red - full) / len(da)) / (full / (len(y) - rank))
    F, df, dof = d.given(A, B)
    assert F == pytest.approx(want, rel=1e-9) and df == len(da) and dof == len(y) - rank


def _exact_meb(D: np.ndarray) -> float:
    """max ½αᵀDα over the simplex by enumerating supports: on a support S the optimum solves D_S α = c·1,
    Σα = 1 (KKT), feasible when α ≥ 0 and (Dα)_j ≤ c off S."""
    n = len(D)
    best = 0.0
    for k in range(1, n + 1):
        for S in itertools.combinations(range(n), k):
            M = np.zeros((k + 1, k + 1))
            M[:k, :k] = D[np.ix_(S, S)]
            M[:k, k] = -1
            M[k, :k] = 1
            rhs = np.zeros(k + 1)
            rhs[k] = 1
            try:
                sol = np.linalg.solve(M, rhs)
            except np.linalg.LinAlgError:
                continue
            a = np.zeros(n)
            a[list(S)] = sol[:k]
            if (a >= -1e-12).all() and (D @ a <= sol[k] + 1e-9).all():
                best = max(best, 0.5 * a @ D @ a)
    return best


@pytest.mark.parametrize("n,dim", [(3, 2), (5, 3), (6, 10), (8, 4)])
def test_the_smallest_ball_equals_an_exact_solver(n, dim):
    g = torch.Generator().manual_seed(n * 10 + dim)
    X = torch.randn(n, dim, generator=g, dtype=torch.float64)
    D = torch.cdist(X, X).pow(2)
    r2, alpha = meb(D)
    assert r2 == pytest.approx(_exact_meb(D.numpy()), rel=1e-9)
    centre = torch.tensor(alpha, dtype=torch.float64) @ X  # every point within r of the weighted centre
    assert float((X - centre).pow(2).sum(1).max()) == pytest.approx(r2, rel=1e-7)


# ----------------------------------------------------------------------------- the predictor and its baselines


def _pair_records(T: int, seed: int, planted: str = "f0"):
    """Pairs of T tasks with five features; the pair's loss depends on ``planted`` and on task effects."""
    rng = random.Random(seed)
    eff = {f"t{i}": rng.gauss(0, 3) for i in range(T)}
    pairs, losses = [], []
    for a, b in itertools.combinations(range(T), 2):
        A, B = f"t{a}", f"t{b}"
        p = {"kind": "pair", "a": A, "b": B, **{f"f{i}": rng.random() for i in range(5)},
             "cosine": rng.uniform(-0.1, 0.1)}
        pairs.append(p)
        base = -20 * p[planted] + eff[A] + eff[B]
        for m, shift in (("mean", -5), ("ties", 0)):
            for x in (A, B):
                losses.append({"group": f"{A}+{B}", "adapters": [A, B], "adapter": x, "task": x, "method": m,
                               "loss": base + shift + rng.gauss(0, 1)})
    adapters = [{"kind": "adapter", "adapter": f"t{i}", "task": f"t{i}"} for i in range(T)]
    return Records(pairs, adapters), losses


def test_fit_reports_the_predictor_against_each_metric_alone_with_task_intervals():
    rec, losses = _pair_records(10, 0)
    (m,) = forecast.fit_with_baselines({"target": "pair", "method": "ties", "lam": 1.0, "seed": 0, "resamples": 300,
                                        "features": ["f0", "f1", "f2", "f3", "f4"]}, rec, None, losses)
    v = m["validation"]
    assert m["method"] == "ties" and m["fit"]["converged"] and v["bootstrap"]["unit"] == "task"
    assert v["n"] == 2 * 45 and len(v["folds"]) == 10  # every pair held out in both of its tasks' folds
    base = {b["name"]: b for b in m["baselines"]}
    assert set(base) == {"f0", "f1", "f2", "f3", "f4", "cosine"}
    assert base["f0"]["pearson"] > 0.5 and all(abs(base[f]["pearson"]) < 0.4 for f in ("f1", "f2", "f3", "f4"))
    lo, hi = v["pearson_ci"]
    assert lo <= v["pearson"] <= hi and lo > 0.3
    assert base["f1"]["predictor_minus_pearson_ci"][0] > 0  # beats a useless metric
    lo, hi = base["f0"]["predictor_minus_pearson_ci"]
    assert lo < 0 < hi or abs(v["pearson"] - base["f0"]["pearson"]) < 0.1  # not better than the planted metric alone
    # calibrated: forecasts in the target's unit (1 + L/100), not a unitless score
    model = predict.Model.from_json(m, "m")
    got = model.predict(rec.pairs)
    assert 0.5 < sum(got) / len(got) < 1.0


def test_the_score_predictor_is_compared_with_the_base_knowledge_model():
    rng = random.Random(4)
    adapters, scores = [], {}
    for i in range(60):
        a = {"kind": "adapter", "adapter": f"e{i}", "task": f"t{i % 6}", "p_correct": rng.random(),
             "gap": rng.random(), "rank": rng.randrange(4), "norm_f": rng.random()}
        adapters.append(a)
        scores[a["adapter"]] = {"score": min(1.0, max(0.0, a["p_correct"] + rng.gauss(0, 0.1)))}
    (m,) = forecast.fit_with_baselines({"target": "score", "lam": 1.0, "seed": 0, "resamples": 200},
                                       Records([], adapters), scores, None)
    base = {b["name"]: b for b in m["baselines"]}
    assert base["base_knowledge"]["features"] == ["p_correct", "gap", "rank"]
    assert base["base_knowledge"]["pearson"] > 0.8 and base["p_correct"]["pearson"] > 0.8
    assert base["norm_f"]["pearson"] is None or abs(base["norm_f"]["pearson"]) < 0.4


def test_a_fit_that_stops_at_the_step_limit_is_not_converged():
    X = torch.rand(30, 3, dtype=torch.float64)
    y = X[:, 0]
    w, info = predict.fit_weights(X, y, 1.0, steps=5)
    assert not info["converged"] and info["steps"] == 5
    w, info = predict.fit_weights(X, y, 1.0)
    assert info["converged"] and info["steps"] < predict.STEPS


def test_group_forecasts_hold_out_every_task_of_the_group():
    rec, losses = _pair_records(9, 1)
    names = [f"t{i}" for i in range(9)]
    for g, members in enumerate([names[:3], names[3:6], names[6:9], names[1:4], names[4:8]]):
        for x in members:
            losses.append({"group": f"G{g}", "adapters": members, "adapter": x, "task": x, "method": "ties",
                           "loss": -10.0 * g - int(x[1:])})
    (m,) = forecast.fit_with_baselines({"target": "pair", "method": "ties", "lam": 1.0, "seed": 0, "resamples": 200,
                                        "features": ["f0", "f1"]}, rec, None, losses)
    g = m["groups"]
    assert g["n_groups"] == 5 and g["bootstrap"]["unit"].startswith("group")
    assert {b["name"] for b in g["baselines"]} == {"f0", "f1", "cosine", "group size alone"}
    # the size baseline: −size against the group's worst normalised accuracy, by hand
    from scipy import stats

    groups = [names[:3], names[3:6], names[6:9], names[1:4], names[4:8]]
    worst = [1 + min(-10.0 * i - int(x[1:]) for x in ms) / 100 for i, ms in enumerate(groups)]
    size = next(b for b in g["baselines"] if b["name"] == "group size alone")
    assert size["spearman"] == pytest.approx(stats.spearmanr([-len(ms) for ms in groups], worst).statistic)


# ----------------------------------------------------------------------------- comparing fits; Theorem 1


def _model(method, weights: dict) -> predict.Model:
    feats = list(weights)
    return predict.Model("normalized_accuracy", feats, [0.0] * len(feats), [1.0] * len(feats), list(weights.values()),
                         1.0, method=method, validation={"mean_weights": weights})


def test_compare_fits_by_hand():
    a = _model("mean", {"grad_l2": -0.5, "cosine": 0.3, "f1": 0.2, "f2": 0.1, "f3": 0.05, "f4": 0.01, "f5": 0.0})
    b = _model("ties", {"grad_l2": -0.4, "cosine": -0.3, "f1": 0.0, "f2": 0.2, "f3": 0.1, "f4": 0.05, "f5": 0.02})
    c = _model("tsv", {"grad_l2": 0.0, "cosine": 0.1, "f1": 0.0, "f2": 0.0, "f3": 0.0, "f4": 0.0, "f5": -0.3})
    r = compare.compare_fits([("mean", a), ("ties", b), ("tsv", c)])
    fits = {f["label"]: f for f in r["fits"]}
    assert fits["mean"]["top5"] == ["grad_l2", "cosine", "f1", "f2", "f3"] and fits["mean"]["top_is_gradient"]
    assert fits["tsv"]["top5"] == ["f5", "cosine"] and not fits["tsv"]["top_is_gradient"]
    pairs = {(p["a"], p["b"]): p for p in r["pairs"]}
    assert pairs[("mean", "ties")]["top5_overlap"] == 4 / 5  # grad_l2, cosine, f2, f3
    # signs on features non-zero in both: grad_l2 +, cosine −, f2 +, f3 +, f4 + -> 4 of 5
    assert pairs[("mean", "ties")]["sign_agreement"] == 4 / 5 and pairs[("mean", "ties")]["signs_compared"] == 5
    # mean and tsv share cosine (+, +); ties and tsv share cosine (−, +) and f5 (+, −)
    assert pairs[("mean", "tsv")]["sign_agreement"] == 1.0 and pairs[("ties", "tsv")]["sign_agreement"] == 0
    assert pairs[("ties", "tsv")]["top5_overlap"] == 1 / 5 and pairs[("ties", "tsv")]["signs_compared"] == 2
    assert r["mean_top5_overlap"] == pytest.approx((4 / 5 + 1 / 5 + 1 / 5) / 3)
    assert r["mean_sign_agreement"] == pytest.approx((4 / 5 + 1 + 0) / 3)
    assert r["pooled_sign_agreement"] == pytest.approx((4 + 1 + 0) / (5 + 1 + 2)) and r["top_is_gradient"] == 2


def test_theorem_stats_count_the_bounds_and_correlate_the_distortion():
    rng = random.Random(5)
    tasks = [f"t{i}" for i in range(8)]
    merges, losses, groups = [], [], []
    for g in range(12):
        members = sorted(rng.sample(tasks, 4))
        delta2 = rng.uniform(1, 4)
        r2 = delta2 * rng.uniform(0.25, 0.375)
        groups.append({"kind": "group", "group": f"g{g}", "adapters": members, "mds": {m: rng.uniform(1, 3) for m in members}})
        for method in ("mean", "ties"):
            dmax = r2 * rng.uniform(1.0, 3.0)
            merges.append({"kind": "merge", "merged": f"{method}-g{g}", "method": method, "group": f"g{g}",
                           "adapters": members, "tasks": members, "distortion_max": dmax, "distortion_excess": dmax - r2,
                           "diameter2": delta2, "lower_bound": delta2 / 4, "meb_radius2": r2,
                           "upper_bound_paper": delta2 * 0.49, "upper_bound_jung": delta2 * 3 / 8,
                           "holds": {"lower_bound": True, "meb_radius2": True, "upper_bound_jung": dmax <= delta2 * 3 / 8,
                                     "upper_bound_paper": dmax <= delta2 * 0.49}})
            for x in members:
                losses.append({"group": f"g{g}", "adapters": members, "adapter": x, "task": x, "method": method,
                               "loss": -30 * dmax + rng.gauss(0, 1)})
    out = analysis.theorem_stats(losses, merges, groups, [], [], ["cosine"], 0, 200)
    bounds = {r["method"]: r for r in out if r["test"] == "theorem1_bounds"}
    assert bounds["all"]["n"] == 24 and bounds["all"]["holds"]["lower_bound"] == 24
    assert bounds["ties"]["holds"]["upper_bound_paper"] == sum(m["holds"]["upper_bound_paper"] for m in merges
                                                               if m["method"] == "ties")
    corr = {(r["x"], r["y"], r["method"]): r for r in out if r["test"] == "group_correlation"}
    c = corr[("distortion_max", "mean_loss", "ties")]
    assert c["size"] == "groups" and c["n"] == 12 and c["pearson"] < -0.9 and c["pearson_ci"][1] < -0.5
    assert c["bootstrap"]["unit"].startswith("group")


def test_a_constant_feature_has_no_slope_and_is_no_baseline():
    """Experts kept because they answer their own question all have accuracy alone 1: such a feature carries no
    information, yet a fold's fit on it returned a per-fold constant, and pooled over two tasks whose S differ
    it correlated with S (−0.09 on the testbed's pool). It is now neither a baseline nor a slope."""
    rng = random.Random(7)
    adapters, scores = [], {}
    for i in range(80):
        t = i % 2
        a = {"kind": "adapter", "adapter": f"e{i}", "task": f"t{t}", "noise": rng.random(), "finetuned": 1.0,
             "p_correct": rng.random(), "gap": rng.random(), "rank": 1}
        adapters.append(a)
        scores[a["adapter"]] = {"score": 0.6 * t + rng.gauss(0, 0.05)}  # a task effect and nothing else
    (m,) = forecast.fit_with_baselines({"target": "score", "lam": 1.0, "seed": 0, "resamples": 100,
                                        "features": ["noise", "finetuned"]}, Records([], adapters), scores, None)
    base = {b["name"]: b for b in m["baselines"]}
    assert "finetuned" not in base and "noise" in base
    assert base["base_knowledge"]["features"] == ["p_correct", "gap"]  # rank is constant too
    # the pooled held-out figure is about the slopes: noise carries none, whatever the tasks' means
    assert abs(m["validation"]["spearman"]) < 0.35
    model = predict.Model("score", ["a", "c"], [0.0, 1.0], [1.0, 1.0], [0.5, 0.7], 1.0, intercept=0.1, slope=2.0)
    assert model.linear([{"a": 0.2, "c": 1.0}]) == [pytest.approx(2.0 * 2 * 0.5 * 0.2)]
