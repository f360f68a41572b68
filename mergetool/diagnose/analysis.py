"""Statistics over joined records: the metrics diagnose computes against measured mergeability, as the
papers test them.

- Against scores (``--scores``: ``score`` records): the Pearson and Spearman correlation, with p-values, of
  every per-adapter metric with S, and each metric's mean ± standard error per bin of S.
- Against merging losses (``--losses``: one record per member of a merged group, see docs/formats.md):
  the merging-loss table (the collapse paper's Table 2); two one-way ANOVAs of the loss, by merge method
  and by task (its Table 3), and a two-way additive ANOVA (method + task), which the paper does not run but
  which separates the two factors, each with its F-test p-value and a permutation p-value that respects the
  design (see ``anovas``); each pair metric against the pair's loss (the mean of its two members'), per
  method (Table 4); MDS against each member's best loss over methods, per group (Table 5); Theorem 1 against
  the measured merges (``theorem_stats``).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from ..errors import MergetoolError
from ..jsonl import read_jsonl
from ..stats import anova, binned, correlate, mantel_test
from . import resample


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
        if loss is None and _number(r.get("merged")) and _number(r.get("alone")) and r["alone"]:
            loss = (r["merged"] / r["alone"] - 1) * 100
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


PERMUTATIONS = 999


def anovas(losses: list[dict], seed: int = 0, permutations: int = PERMUTATIONS) -> list[dict]:
    """One-way ANOVAs of the loss by method and by task (the paper's Table 3), and a two-way additive ANOVA
    (each factor given the other), each with the F-test's p-value and a permutation p-value.

    The cells (one loss per member, group and method) are not independent: the members of one merge share it,
    the merges of one group share its tasks, and a task recurs in many groups; the F-tests' p-values assume
    independence and are kept only to compare with the paper. The permutation tests respect the design: for
    the method, the method labels are permuted among each group's merges (every member of a merge moves with
    it), which keeps each group's tasks and each merge's shared effect; for the task, the task labels are
    permuted among each group's members, the same way under every method. Each is exact under its null (no
    method effect; no task effect) whatever the dependence inside a group; the statistic is the same F."""
    from scipy import stats

    cells = [r for r in losses if r["loss"] is not None]
    d = _Design(cells)
    out = []
    for factor in ("method", "task"):
        groups: dict[str, list[float]] = {}
        for r in cells:
            groups.setdefault(r[factor], []).append(r["loss"])
        res = anova(groups)
        res["p_permutation"] = resample.permutation_p(lambda codes: d.oneway(codes), d.oneway(d.codes[factor]),
                                                     lambda rng: d.permuted(factor, rng), permutations, seed)
        out.append({"kind": "stat", "test": "anova1", "factor": factor, "n": len(cells), **res,
                    "permutations": permutations, "permuted_within": "group"})
    two = {"kind": "stat", "test": "anova2", "factors": ["method", "task"], "n": len(cells),
           "permutations": permutations, "permuted_within": "group"}
    for factor, other in (("method", "task"), ("task", "method")):
        F, df, dof = d.given(d.codes[factor], d.codes[other]) if cells else (None, None, None)
        two[factor] = {"F": F, "df": df, "p_value": float(stats.f.sf(F, df, dof)) if F is not None else None,
                       "p_permutation": resample.permutation_p(
                           lambda codes, o=other: d.given(codes, d.codes[o])[0], F,
                           lambda rng, f=factor: d.permuted(f, rng), permutations, seed)}
        two["df_residual"] = dof
    out.append(two)
    return out


class _Design:
    """The loss cells as arrays, with the F statistics and the relabellings of ``anovas``."""

    def __init__(self, cells: list[dict]):
        import numpy as np

        self.y = np.array([r["loss"] for r in cells], float)
        self.codes, self.levels = {}, {}
        for f in ("method", "task", "group"):
            lv = sorted({r[f] for r in cells})
            self.levels[f] = lv
            at = {v: i for i, v in enumerate(lv)}
            self.codes[f] = np.array([at[r[f]] for r in cells], dtype=np.int64)
        g = self.codes["group"]
        self.blocks = {f: [(np.flatnonzero(g == b), sorted(set(self.codes[f][g == b].tolist())))
                           for b in range(len(self.levels["group"]))] for f in ("method", "task")}

    def permuted(self, factor: str, rng):
        """The factor's codes with its labels permuted inside each group (one permutation per group)."""
        import numpy as np

        codes = self.codes[factor].copy()
        for rows, labels in self.blocks[factor]:
            if len(labels) > 1:
                to = dict(zip(labels, rng.permutation(labels).tolist()))
                codes[rows] = np.array([to[c] for c in self.codes[factor][rows]])
        return codes

    def oneway(self, codes) -> float | None:
        import numpy as np

        if not len(codes):
            return None
        k = int(codes.max()) + 1
        n = np.bincount(codes, minlength=k).astype(float)
        use = n > 0
        levels, N = int(use.sum()), len(self.y)
        if levels < 2 or N <= levels:
            return None
        means = np.bincount(codes, weights=self.y, minlength=k)[use] / n[use]
        ssb = float((n[use] * (means - self.y.mean()) ** 2).sum())
        ssw = float(((self.y - (np.bincount(codes, weights=self.y, minlength=k) / np.maximum(n, 1))[codes]) ** 2).sum())
        return (ssb / (levels - 1)) / (ssw / (N - levels)) if ssw > 0 else None

    def given(self, codes, other) -> tuple[float | None, int | None, int | None]:
        """The type II F of ``codes``'s factor given ``other``'s in the additive model, with its degrees of
        freedom: both sides residualised on the other factor's level means (its projection; Frisch-Waugh),
        then least squares."""
        import numpy as np

        def resid(M):
            k = int(other.max()) + 1
            cnt = np.maximum(np.bincount(other, minlength=k), 1)
            if M.ndim == 1:
                return M - (np.bincount(other, weights=M, minlength=k) / cnt)[other]
            return M - np.stack([np.bincount(other, weights=M[:, j], minlength=k) / cnt
                                 for j in range(M.shape[1])], 1)[other]

        yr = resid(self.y)
        D = np.zeros((len(codes), int(codes.max()) + 1))
        D[np.arange(len(codes)), codes] = 1
        Dr = resid(D)
        beta, _, rank, _ = np.linalg.lstsq(Dr, yr, rcond=1e-10)
        rss_other = float(yr @ yr)
        rss_full = float(((yr - Dr @ beta) ** 2).sum())
        dof = len(self.y) - int(rank) - len(np.unique(other))
        if rank < 1 or dof < 1 or rss_full <= 0:
            return None, None, None
        return ((rss_other - rss_full) / rank) / (rss_full / dof), int(rank), dof


