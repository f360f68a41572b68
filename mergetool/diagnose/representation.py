"""Representation geometry of a group of updates ("Task-level model-merging collapse", section 3.4): hidden
states on a shared validation set, HiddenSim (eq. 2), the merging difficulty score MDS (eq. 3), the
hidden-state diameter and the distortion bounds of Theorem 1, the mergeability test of Corollary 1, and task
selection by MDS (appendix E.4).

Hidden states: the last layer's (after the final norm, the input of the output layer) at the last token of
each prompt (``pool="last"``, the state that produces the answer; ``"mean"`` averages over the prompt's
tokens); the paper does not say how it pools. The validation set X_G holds k examples of every task of the
group, so it changes with the group; every model runs on all of it.

- d_ij = mean over x ∈ X_G of ‖h_i(x) − h_j(x)‖₂ / √d (the paper's "normalized" L2; any constant cancels in
  HiddenSim), and d²_ij = mean ‖h_i(x) − h_j(x)‖₂², Theorem 1's squared distance (not d_ij²).
- HiddenSim(i, j) = (max D − d_ij) / (max D − min D) over the group's pairs, 1 on the diagonal (all 1 when the
  pairs are equidistant, flagged ``degenerate``). MDS_i = 1 / mean_{j≠i} HiddenSim(i, j) (∞ → None).
- Theorem 1, with d the hidden size and Δ² = max d²_ij: every merge's worst-case distortion
  δ_max = max_i mean_x ‖h_merged(x) − h_i(x)‖² is at least Δ²/4; the paper's bound for some convex merge is
  d/(2(d+1))·Δ². mergetool also computes the exact lower bound r² = max over the simplex of ½ αᵀ D₂ α (the
  squared radius of the smallest ball around the experts' hidden maps, which every merge's δ_max exceeds,
  and Δ²/4 ≤ r² ≤ (N−1)/(2N)·Δ²), with its weights α*: under linearity of h in θ, the merge Σ α*_i ΔW_i
  reaches r².
- Corollary 1 for a budget D: the paper's test d/(2(d+1))·Δ² ≤ D, and a verdict that does not overstate it:
  ``no`` when r² > D (no merge can meet D), ``yes_if_linear`` otherwise.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from ..examples import Example


def validation_set(examples: list[Example], tasks: Sequence[str], k: int, seed: int) -> dict[str, list[int]]:
    """k examples of each task (held out: not split=train), drawn with ``seed``; per task, example indices."""
    out = {}
    for t in dict.fromkeys(tasks):
        idx = [i for i, e in enumerate(examples) if e.task == t and e.rec.get("split") != "train"]
        rng = random.Random(f"{seed}:{t}")
        out[t] = sorted(rng.sample(idx, min(k, len(idx))))
    return out


def pooled(states: list[torch.Tensor], pool: str) -> torch.Tensor:
    """[len, d] last-layer states of each sequence -> [n_seqs, d]."""
    if pool == "last":
        return torch.stack([s[-1] for s in states])
    return torch.stack([s.mean(0) for s in states])


class Geometry:
    """Hidden states H [n, X, d] of n models on X inputs, grouped by task (``blocks``: task -> input indices),
    with per-task pair sums so that any group's distances are exact without another forward pass."""

    def __init__(self, H: torch.Tensor, blocks: dict[str, list[int]]):
        self.H, self.blocks = H.double(), blocks
        self.d = H.shape[-1]
        self.s1, self.s2 = {}, {}
        for t, idx in blocks.items():
            h = self.H[:, idx]  # [n, x, d]
            norms = h.pow(2).sum(-1)  # [n, x]
            sq = (norms[:, None] + norms[None, :] - 2 * torch.einsum("ixd,jxd->ijx", h, h)).clamp_min(0)
            sq.diagonal(0, 0, 1).zero_()
            self.s1[t] = sq.sqrt().sum(-1)
            self.s2[t] = sq.sum(-1)

    def distances(self, members: Sequence[int], tasks: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(d, d²) of the members over the inputs of ``tasks``: [m, m] each."""
        idx = torch.tensor(list(members))
        ts = list(dict.fromkeys(tasks))
        count = sum(len(self.blocks[t]) for t in ts)
        s1 = sum(self.s1[t] for t in ts)[idx][:, idx]
        s2 = sum(self.s2[t] for t in ts)[idx][:, idx]
        return s1 / count / math.sqrt(self.d), s2 / count


def hidden_sim(dist: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """HiddenSim (eq. 2) of a group's distance matrix; degenerate (all 1) when max D = min D."""
    n = dist.shape[0]
    off = dist[~torch.eye(n, dtype=torch.bool)]
    if n < 2:
        return torch.ones((n, n), dtype=torch.float64), True
    hi, lo = float(off.max()), float(off.min())
    if hi - lo <= 1e-12 * max(hi, 1e-300):
        return torch.ones((n, n), dtype=torch.float64), True
    sim = (hi - dist) / (hi - lo)
    sim.fill_diagonal_(1.0)
    return sim, False


def mds(sim: torch.Tensor) -> list[float | None]:
    """MDS_i = 1 / mean_{j≠i} HiddenSim(i, j) (eq. 3); None where that mean is 0 (infinite difficulty)."""
    n = sim.shape[0]
    out = []
    for i in range(n):
        m = (float(sim[i].sum()) - float(sim[i, i])) / max(n - 1, 1)
        out.append(1.0 / m if m > 0 else None)
    return out


def meb(d2: torch.Tensor, iters: int = 100000, tol: float = 1e-13) -> tuple[float, list[float]]:
    """r² = max_{α ∈ simplex} ½ αᵀ D₂ α and its α* (the smallest enclosing ball of the hidden maps): a concave
    maximisation (D₂ is a Euclidean distance matrix), solved by pairwise Frank-Wolfe (mass moves from the
    active vertex of the smallest gradient to the vertex of the largest) with exact line search, which converges
    linearly on the simplex; it stops when the two gradients agree to ``tol`` (the KKT conditions)."""
    import numpy as np

    D = d2.double().cpu().numpy()
    n = D.shape[0]
    if n == 1:
        return 0.0, [1.0]
    a = np.full(n, 1.0 / n)
    g = D @ a  # gradient of ½ αᵀDα
    for _ in range(iters):
        j = int(g.argmax())
        active = np.flatnonzero(a > 0)
        i = int(active[g[active].argmin()])
        gap = g[j] - g[i]
        if i == j or gap <= tol * max(float(a @ g), 1e-300):
            break
        curv = D[j, j] + D[i, i] - 2 * D[i, j]  # dᵀDd for d = e_j − e_i (≤ 0: the objective is concave there)
        step = a[i] if curv >= 0 else min(a[i], gap / -curv)
        a[j] += step
        a[i] -= step
        if a[i] <= 1e-18:
            a[i] = 0.0
        g += step * (D[:, j] - D[:, i])
    a = a / a.sum()
    return 0.5 * float(a @ D @ a), a.tolist()


def theorem1(d2: torch.Tensor, hidden_dim: int, names: Sequence[str]) -> dict:
    """Δ² and the bounds of Theorem 1, with the exact r² and α* (see the module docstring)."""
    n = d2.shape[0]
    off = d2.clone()
    off.fill_diagonal_(-1.0)
    k = int(off.argmax())
    delta2 = max(float(off.max()), 0.0)
    r2, alpha = meb(d2)
    return {"hidden_dim": hidden_dim, "n_models": n, "diameter2": delta2,
            "diameter_pair": [names[k // n], names[k % n]] if n > 1 else None,
            "lower_bound": delta2 / 4, "upper_bound_paper": hidden_dim / (2 * (hidden_dim + 1)) * delta2,
            "upper_bound_jung": (n - 1) / (2 * n) * delta2, "meb_radius2": r2,
            "jung_weights": dict(zip(names, alpha))}


def group_record(geo: Geometry, members: Sequence[int], names: Sequence[str], tasks: Sequence[str], name: str) -> dict:
    """A ``group`` record: the members' MDS within the group, and Theorem 1's quantities, over the validation
    inputs of the group's own tasks."""
    ts = [tasks[i] for i in members]
    dist, d2 = geo.distances(members, ts)
    sim, degenerate = hidden_sim(dist)
    who = [names[i] for i in members]
    return {"kind": "group", "group": name, "adapters": who, "tasks": sorted(set(ts)),
            "n_inputs": sum(len(geo.blocks[t]) for t in set(ts)), "degenerate": degenerate,
            "mds": dict(zip(who, mds(sim))), **theorem1(d2, geo.d, who)}


BOUNDS = ("lower_bound", "meb_radius2", "upper_bound_jung", "upper_bound_paper")


def merge_record(merged, group: dict, delta: dict[str, float], budget: float | None = None) -> dict:
    """A ``merge`` record: the measured distortion δ_i of each member under one merge, δ_max, and whether each
    bound of Theorem 1 holds for it: the lower bounds Δ²/4 and r² (δ_max ≥ them for every merge: a failure
    would be an error of measurement) and the upper bounds of Jung and of the paper (δ_max ≤ them: what the
    best convex merge achieves under linearity; an actual merge may or may not). ``holds`` compares with a
    relative tolerance of 1e-9 of Δ²."""
    worst = max(delta, key=delta.__getitem__)
    dmax = delta[worst]
    tol = 1e-9 * max(group["diameter2"], 1e-300)
    out = {"kind": "merge", "merged": merged.name, "method": merged.meta.get("method"), "group": group["group"],
           "adapters": group["adapters"], "tasks": group["tasks"], "n_inputs": group["n_inputs"], "distortion": delta,
           "distortion_max": dmax, "distortion_argmax": worst, "distortion_excess": dmax - group["meb_radius2"],
           **{k: group[k] for k in ("diameter2",) + BOUNDS},
           "holds": {"lower_bound": dmax >= group["lower_bound"] - tol, "meb_radius2": dmax >= group["meb_radius2"] - tol,
                     "upper_bound_jung": dmax <= group["upper_bound_jung"] + tol,
                     "upper_bound_paper": dmax <= group["upper_bound_paper"] + tol}}
    if budget is not None:
        out.update(budget=budget, met=dmax <= budget)
    return out


def distortion(Hm: torch.Tensor, H: torch.Tensor) -> list[float]:
    """δ_i = mean_x ‖h_merged(x) − h_i(x)‖² for each expert (Hm [X, d], H [n, X, d])."""
    return (H.double() - Hm.double()[None]).pow(2).sum(-1).mean(-1).tolist()


def verdict(budget: float, t1: dict) -> dict:
    """Corollary 1 for a distortion budget: the paper's test, and what can actually be concluded."""
    return {"budget": budget, "mergeable_paper": t1["upper_bound_paper"] <= budget,
            "verdict": "no" if t1["meb_radius2"] > budget else "yes_if_linear"}


def select(geo: Geometry, group: list[int], candidates: list[int], task_of: Sequence[str], size: int,
           names: Sequence[str]) -> dict:
    """Appendix E.4 made an algorithm: while the group is larger than ``size``, drop its highest-MDS member;
    then replace its highest-MDS member by the candidate that gives the lowest worst MDS (ties: lower mean MDS),
    and repeat while that lowers the worst MDS. Every group's MDS is recomputed on its own validation set."""

    def worst(g):
        d, _ = geo.distances(g, [task_of[i] for i in g])
        m = mds(hidden_sim(d)[0])
        ms = [float("inf") if x is None else x for x in m]
        return max(ms), sum(ms) / len(ms), ms

    g = list(group)
    before = worst(g)
    steps = []
    while len(g) > size:
        _, _, ms = worst(g)
        drop = g[max(range(len(g)), key=ms.__getitem__)]
        g.remove(drop)
        steps.append({"drop": names[drop]})
    while True:
        w, mean, ms = worst(g)
        out_i = max(range(len(g)), key=ms.__getitem__)
        best = None
        for c in candidates:
            if c in g:
                continue
            trial = g[:out_i] + [c] + g[out_i + 1:]
            cw, cm, _ = worst(trial)
            if best is None or (cw, cm) < best[0]:
                best = ((cw, cm), c, trial)
        if best is None or best[0] >= (w, mean):
            break
        steps.append({"replace": names[g[out_i]], "with": names[best[1]], "worst_mds": best[0][0],
                      "mean_mds": best[0][1]})
        g = best[2]
    after = worst(g)
    return {"group": [names[i] for i in g], "worst_mds_before": before[0], "worst_mds_after": after[0],
            "mean_mds_before": before[1], "mean_mds_after": after[1], "steps": steps}
