"""The statistics that ``score`` and ``diagnose`` report: the binomial null of mergeability, correlations with
p-values (exact by permutation for small samples), tables binned by a score with standard errors, one-way
ANOVA, and p-values as text (``format_p``). scipy computes the tests; polars holds the tables.

Missing values (None or NaN) are dropped pairwise; a statistic that cannot be computed (fewer than three
pairs, a constant column) is None, never NaN, so records stay valid JSON.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Sequence

EXACT_N = 10  # up to this many pairs, a Spearman p-value is exact: all n! pairings enumerated (10! = 3.6 M)


def format_p(p: float | None, floor: float | None = None) -> str:
    """A p-value as text, with two significant digits: ``0.083``, ``0.0031``, ``3.2e-07``, ``1``; never ``0.00``.
    ``floor`` is the smallest p the method can give (1/(B+1) for a Monte Carlo test of B draws): a p at it is
    ``≤ 0.0001``, since the method cannot resolve below it. A p that underflowed to 0 is ``< 2.2e-308``."""
    if p is None:
        return "–"
    if floor is not None and p <= floor * (1 + 1e-9):
        return f"≤ {floor:.2g}"
    if p <= 0:
        return f"< {sys.float_info.min:.2g}"
    return f"{p:.2g}"


def _clean(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def binomial_fit(scores: Sequence[float], trials: int) -> dict:
    """Compare the histogram of mergeability scores S (each the mean of ``trials`` 0/1 outcomes) with
    Binomial(N, p), p = all successful merges / all merges, the distribution S would follow if every adapter
    survived a merge with the same probability ("Will it Merge?", Figure 2). Pearson's χ² goodness of fit
    (bins with an expected count under 5 pooled with their neighbours toward the middle; one degree of
    freedom spent on p) and the dispersion var(S) / (p(1−p)/N): 1 under the null, above 1 when some adapters
    merge well and others badly."""
    from scipy import stats

    s = [x for x in (_clean(v) for v in scores) if x is not None]
    n = len(s)
    if not n:
        return {"n": 0}
    k = [round(x * trials) for x in s]
    p = sum(k) / (n * trials)
    observed = [sum(1 for x in k if x == j) for j in range(trials + 1)]
    expected = [n * float(stats.binom.pmf(j, trials, p)) for j in range(trials + 1)]
    out = {"n": n, "trials": trials, "p": p, "observed": observed, "expected": expected,
           "mean": sum(s) / n, "chi2": None, "dof": None, "p_value": None, "dispersion": None}
    if 0 < p < 1 and n > 1:
        var = sum((x - p) ** 2 for x in s) / (n - 1)
        out["dispersion"] = var / (p * (1 - p) / trials)
        obs, exp = _pool(observed, expected)
        if len(obs) >= 3:
            chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
            dof = len(obs) - 2
            out.update(chi2=chi2, dof=dof, p_value=float(stats.chi2.sf(chi2, dof)))
    return out


def _pool(observed: list[int], expected: list[float], least: float = 5.0):
    """Merge bins from both ends inward until every expected count is at least ``least``."""
    obs, exp = list(observed), list(expected)
    while len(exp) > 1 and exp[0] < least:
        o, e = obs.pop(0), exp.pop(0)
        obs[0] += o
        exp[0] += e
    while len(exp) > 1 and exp[-1] < least:
        o, e = obs.pop(), exp.pop()
        obs[-1] += o
        exp[-1] += e
    return obs, exp


def correlate(x: Sequence, y: Sequence) -> dict:
    """Pearson and Spearman correlations of x and y with their two-sided p-values, over the pairs where both
    are present."""
    from scipy import stats

    pairs = [(a, b) for a, b in ((_clean(a), _clean(b)) for a, b in zip(x, y)) if a is not None and b is not None]
    out = {"n": len(pairs), "pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None}
    if len(pairs) < 3:
        return out
    xs, ys = zip(*pairs)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return out
    r = stats.pearsonr(xs, ys)
    if len(pairs) <= EXACT_N:
        t = spearman_test(xs, ys)
        rho, p = t["rho"], t["p"]
    else:
        res = stats.spearmanr(xs, ys)
        rho, p = res.statistic, res.pvalue
    out.update(pearson=_clean(r.statistic), pearson_p=_clean(r.pvalue), spearman=_clean(rho), spearman_p=_clean(p))
    return out


@functools.lru_cache(maxsize=8)
def _pairings(n: int):
    """All n! permutations of range(n), one per row, built by inserting n−1 into every position of the
    permutations of n−1."""
    import numpy as np

    perms = np.zeros((1, 1), dtype=np.int64)
    for k in range(2, n + 1):
        perms = np.concatenate([np.insert(perms, pos, k - 1, axis=1) for pos in range(k)])
    return perms


def _exact_tail(rx, ry, obs: float, tol: float) -> float:
    """The share of all n! pairings π with |Σ rx_i ry_π(i)| ≥ |obs| (less ``tol``), by meeting in the middle:
    for each set T of the y values paired with the first h x values, the first h terms take h! values and the
    rest (n−h)!, and the pairs of the two lists that reach the threshold are counted by a sorted search (at
    n = 10: 252 sets of 120 x 120, instead of 3.6 M pairings)."""
    import itertools

    import numpy as np

    n = len(rx)
    h = n // 2
    thr = abs(obs) - tol
    first, second = _pairings(h), _pairings(n - h)
    hits = 0
    for T in itertools.combinations(range(n), h):
        rest = [j for j in range(n) if j not in T]
        a = ry[list(T)][first] @ rx[:h]
        b = np.sort(ry[rest][second] @ rx[h:])
        if thr <= 0:
            hits += len(a) * len(b)
            continue
        hits += int((len(b) - np.searchsorted(b, thr - a, side="left")).sum())  # a + b ≥ thr
        hits += int(np.searchsorted(b, -thr - a, side="right").sum())  # a + b ≤ −thr
    return hits / math.factorial(n)


def _centred_ranks(v):
    import numpy as np
    from scipy import stats

    r = stats.rankdata(np.asarray(v, dtype=float), axis=-1)  # midranks for ties
    return r - r.mean(axis=-1, keepdims=True)


def spearman_test(x: Sequence, y: Sequence, permutations: int = 9999, seed: int = 0) -> dict:
    """Spearman's ρ of x and y with a two-sided p-value by permutation: the share of pairings of x with y
    whose |ρ| is at least the observed one. With n ≤ ``EXACT_N`` pairs every pairing is enumerated (exact: ρ = −1
    at n = 4 has p = 2/24 = 1/12); above, ``permutations`` random pairings (p = (1 + k)/(B + 1), ``floor`` =
    1/(B + 1)). Ties get midranks, and the permutation distribution holds them as they are. Valid whenever the
    x values are exchangeable under the null, whatever the dependence among the y values (score's S, whose
    adapters share merges). Missing values are dropped pairwise; fewer than three pairs or a constant column
    give None."""
    import numpy as np

    pairs = [(a, b) for a, b in ((_clean(a), _clean(b)) for a, b in zip(x, y)) if a is not None and b is not None]
    n = len(pairs)
    out = {"n": n, "rho": None, "p": None, "floor": None, "method": None}
    if n < 3:
        return out
    rx, ry = (_centred_ranks(v) for v in zip(*pairs))
    scale = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if scale == 0:
        return out
    obs = float(rx @ ry)
    tol = 1e-9 * scale
    if n <= EXACT_N:
        out.update(p=_exact_tail(rx, ry, obs, tol), method="exact")
    else:
        rng = np.random.default_rng(seed)
        hits = 0
        for s in range(0, permutations, 2000):
            b = min(2000, permutations - s)
            order = np.argsort(rng.random((b, n)), axis=1)
            hits += int(np.count_nonzero(np.abs(ry[order] @ rx) >= abs(obs) - tol))
        out.update(p=(1 + hits) / (permutations + 1), floor=1 / (permutations + 1), method="permutation")
    out["rho"] = _clean(obs / scale)
    return out


def mantel_test(pairs: Sequence[tuple[str, str]], x: Sequence, y: Sequence, permutations: int = 9999,
                seed: int = 0) -> dict:
    """Pearson's r and Spearman's ρ of x and y measured on pairs of units (x: a pair metric, y: the pair's merging
    loss), with two-sided p-values by the Mantel permutation test: the units' labels of x are permuted (x[i, j]
    becomes x[π(i), π(j)]) while y stays, so every permutation keeps the dependence that comes from pairs sharing
    a unit. Valid under the null that x's labelling is exchangeable with respect to y's, whatever the unit
    effects in either (a task that loses in all its pairs, an adapter whose norm enters all its pairs' metric),
    where the plain p-values, which count the pairs as independent, are not (tests/test_stats.py simulates
    both). With n ≤ 8 units every permutation is enumerated (exact); above, ``permutations`` random ones
    (p = (1 + k)/(B + 1), ``floor`` = 1/(B + 1); none asked for: no p). Pairs without both values are dropped;
    the test needs x on every pair of the units left (pass x on every pair, y None where it is missing), at
    least three pairs and four units, else its p is None."""
    import itertools

    import numpy as np

    keep = [(a, b, _clean(u), _clean(v)) for (a, b), u, v in zip(pairs, x, y, strict=True)]
    xs = {frozenset((a, b)): u for a, b, u, _ in keep if u is not None and a != b}
    obs = [(a, b, u, v) for a, b, u, v in keep if u is not None and v is not None and a != b]
    units = sorted({a for a, b, _, _ in obs} | {b for a, b, _, _ in obs})
    out = {"n": len(obs), "units": len(units), "pearson": None, "spearman": None, "pearson_p": None,
           "spearman_p": None, "floor": None, "method": None}
    if len(obs) < 3 or len(units) < 4 or any(frozenset(p) not in xs for p in itertools.combinations(units, 2)) \
            or (len(units) > 8 and permutations < 1):
        return out
    at = {u: i for i, u in enumerate(units)}
    n = len(units)
    xm = np.zeros((n, n))
    for p, u in xs.items():
        if p <= set(at):
            i, j = (at[q] for q in p)
            xm[i, j] = xm[j, i] = u
    ii = np.array([at[a] for a, _, _, _ in obs])
    jj = np.array([at[b] for _, b, _, _ in obs])
    yv = np.array([v for _, _, _, v in obs], dtype=float)
    if n <= 8:
        perms = np.array(list(itertools.permutations(range(n))))
        method, floor = "exact", None
    else:
        rng = np.random.default_rng(seed)
        perms = np.concatenate([np.arange(n)[None], np.argsort(rng.random((permutations, n)), axis=1)])
        method, floor = "permutation", 1 / (permutations + 1)
    xv = xm[perms[:, ii], perms[:, jj]]  # (permutations + 1, pairs): row 0 is the identity
    for name, a, b in (("pearson", xv, yv), ("spearman", _centred_ranks(xv), _centred_ranks(yv))):
        a = a - a.mean(axis=1, keepdims=True)
        b = b - b.mean()
        scale = np.sqrt((a * a).sum(axis=1) * float(b @ b))
        if scale[0] == 0:
            continue
        r = (a @ b) / np.where(scale > 0, scale, 1.0)
        tol = 1e-9
        k = int(np.count_nonzero(np.abs(r) >= abs(r[0]) - tol))  # the identity counts itself: (1 + k') / (B + 1)
        out[name] = _clean(float(r[0]))
        out[f"{name}_p"] = k / len(perms)
    out.update(method=method, floor=floor)
    return out


def score_bins(scores: Sequence[float], trials: int | None) -> list[str]:
    """The bin of each score: its exact value when S takes few values (every S a multiple of 1/N with N ≤ 10
    trials, as at example level: 0.0, 0.2, …, 1.0 for N = 5, "Will it Merge?" Table A.1 and Figure 3), else
    fifths (0.0-0.2, …, 0.8-1.0, the upper end in the last: its Table 1), as at task level, where S is a mean
    of accuracies (0.73 lies in 0.6-0.8)."""
    exact = bool(trials) and trials <= 10 and all(abs(s * trials - round(s * trials)) < 1e-9 for s in scores)
    out = []
    for s in scores:
        if exact:
            out.append(f"{round(s * trials) / trials:.2f}")
        else:
            i = min(int(s * 5 + 1e-9), 4)
            out.append(f"{i / 5:.1f}-{(i + 1) / 5:.1f}")
    return out


def binned(records: list[dict], by: str, fields: Sequence[str], trials: int | None = None) -> list[dict]:
    """Mean and standard error of each field per bin of ``by`` (``score_bins``): one dict per bin, in order."""
    import polars as pl

    rows = [{"bin": b, **{f: _clean(r.get(f)) for f in fields}}
            for b, r in zip(score_bins([r[by] for r in records], trials), records)]
    if not rows:
        return []
    df = pl.DataFrame(rows, schema={"bin": pl.Utf8, **{f: pl.Float64 for f in fields}})
    aggs = [pl.len().alias("n")]
    for f in fields:
        aggs += [pl.col(f).mean().alias(f"{f}_mean"),
                 (pl.col(f).std() / pl.col(f).count().cast(pl.Float64).sqrt()).alias(f"{f}_se")]
    table = df.group_by("bin").agg(aggs).sort("bin")
    return [{k: (_clean(v) if isinstance(v, float) else v) for k, v in row.items()} for row in table.to_dicts()]


def anova(groups: dict[str, Sequence[float]]) -> dict:
    """One-way ANOVA F-test of the groups' means (scipy's f_oneway), with each group's n and mean."""
    from scipy import stats

    clean = {k: [x for x in (_clean(v) for v in vs) if x is not None] for k, vs in groups.items()}
    clean = {k: v for k, v in clean.items() if v}
    out = {"groups": {k: {"n": len(v), "mean": sum(v) / len(v)} for k, v in clean.items()}, "F": None, "p_value": None}
    if len(clean) >= 2 and sum(len(v) for v in clean.values()) > len(clean):
        r = stats.f_oneway(*clean.values())
        out.update(F=_clean(r.statistic), p_value=_clean(r.pvalue))
    return out


