"""mergetool.stats: exact small-sample p-values, p-values as text, the bins of S."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from mergetool.stats import correlate, format_p, score_bins, spearman_test


def brute_spearman_p(x, y) -> float:
    """The two-sided permutation p of Spearman's ρ by listing every pairing (the reference)."""
    rx = stats.rankdata(x) - stats.rankdata(x).mean()
    ry = stats.rankdata(y) - stats.rankdata(y).mean()
    obs = abs(rx @ ry)
    vals = np.array([ry[list(p)] @ rx for p in itertools.permutations(range(len(x)))])
    return float(np.mean(np.abs(vals) >= obs - 1e-9))


def test_exact_spearman_p_at_small_n():
    """ρ = −1 at n = 4: 2 of the 24 pairings reach |ρ| = 1, p = 1/12 (scipy's t approximation says 0)."""
    t = spearman_test([1, 2, 3, 4], [4, 3, 2, 1])
    assert t["rho"] == -1 and t["p"] == pytest.approx(1 / 12) and t["method"] == "exact" and t["floor"] is None
    assert correlate([1, 2, 3, 4], [4, 3, 2, 1])["spearman_p"] == pytest.approx(1 / 12)
    assert format_p(correlate([1, 2, 3, 4], [4, 3, 2, 1])["spearman_p"]) == "0.083"


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8])
def test_exact_spearman_agrees_with_listing_every_pairing(n):
    """With ties (midranks) and without, the meet-in-the-middle count equals the full listing."""
    rng = np.random.default_rng(n)
    for _ in range(6):
        x = rng.integers(0, 4, n).astype(float)
        y = rng.integers(0, 3, n).astype(float)
        t = spearman_test(x, y)
        if t["rho"] is None:
            continue
        assert t["p"] == pytest.approx(brute_spearman_p(x, y), abs=1e-12)
        assert t["rho"] == pytest.approx(stats.spearmanr(x, y).statistic)


def test_exact_spearman_at_ten_and_monte_carlo_above():
    # 10! pairings listed once (by another enumeration): 1,011,810 of 3,628,800 reach |ρ| ≥ 0.3818
    t = spearman_test(range(10), [3, 1, 2, 5, 4, 7, 6, 9, 8, 0])
    assert t["p"] == pytest.approx(0.27882771164021164, abs=1e-12)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=60), rng.normal(size=60)
    y += 0.3 * x
    t = spearman_test(x, y, permutations=9999)
    assert t["method"] == "permutation" and t["floor"] == 1 / 10000
    assert t["p"] == pytest.approx(stats.spearmanr(x, y).pvalue, abs=0.01)  # no ties: the t approximation is close
    strong = spearman_test(range(40), range(40))
    assert strong["p"] == strong["floor"] and format_p(strong["p"], strong["floor"]) == "≤ 0.0001"


def test_format_p_has_significant_digits_and_never_zero():
    assert [format_p(p) for p in (1 / 12, 0.0031, 0.0049, 3.2e-7, 1.0, 0.43)] == \
        ["0.083", "0.0031", "0.0049", "3.2e-07", "1", "0.43"]
    assert format_p(None) == "–" and format_p(0.0) == "< 2.2e-308"
    for p in np.logspace(-320, 0, 400):
        s = format_p(float(p))
        assert s not in ("0", "0.0", "0.00") and (s.startswith("<") or float(s) > 0)


def test_score_bins_are_fifths_at_task_level():
    """Task level: S is a mean of accuracies, binned in fifths (Table 1); 0.73 lies in 0.6-0.8. Example level:
    S = k/N, each value a bin."""
    assert score_bins([0.73, 0.8, 1.0, 0.6, 0.2, 0.0, 0.19], 5) == \
        ["0.6-0.8", "0.8-1.0", "0.8-1.0", "0.6-0.8", "0.2-0.4", "0.0-0.2", "0.0-0.2"]
    assert score_bins([0.8, 0.4, 1.0, 0.0], 5) == ["0.80", "0.40", "1.00", "0.00"]
    assert score_bins([0.5, 0.25], None) == ["0.4-0.6", "0.2-0.4"]
    assert math.isclose(float(score_bins([2 / 3], 3)[0]), 0.67)