def numeric_fields(rows: list[dict]) -> list[str]:
    """The fields that hold a number in some row, in order of appearance."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if _number(v))
    return [k for k in keys if any(r.get(k) is not None for r in rows)]


def pair_losses(losses: list[dict], method: str | None) -> dict[tuple[str, str], float]:
    """Each merged pair's loss (the mean of its two members'), for ``method`` or averaged over the methods;
    pairs where a member has no loss (null, or alone = 0) are left out."""
    by: dict[tuple, dict[str, list]] = {}
    for r in losses:
        if len(r["adapters"]) == 2 and (method is None or r["method"] == method):
            by.setdefault(tuple(sorted(r["adapters"])), {}).setdefault(r["method"], []).append(r["loss"])
    out = {}
    for key, per in by.items():
        means = [sum(v) / 2 for v in per.values() if len(v) == 2 and all(x is not None for x in v)]
        if means:
            out[key] = sum(means) / len(means)
    return out


def pair_stats(losses: list[dict], pairs: dict[tuple[str, str], dict], metrics: Sequence[str], seed: int = 0,
               permutations: int = 999) -> list[dict]:
    """Each pair metric against the pair's loss (mean of its two members'), per method, over the merged pairs: the
    Pearson and Spearman correlations with their plain p-values (which count the pairs as independent), and the
    Mantel permutation p-values (``stats.mantel_test``: the adapters' labels permuted, so pairs that share an
    adapter stay dependent as they are; ``*_p_mantel``), the ones to read when the pairs share adapters."""
    out = []
    methods = list(dict.fromkeys(r["method"] for r in losses if len(r["adapters"]) == 2))
    per_method = {m: [(pairs[k], v) for k, v in pair_losses(losses, m).items() if k in pairs] for m in methods}
    per_method = {m: xs for m, xs in per_method.items() if xs}
    if not per_method and methods:
        mine = [r for r in losses if len(r["adapters"]) == 2 and tuple(sorted(r["adapters"])) in pairs]
        if mine and all(r["loss"] is None for r in mine):
            raise MergetoolError("--losses", "every member of the merged pairs of the adapters diagnosed has no loss "
                                 "(a null loss, or 'alone' is 0: (merged/alone − 1)·100 is undefined)",
                                 "give 'loss', or the accuracies of experts that are above 0 alone")
        raise MergetoolError("--losses", "no merged pair of the adapters diagnosed has a loss for each of its two "
                             "members (one record per member and method)", "give both members' records")
    for method, xs in per_method.items():
        loss = pair_losses(losses, method)
        keys = list(pairs)  # every pair diagnosed: the Mantel test relabels all of them, a pair without a loss too
        for m in metrics:
            c = correlate([p.get(m) for p, _ in xs], [y for _, y in xs])
            t = mantel_test(keys, [pairs[k].get(m) for k in keys], [loss.get(k) for k in keys], permutations, seed)
            out.append({"kind": "stat", "test": "correlation", "x": m, "y": "pair_loss", "method": method, **c,
                        "units": t["units"], "pearson_p_mantel": t["pearson_p"], "spearman_p_mantel": t["spearman_p"],
                        "mantel": t["method"], "mantel_floor": t["floor"]})
    return out


def mds_stats(losses: list[dict], groups: list[dict]) -> list[dict]:
    """Per merged group of three or more whose ``group`` record (with its members' MDS) is at hand: MDS of each
    member against its best loss over the methods."""
    mds_of = {frozenset(g["adapters"]): g["mds"] for g in groups if g.get("mds")}
    out = []
    for g, rs in _groupby([r for r in losses if len(r["adapters"]) >= 3], lambda r: r["group"]).items():
        mds = mds_of.get(frozenset(rs[0]["adapters"]))
        if mds is None:
            continue
        best: dict[str, float] = {}
        for r in rs:
            if r["loss"] is not None:
                best[r["adapter"]] = max(best.get(r["adapter"], -math.inf), r["loss"])
        names = [n for n in best if mds.get(n) is not None]
        c = correlate([mds[n] for n in names], [best[n] for n in names])
        out.append({"kind": "stat", "test": "correlation", "x": "mds", "y": "best_loss", "group": g, **c})
    return out


def _groupby(rows: Iterable[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return out


REPRESENTATION = ("distortion_max", "distortion_excess", "meb_radius2", "diameter2", "mds_max", "mds_mean")


def theorem_stats(losses: list[dict], merges: list[dict], groups: list[dict], pairs: list[dict],
                  features: Sequence[str], weight_metrics: Sequence[str], seed: int = 0,
                  resamples: int = resample.RESAMPLES) -> list[dict]:
    """Theorem 1 against measured merges (``merge`` records joined with the loss records by members and method).

    - ``theorem1_bounds``, per method and over all: how often each bound holds for the measured δ_max.
    - ``group_correlation``, per method and size (``pairs``; ``groups`` of three or more): Pearson and Spearman,
      with bootstrap intervals, of the group's measured mean and worst member loss against the distortion
      (δ_max, and its excess over r²), r², Δ², the members' largest and mean MDS within the group, and the mean
      over the group's pairs of every pair metric (``pairs_mean_<metric>``).
    - ``theorem1_vs_weights``, per method and size: the representation quantity and the weight-space metric
      with the largest |Spearman ρ| against the worst loss, and the interval of the difference of their |ρ| on
      the same resamples (above 0: the representation side predicts better).
    Intervals resample tasks for pairs and groups for groups (``resample``)."""
    import numpy as np

    per: dict[tuple, dict[str, float | None]] = {}
    for r in losses:
        per.setdefault((frozenset(r["adapters"]), r["method"]), {})[r["adapter"]] = r["loss"]
    measured = {k: (sum(v.values()) / len(v), min(v.values())) for k, v in per.items()
                if len(v) == len(k[0]) and all(x is not None for x in v.values())}
    mds_of = {frozenset(g["adapters"]): g.get("mds") or {} for g in groups}
    by_pair = {tuple(sorted((p["a"], p["b"]))): p for p in pairs}
    out = []
    methods = list(dict.fromkeys(m.get("method") for m in merges))
    for method in methods + ["all"]:
        ms = [m for m in merges if method == "all" or m.get("method") == method]
        holds = {b: sum(bool(m["holds"][b]) for m in ms) for b in ms[0]["holds"]} if ms else {}
        out.append({"kind": "stat", "test": "theorem1_bounds", "method": method, "n": len(ms), "holds": holds,
                    "fraction": {b: v / len(ms) for b, v in holds.items()} if ms else {}})
    for method in methods:
        for size in ("pairs", "groups"):
            units = []
            for m in merges:
                key = (frozenset(m["adapters"]), m.get("method"))
                if m.get("method") != method or key not in measured or (len(key[0]) == 2) != (size == "pairs"):
                    continue
                mds = [v for v in mds_of.get(key[0], {}).values() if v is not None]
                x = {"distortion_max": m["distortion_max"], "distortion_excess": m["distortion_excess"],
                     "meb_radius2": m["meb_radius2"], "diameter2": m["diameter2"],
                     "mds_max": max(mds) if mds else None, "mds_mean": sum(mds) / len(mds) if mds else None}
                members = sorted(key[0])
                ps = [by_pair.get((a, b)) for i, a in enumerate(members) for b in members[i + 1:]]
                for f in features:
                    vals = [p.get(f) for p in ps if p is not None and p.get(f) is not None]
                    x[f"pairs_mean_{f}"] = sum(vals) / len(vals) if len(vals) == len(ps) else None
                units.append((m["tasks"], x, *measured[key]))
            if len(units) < 3:
                continue
            w = (resample.task_weights([u[0] for u in units], resamples, seed) if size == "pairs"
                 else resample.unit_weights(len(units), resamples, seed))
            unit = "task" if size == "pairs" else "group (conditional on the task set)"
            names = list(units[0][1])
            for yi, yname in ((2, "mean_loss"), (3, "worst_loss")):
                draws = {}
                for name in names:
                    es = [(i, u[1][name], u[yi]) for i, u in enumerate(units) if u[1][name] is not None]
                    res = resample.correlation_intervals(es, w)
                    res.pop("others")
                    out.append({"kind": "stat", "test": "group_correlation", "x": name, "y": yname, "method": method,
                                "size": size, "bootstrap": {"unit": unit, "resamples": resamples}, **res})
                    if yname == "worst_loss" and res["spearman"] is not None:
                        idx = np.array([e[0] for e in es])
                        vals = resample.weighted_corrs(np.array([e[1] for e in es], float),
                                                       np.array([e[2] for e in es], float), w[:, idx], "spearman")
                        draws[name] = (res["spearman"], vals)
                rep_side = [n for n in REPRESENTATION if n in draws]
                ws_side = [n for n in draws if n.startswith("pairs_mean_") and n[len("pairs_mean_"):] in weight_metrics]
                if yname == "worst_loss" and rep_side and ws_side:
                    a = max(rep_side, key=lambda n: abs(draws[n][0]))
                    b = max(ws_side, key=lambda n: abs(draws[n][0]))
                    diff = np.abs(draws[a][1]) - np.abs(draws[b][1])
                    out.append({"kind": "stat", "test": "theorem1_vs_weights", "method": method, "size": size,
                                "y": "worst_loss", "n": len(units), "representation": a, "spearman_representation": draws[a][0],
                                "weight_space": b, "spearman_weight_space": draws[b][0],
                                "abs_difference": abs(draws[a][0]) - abs(draws[b][0]),
                                "abs_difference_ci": resample.interval([None if math.isnan(d) else float(d) for d in diff])["ci"],
                                "bootstrap": {"unit": unit, "resamples": resamples}})
    return out