# ----------------------------------------------------------------------------- designs with shared merges
#
# A score run's outcomes are f(update, merge): with trial sharing the updates of one group share its merge, so
# their outcomes are not independent (at M = 50 on 104 updates, all 520 outcomes come from 15 merges). The
# statistics below take the design as it is: the existence test permutes outcomes only within a merge, the
# intervals resample merges and updates both (the updates × merges design is crossed).


def _outcome_arrays(adapter, merge, value):
    import numpy as np

    adapter = np.asarray(adapter, dtype=np.int64)
    merge = np.unique(np.asarray(merge), return_inverse=True)[1].astype(np.int64)  # 0..G-1
    value = np.asarray(value, dtype=float)
    return adapter, merge, value


def existence_test(adapter: Sequence[int], merge: Sequence, value, permutations: int = 9999, seed: int = 0) -> dict:
    """Do updates differ in how well they survive merges, beyond what their merges do? One entry per trial: the
    update, its merge, f (``value``; a 2-D array tests several runs of outcomes on one plan at once, one per
    row, with the same permutations). The statistic is the between-update sum of squares Σ_a n_a (S_a − S̄)²
    (the dispersion of S, for equal n_a). Under the null (no update effect; any merge effect) the outcomes of
    one merge are exchangeable among its members, so the permutations shuffle outcomes among the trials of
    each merge: merge effects stay, update identity goes. A plan whose merges each hold one trial
    (``--independent``, ``--partners-from``) has nothing to shuffle within a merge; its merges are independent
    draws, so there every outcome is shuffled with every other. p = (1 + k)/(B + 1), k the permutations at
    least as extreme: valid (never below its level) for any B. Vectorised: B × trials (× runs)."""
    import numpy as np

    a, g, y = _outcome_arrays(adapter, merge, value)
    single = y.ndim == 1
    y = np.atleast_2d(y)
    n_ad = int(a.max()) + 1 if len(a) else 0
    out = {"statistic": None, "p": None, "floor": 1 / (permutations + 1), "permutations": permutations,
           "merges": None, "shared_merges": None, "within": None}
    if y.shape[1] < 2 or n_ad < 2:
        return out
    sizes = np.bincount(g)
    shared = int((sizes >= 2).sum())
    within = shared > 0
    block = g if within else np.zeros_like(g)
    order = np.argsort(block, kind="stable")
    a, block, y = a[order], block[order], y[:, order]
    n_a = np.bincount(a, minlength=n_ad).astype(float)
    n_a[n_a == 0] = np.inf  # updates with no trial add nothing
    k, n = y.shape
    total = y.sum(axis=1)

    def ss(labels):  # (b, trials) update labels -> (runs, b) between-update sums of squares
        b = len(labels)
        flat = (np.arange(k)[:, None, None] * b + np.arange(b)[None, :, None]) * n_ad + labels[None, :, :]
        sums = np.bincount(flat.ravel(), weights=np.broadcast_to(y[:, None, :], (k, b, n)).ravel(),
                           minlength=k * b * n_ad).reshape(k, b, n_ad)
        return (sums ** 2 / n_a).sum(axis=2) - (total ** 2 / n)[:, None]

    obs = ss(a[None, :])[:, 0]  # (runs,)
    rng = np.random.default_rng(seed)
    hits = np.zeros(k, dtype=np.int64)
    tol = 1e-9 * np.maximum(np.abs(obs), 1e-300)
    step = max(1, min(1000, 4_000_000 // (k * n)))
    for s in range(0, permutations, step):
        b = min(step, permutations - s)
        perm = np.argsort(rng.random((b, n)) + block[None, :], axis=1)  # a random order within each block
        hits += np.count_nonzero(ss(a[perm]) >= (obs - tol)[:, None], axis=1)
    p = (1 + hits) / (permutations + 1)
    out.update(statistic=float(obs[0]) if single else obs, p=float(p[0]) if single else p, merges=int(len(sizes)),
               shared_merges=shared, within=within)
    return out


def weighted_midranks(values, weights):
    """Per row, the midranks of ``values`` in the sample where value j appears ``weights[j]`` times (integer
    weights: the ranks a bootstrap sample's repeated members get; weight 0 drops it). Vectorised over rows:
    sorted once, ties found as runs of equal values."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    weights = np.asarray(weights, dtype=float)
    rows, n = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    v = np.take_along_axis(values, order, axis=1)
    w = np.take_along_axis(weights, order, axis=1)
    new = np.ones_like(v, dtype=bool)
    new[:, 1:] = v[:, 1:] != v[:, :-1]
    run = np.cumsum(new.ravel()) - 1  # a global id per run of ties (every row starts a run)
    run_w = np.bincount(run, weights=w.ravel())
    before = (np.cumsum(w, axis=1) - w).ravel()[new.ravel()]  # weight below each run's first member
    ranks_sorted = (before[run] + (run_w[run] + 1) / 2).reshape(rows, n)
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, axis=1)
    return ranks


def weighted_spearman(x, y, weights):
    """Spearman's ρ per row of the samples where pair j appears ``weights[j]`` times (NaN where undefined)."""
    import numpy as np

    rx, ry = weighted_midranks(x, weights), weighted_midranks(y, weights)
    w = np.asarray(weights, dtype=float)
    tot = w.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = (w * rx).sum(1, keepdims=True) / tot, (w * ry).sum(1, keepdims=True) / tot
        cov = (w * (rx - mx) * (ry - my)).sum(1)
        return cov / np.sqrt((w * (rx - mx) ** 2).sum(1) * (w * (ry - my) ** 2).sum(1))


def crossed_bootstrap(n_adapters: int, trials: dict[str, tuple], fields: dict[str, Sequence],
                      replicates: int = 2000, seed: int = 0, level: float = 0.95,
                      between: Sequence[tuple[str, str]] = ()) -> dict:
    """Intervals for a score run's means and Spearman correlations, by the pigeonhole bootstrap (Owen 2007, for
    crossed random effects): each replicate resamples the updates and, independently, the merges, both with
    replacement. An update's S (or control) in a replicate is the mean of its trials weighted by how often
    their merges were drawn; a mean over updates or a ρ with an update field is computed on the updates drawn
    (repeats counted). Resampling merges keeps each merge's shared effect on all its members together;
    resampling updates covers which updates the pool happened to hold. The variance it gives is slightly
    conservative for crossed designs (Owen), never the too-narrow one of treating trials as independent.

    ``trials``: per measure (``score``, ``control``), (update, merge, f) arrays, one row per trial; merges are
    named alike across measures (a merge that gives some members their score gives others their control).
    ``contribution`` = score − control per update. ``fields``: per field, one value per update (None/NaN
    missing). ``between``: pairs of measures whose Spearman over the updates gets an interval too, both
    estimated in each replicate (the S of one pool in two runs, their merges named apart: the stability of S
    across seeds). Percentile intervals at ``level``. Returns ``{"means": {m: (lo, hi)}, "spearman": {(m,
    field): (lo, hi)}}``, the pairs of ``between`` among the keys of ``spearman``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    names = sorted({x for m in trials for x in trials[m][1]}, key=str)
    gid = {x: i for i, x in enumerate(names)}
    G = len(names)
    R, P = replicates, n_adapters
    vmerge = rng.multinomial(G, np.full(G, 1 / G), size=R).astype(float) if G else np.zeros((R, 0))
    wad = rng.multinomial(P, np.full(P, 1 / P), size=R).astype(float)
    est: dict[str, np.ndarray] = {}
    for m, (ad, mg, val) in trials.items():
        ad = np.asarray(ad, dtype=np.int64)
        cols = np.array([gid[x] for x in mg], dtype=np.int64)
        val = np.asarray(val, dtype=float)
        v = vmerge[:, cols]  # (R, trials): each trial weighted by its merge's draws
        onehot = np.zeros((len(ad), P))
        onehot[np.arange(len(ad)), ad] = 1.0
        num, den = (v * val) @ onehot, v @ onehot
        with np.errstate(invalid="ignore", divide="ignore"):
            est[m] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    if "score" in est and "control" in est:
        est["contribution"] = est["score"] - est["control"]
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def interval(samples):
        s = samples[np.isfinite(samples)]
        if len(s) < max(20, R // 2):  # undefined in most replicates: no interval
            return None
        return float(np.percentile(s, lo_q)), float(np.percentile(s, hi_q))

    out: dict = {"means": {}, "spearman": {}, "replicates": R, "level": level, "merges": G}
    for m, e in est.items():
        ok = np.isfinite(e)
        w = wad * ok
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (w * np.where(ok, e, 0)).sum(1) / w.sum(1)
        out["means"][m] = interval(means)
    for f, xs in fields.items():
        x = np.array([np.nan if _clean(v) is None else float(v) for v in xs])
        for m, e in est.items():
            ok = np.isfinite(e) & np.isfinite(x)[None, :]
            rho = weighted_spearman(np.where(ok, np.broadcast_to(x, e.shape), np.inf), np.where(ok, e, np.inf),
                                    wad * ok)
            out["spearman"][(m, f)] = interval(rho)
    for m1, m2 in between:
        ok = np.isfinite(est[m1]) & np.isfinite(est[m2])
        out["spearman"][(m1, m2)] = interval(weighted_spearman(np.where(ok, est[m1], np.inf),
                                                               np.where(ok, est[m2], np.inf), wad * ok))
    return out
