"""The statistics that ``score`` and ``diagnose`` report: the binomial null of mergeability, correlations with
p-values, tables binned by a score with standard errors, one-way ANOVA. scipy computes the tests; polars
holds the tables.

Missing values (None or NaN) are dropped pairwise; a statistic that cannot be computed (fewer than three
pairs, a constant column) is None, never NaN, so records stay valid JSON.
"""

from __future__ import annotations

import math
from typing import Sequence


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
    rho = stats.spearmanr(xs, ys)
    out.update(pearson=_clean(r.statistic), pearson_p=_clean(r.pvalue), spearman=_clean(rho.statistic),
               spearman_p=_clean(rho.pvalue))
    return out


def score_bins(scores: Sequence[float], trials: int | None) -> list[str]:
    """The bin of each score: its exact value when S takes few values (N ≤ 10 trials: 0.0, 0.2, …, 1.0 for
    N = 5, as "Will it Merge?" Table A.1 and Figure 3), else fifths (0.0-0.2, …, 0.8-1.0, as its Table 1)."""
    out = []
    for s in scores:
        if trials and trials <= 10:
            out.append(f"{round(s * trials) / trials:.2f}")
        else:
            i = min(int(s * 5), 4)
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
