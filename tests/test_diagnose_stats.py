"""diagnose's smallest enclosing ball (Theorem 1's exact r²) against an exact solver."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mergetool.diagnose.representation import meb


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
