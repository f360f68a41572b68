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
