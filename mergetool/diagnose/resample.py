"""Resampling for diagnose's statistics, with the unit of independence said each time.

- **Task bootstrap** (units tied to tasks: a pair of tasks, an adapter of a task). Pairs that share a task are
  not independent (CoLA's collapse shows in every pair that holds CoLA), so the tasks are resampled, not the
  pairs: draw the T tasks with replacement, and a unit enters the resample as many times as it can be formed
  from the drawn tasks (the product of its tasks' counts: a pair (a, b) c_a·c_b times, an adapter c_t times).
  For pairs this is the vertex bootstrap of dyadic data (Snijders and Borgatti 1999); the figure it gives is
  about tasks like these, not only these.
- **Unit bootstrap** (groups of three or more drawn at random): the groups are resampled. They share tasks, so
  the interval is conditional on the task set (a group of 8 of 14 tasks would almost never survive a task
  resample whole); this is said wherever it is used.
- **Permutations within blocks** (the ANOVAs): see ``analysis.anovas``.

Intervals are percentile intervals of ``resamples`` draws (default 1000); a resample in which a statistic
cannot be computed (fewer than three distinct units, a constant column) is left out, and how many were used is
reported. Weighted correlations replicate each unit by its integer weight.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def task_weights(unit_tasks: Sequence[Sequence[str]], resamples: int, seed: int) -> np.ndarray:
    """[resamples, units] integer weights of the task bootstrap (see the module docstring)."""
    tasks = sorted({t for ts in unit_tasks for t in ts})
    at = {t: i for i, t in enumerate(tasks)}
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(tasks), [1 / len(tasks)] * len(tasks), size=resamples)  # [B, T]
    w = np.ones((resamples, len(unit_tasks)), dtype=np.int64)
    for u, ts in enumerate(unit_tasks):
        for t in dict.fromkeys(ts):
            w[:, u] *= counts[:, at[t]]
    return w


def unit_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] weights of the plain bootstrap of n units."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, [1 / n] * n, size=resamples)


def weighted_corrs(x: np.ndarray, y: np.ndarray, W: np.ndarray, kind: str) -> np.ndarray:
    """Pearson or Spearman correlation of x and y under each row of integer weights W [B, n] (each point counted
    w times; ties in Spearman share their mid-rank): [B], NaN where fewer than three points remain or a side is
    constant."""
    W = np.atleast_2d(W).astype(float)
    if kind == "spearman":
        x, y = _weighted_ranks(x, W), _weighted_ranks(y, W)
    else:
        x, y = np.broadcast_to(x, W.shape), np.broadcast_to(y, W.shape)
    sw = W.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = x - (W * x).sum(1, keepdims=True) / sw
        dy = y - (W * y).sum(1, keepdims=True) / sw
        sxx, syy = (W * dx * dx).sum(1), (W * dy * dy).sum(1)
        r = (W * dx * dy).sum(1) / np.sqrt(sxx * syy)
    on = W > 0
    const_x = np.where(on, x, np.inf).min(1) == np.where(on, x, -np.inf).max(1)
    const_y = np.where(on, y, np.inf).min(1) == np.where(on, y, -np.inf).max(1)
    r[(on.sum(1) < 3) | const_x | const_y] = np.nan
    return np.clip(r, -1, 1)


def _weighted_ranks(v: np.ndarray, W: np.ndarray) -> np.ndarray:
    """[B, n] mid-ranks of v as if each value were repeated W[b] times (a tied block shares its mean rank)."""
    order = np.argsort(v, kind="stable")
    vs = v[order]
    first = np.concatenate([[True], vs[1:] != vs[:-1]])
    block = np.cumsum(first) - 1  # block of each sorted position
    starts = np.flatnonzero(first)
    bw = np.add.reduceat(W[:, order], starts, axis=1)  # [B, blocks]
    before = np.cumsum(bw, axis=1) - bw
    rank_of_block = before + (bw + 1) / 2
    out = np.empty_like(W)
    out[:, order] = rank_of_block[:, block]
    return out


def weighted_corr(x: np.ndarray, y: np.ndarray, w: np.ndarray, kind: str) -> float | None:
    """One weighted correlation (see ``weighted_corrs``); None where it cannot be computed."""
    r = float(weighted_corrs(np.asarray(x, float), np.asarray(y, float), np.asarray(w)[None, :], kind)[0])
    return None if math.isnan(r) else r


def interval(values: Sequence[float | None], level: float = LEVEL) -> dict:
    """The percentile interval of the resampled values that could be computed."""
    v = np.array([x for x in values if x is not None and math.isfinite(x)])
    if len(v) < 0.5 * len(values) or len(v) < 20:
        return {"ci": None, "resamples_used": int(len(v))}
    a = (1 - level) / 2
    return {"ci": [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))], "resamples_used": int(len(v))}


def correlation_intervals(entries: Sequence[tuple[int, float, float]], weights: np.ndarray,
                          others: dict[str, Sequence[tuple[int, float, float]]] | None = None) -> dict:
    """Pearson and Spearman of (prediction, truth) entries, each tagged with its unit index, with bootstrap
    intervals from ``weights`` [resamples, units]; for each of ``others`` (other predictions of the same
    units, e.g. baselines), its own correlations and intervals and the interval of (``entries``' correlation −
    its correlation) on the same resamples (paired)."""
    def arrays(es):
        u = np.array([e[0] for e in es], dtype=np.int64)
        return u, np.array([e[1] for e in es], float), np.array([e[2] for e in es], float)

    def point_and_draws(es):
        u, x, y = arrays(es)
        out = {}
        for kind in ("pearson", "spearman"):
            if not len(u):
                out[kind] = (None, [None] * len(weights))
                continue
            point = weighted_corr(x, y, np.ones(len(u), dtype=np.int64), kind)
            draws = weighted_corrs(x, y, weights[:, u], kind)
            out[kind] = (point, [None if math.isnan(d) else float(d) for d in draws])
        return out

    main = point_and_draws(entries)
    res = {"n": len(entries)}
    for kind, (point, draws) in main.items():
        iv = interval(draws)
        res[kind], res[f"{kind}_ci"] = point, iv["ci"]
    res["resamples_used"] = interval(main["pearson"][1])["resamples_used"]
    res["others"] = {}
    for name, es in (others or {}).items():
        got = point_and_draws(es)
        o = {"n": len(es)}
        for kind, (point, draws) in got.items():
            o[kind], o[f"{kind}_ci"] = point, interval(draws)["ci"]
            diffs = [a - b if a is not None and b is not None else None for a, b in zip(main[kind][1], draws)]
            o[f"predictor_minus_{kind}_ci"] = interval(diffs)["ci"]
        res["others"][name] = o
    return res


def permutation_p(stat: Callable[[np.ndarray], float | None], observed: float | None,
                  permute: Callable[[np.random.Generator], np.ndarray], permutations: int, seed: int) -> float | None:
    """The permutation p-value (1 + #{T* ≥ T}) / (1 + B) of a statistic whose large values are evidence, B
    relabellings drawn by ``permute``."""
    if observed is None:
        return None
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        t = stat(permute(rng))
        hits += t is not None and t >= observed - 1e-12 * abs(observed)
    return (1 + hits) / (1 + permutations)
