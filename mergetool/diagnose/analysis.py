"""Statistics over joined records: the metrics diagnose computes against measured mergeability, as the
papers test them.

- Against scores (``--scores``: ``score`` records): the Pearson and Spearman correlation, with p-values, of
  every per-adapter metric with S, and each metric's mean ± standard error per bin of S.
- Against merging losses (``--losses``: one record per member of a merged group, see docs/formats.md):
  the merging-loss table (the collapse paper's Table 2); two one-way ANOVAs of the loss, by merge method
  and by task (its Table 3), and a two-way additive ANOVA (method + task), which the paper does not run but
  which separates the two factors; each pair metric against the pair's loss (the mean of its two members'),
  per method (Table 4); MDS against each member's best loss over methods, per group (Table 5).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from ..errors import MergetoolError
from ..jsonl import read_jsonl
from ..stats import anova, binned, correlate


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_losses(src: str) -> list[dict]:
    """Merging-loss records: ``group`` (a name), ``adapters`` (the group's members), ``method``, ``adapter`` (the
    member), ``task``, and ``loss`` (or ``merged`` and ``alone``, from which L = (merged/alone − 1)·100)."""
    out = []
    name = "<stdin>" if src == "-" else src
    for i, r in enumerate(read_jsonl(src), 1):
        where = f"{name}:{i}"
        members = r.get("adapters")
        if not isinstance(members, list) or not members or not all(isinstance(a, str) for a in members) or \
                not isinstance(r.get("adapter"), str) or not isinstance(r.get("method"), str):
            raise MergetoolError(where, "a loss record needs 'adapters' (a list of names), 'adapter' and 'method'",
                                 "see docs/formats.md (merging-loss records)")
        if r["adapter"] not in members:
            raise MergetoolError(where, f"'adapter' {r['adapter']!r} is not one of its 'adapters'", "fix the record")
        loss = r.get("loss")
        if loss is None and _number(r.get("merged")) and _number(r.get("alone")):
            loss = (r["merged"] / r["alone"] - 1) * 100 if r["alone"] else None
        if loss is not None and not (_number(loss) and math.isfinite(loss)):
            raise MergetoolError(where, f"'loss' must be a finite number, got {loss!r}", "fix the record")
        out.append({**r, "loss": loss, "group": r.get("group") or ",".join(sorted(r["adapters"])),
                    "task": r.get("task") or r["adapter"]})
    return out


def check_joins(scores: dict | None, losses: list[dict] | None, names: list[str], everyone: list[str],
                representations: bool) -> None:
    """The joins of score and loss records with the adapters diagnosed (``everyone``: with the candidates): records
    that match no adapter (no pair, no group) are an error that says so, never an empty table. ``diagnose``
    checks them first; the command calls it before it loads a model, so a bad join costs nothing."""
    if scores is not None and not any(n in scores for n in names):
        raise MergetoolError("--scores", "no adapter of the score records is among the adapters diagnosed",
                             "score the same adapters (their names must match)")
    if losses is None:
        return
    known, pairs = set(names), {tuple(sorted(r["adapters"])) for r in losses if len(r["adapters"]) == 2}
    if pairs and not any(set(p) <= known for p in pairs):
        raise MergetoolError("--losses", "no merged pair is a pair of the adapters diagnosed",
                             "diagnose the adapters the pairs were merged from")
    groups = [set(r["adapters"]) for r in losses if len(r["adapters"]) >= 3]
    if representations and groups and not any(g <= set(everyone) for g in groups):
        raise MergetoolError("--losses", "no merged group of three or more is a group of the adapters diagnosed",
                             "diagnose (with --base and --data) the adapters the groups were merged from")


def score_stats(records: list[dict], scores: dict[str, dict], metrics: Sequence[str]) -> list[dict]:
    """Each metric of the per-adapter ``records`` against S from ``scores`` (joined by adapter name; ``check_joins``
    has made sure that some match)."""
    joined = [{**r, "score": scores[r["adapter"]]["score"]} for r in records if r["adapter"] in scores]
    trials = next(iter(scores.values())).get("trials")
    out = []
    for m in metrics:
        c = correlate([r.get(m) for r in joined], [r["score"] for r in joined])
        out.append({"kind": "stat", "test": "correlation", "x": m, "y": "score", **c})
    bins = binned(joined, "score", list(metrics), trials if isinstance(trials, int) else None)
    out.append({"kind": "stat", "test": "binned", "y": "score", "bins": bins})
    return out


def loss_table(losses: list[dict]) -> list[dict]:
    """The merging-loss table: per group and method, each member's loss and their mean."""
    out = []
    for (g, m), rs in _groupby(losses, lambda r: (r["group"], r["method"])).items():
        vals = [r["loss"] for r in rs if r["loss"] is not None]
        out.append({"kind": "stat", "test": "merging_loss", "group": g, "method": m, "n_members": len(rs),
                    "losses": {r["task"]: r["loss"] for r in rs},
                    "mean_loss": sum(vals) / len(vals) if vals else None})
    return out