def _dyadic(rng, n: int, unit_sd: float, noise_sd: float, effect=None):
    """Values on every pair of n units: a_i + a_j + noise (the units' own effects enter all their pairs)."""
    import itertools

    a = rng.normal(0, unit_sd, n) if effect is None else effect
    pairs = list(itertools.combinations(range(n), 2))
    return pairs, [a[i] + a[j] + rng.normal(0, noise_sd) for i, j in pairs]


def test_mantel_holds_its_level_where_the_plain_p_values_do_not():
    """Pair metrics and pair losses that both carry unit effects (a task that loses in all its pairs, an adapter
    whose norm enters all its pairs' metric), independent of each other: the plain Pearson p-value, which counts
    the 91 pairs of 14 units as independent, rejects far more than 5 %; the Mantel test (the units' labels
    permuted) stays at its level. And it finds a real relation: y = −x + noise."""
    import numpy as np

    from mergetool.stats import correlate, mantel_test

    rng = np.random.default_rng(5)
    reps, plain, mantel, power = 400, 0, 0, 0
    for _ in range(reps):
        pairs, x = _dyadic(rng, 14, 1.0, 0.5)
        _, y = _dyadic(rng, 14, 1.0, 0.5)
        names = [(f"t{i}", f"t{j}") for i, j in pairs]
        t = mantel_test(names, x, y, permutations=199, seed=int(rng.integers(1 << 30)))
        plain += correlate(x, y)["pearson_p"] < 0.05
        mantel += t["pearson_p"] < 0.05
        y2 = [-u + rng.normal(0, 1.0) for u in x]  # a negative relation
        power += mantel_test(names, x, y2, permutations=199, seed=1)["spearman_p"] < 0.05
    assert plain / reps > 0.25  # 0.38 when written
    assert 0.02 < mantel / reps < 0.085  # 0.050 when written: 5 % ± 1.1 % (binomial SE at 400 runs), and room
    assert power / reps > 0.95


def test_mantel_is_exact_at_small_n_and_its_r_is_the_plain_one():
    """With up to 8 units every permutation of the labels is listed: the p-value is a multiple of 1/n!; the
    correlations are the plain ones; a pair metric missing on a pair of the units gives no test."""
    import math

    import numpy as np
    from scipy import stats

    from mergetool.stats import mantel_test

    rng = np.random.default_rng(3)
    pairs, x = _dyadic(rng, 5, 1.0, 0.3)
    _, y = _dyadic(rng, 5, 1.0, 0.3)
    names = [(f"t{i}", f"t{j}") for i, j in pairs]
    t = mantel_test(names, x, y)
    assert t["method"] == "exact" and t["units"] == 5 and t["n"] == 10
    assert t["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic)
    assert t["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic)
    for k in ("pearson_p", "spearman_p"):
        assert t[k] * math.factorial(5) == pytest.approx(round(t[k] * math.factorial(5)))
        assert 1 / 120 <= t[k] <= 1
    # against a plain loop over the 120 relabellings, both correlations, and a negative relation found
    import itertools

    def loop(xs, ys, kind):
        xm = {frozenset(p): v for p, v in zip(pairs, xs)}
        r0 = None
        hits = 0
        for perm in itertools.permutations(range(5)):
            xp = [xm[frozenset((perm[i], perm[j]))] for i, j in pairs]
            r = (stats.pearsonr if kind == "pearson" else stats.spearmanr)(xp, ys).statistic
            r0 = r if r0 is None else r0
            hits += abs(r) >= abs(r0) - 1e-9
        return hits / 120
    neg = [-v + rng.normal(0, 0.3) for v in x]
    for ys in (y, neg):
        t = mantel_test(names, x, ys)
        assert t["pearson_p"] == pytest.approx(loop(x, ys, "pearson"))
        assert t["spearman_p"] == pytest.approx(loop(x, ys, "spearman"))
    assert mantel_test(names, x, neg)["pearson"] < 0
    # a loss missing on one pair drops that pair only; a metric missing on one pair leaves no valid test
    t = mantel_test(names, x, [None] + y[1:])
    assert t["n"] == 9 and t["pearson_p"] is not None and t["spearman_p"] is not None
    assert mantel_test(names, [None] + x[1:], y)["pearson_p"] is None
