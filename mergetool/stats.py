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