def anovas(losses: list[dict]) -> list[dict]:
    """One-way ANOVAs of the loss by method and by task (the paper's Table 3), and a two-way additive ANOVA."""
    cells = [r for r in losses if r["loss"] is not None]
    out = []
    for factor in ("method", "task"):
        groups: dict[str, list[float]] = {}
        for r in cells:
            groups.setdefault(r[factor], []).append(r["loss"])
        out.append({"kind": "stat", "test": "anova1", "factor": factor, "n": len(cells), **anova(groups)})
    out.append({"kind": "stat", "test": "anova2", "factors": ["method", "task"], **anova2(cells, "method", "task")})
    return out


def anova2(cells: list[dict], a: str, b: str) -> dict:
    """Two-way additive ANOVA by least squares: each factor's F-test given the other (type II)."""
    import numpy as np
    from scipy import stats

    la = sorted({r[a] for r in cells})
    lb = sorted({r[b] for r in cells})
    y = np.array([r["loss"] for r in cells], dtype=float)
    if len(la) < 2 or len(lb) < 2 or len(y) <= len(la) + len(lb) - 1:
        return {"F": None, "p_value": None}

    def design(levels_a, levels_b):
        cols = [np.ones(len(cells))]
        cols += [np.array([r[a] == v for r in cells], float) for v in levels_a[1:]]
        cols += [np.array([r[b] == v for r in cells], float) for v in levels_b[1:]]
        return np.stack(cols, 1)

    def rss(X):
        beta, *_ = np.linalg.lstsq(X, y, rcond=None)
        return float(((y - X @ beta) ** 2).sum())

    full = rss(design(la, lb))
    dof = len(y) - (len(la) + len(lb) - 1)
    out = {"n": len(y), "df_residual": dof}
    for name, red, df in ((a, design(la[:1], lb), len(la) - 1), (b, design(la, lb[:1]), len(lb) - 1)):
        F = ((rss(red) - full) / df) / (full / dof) if full > 0 else None
        out[name] = {"F": F, "df": df, "p_value": float(stats.f.sf(F, df, dof)) if F is not None else None}
    return out


def pair_stats(losses: list[dict], pairs: dict[tuple[str, str], dict], metrics: Sequence[str]) -> list[dict]:
    """Each pair metric against the pair's loss (mean of its two members'), per method, over the merged pairs."""
    out = []
    by = _groupby([r for r in losses if len(r["adapters"]) == 2], lambda r: (r["method"], tuple(sorted(r["adapters"]))))
    per_method: dict[str, list[tuple[dict, float]]] = {}
    for (method, key), rs in by.items():
        vals = [r["loss"] for r in rs if r["loss"] is not None]
        if key in pairs and len(vals) == 2:
            per_method.setdefault(method, []).append((pairs[key], sum(vals) / 2))
    if not per_method and any(len(r["adapters"]) == 2 for r in losses):
        raise MergetoolError("--losses", "no merged pair of the adapters diagnosed has a loss for each of its two "
                             "members (one record per member and method)", "give both members' records")
    for method, xs in per_method.items():
        for m in metrics:
            c = correlate([p.get(m) for p, _ in xs], [y for _, y in xs])
            out.append({"kind": "stat", "test": "correlation", "x": m, "y": "pair_loss", "method": method, **c})
    return out


def mds_stats(losses: list[dict], mds_of: dict[str, dict[str, float | None]]) -> list[dict]:
    """Per group (of three or more): MDS of each member against its best loss over the methods."""
    out = []
    for g, rs in _groupby([r for r in losses if len(r["adapters"]) >= 3], lambda r: r["group"]).items():
        if g not in mds_of:
            continue
        best: dict[str, float] = {}
        for r in rs:
            if r["loss"] is not None:
                best[r["adapter"]] = max(best.get(r["adapter"], -math.inf), r["loss"])
        names = [n for n in best if mds_of[g].get(n) is not None]
        c = correlate([mds_of[g][n] for n in names], [best[n] for n in names])
        out.append({"kind": "stat", "test": "correlation", "x": "mds", "y": "best_loss", "group": g, **c})
    return out


def _groupby(rows: Iterable[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out
