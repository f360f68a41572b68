"""The merges that use data, as pure functions of the task vectors and of what the data gave: RegMean and
RegMean++ (the Grams of each linear module's inputs), Fisher merging (diagonal Fisher information), AdaMerging
(coefficients learned per task and module) and LoraHub (coefficients searched per task).

``mergetool.merging`` runs the model on the dev examples and puts its statistics in ``Params.stats``; the merge
is then computed here, module by module, like any other method (and written with the same metadata). Every
statistic is keyed by the update's module name.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from ..updates import LowRank
from . import primitives as P
from .base import Params, TaskVectors, register
from .families import _weighted_sum


def _stat(p: Params, key: str, method: str):
    if p.stats is None or key not in p.stats:
        raise UsageError("--data", f"{method} merges from statistics of the model on dev examples",
                         "pass --data DEV.jsonl and --base MODEL")
    return p.stats[key]


# ----------------------------------------------------------------------------- RegMean


class Normal:
    """RegMean's normal matrix S = Σ_i G̃_i of one input (q, k and v read the same one), factored once.
    ``right(i, M)`` is M G̃_i = α M G_i + (1 − α) M diag(G_i) and ``solve(N)`` is N S⁻¹ in fp64: by Cholesky, or the
    least-squares solution when S is singular (an input direction that no example ever excites). The scaled
    Grams G̃_i are never formed: S = α ΣG + (1 − α) diag(ΣG)."""

    def __init__(self, grams: torch.Tensor, alpha: float):
        self.G, self.alpha = grams.double(), alpha
        S = self.G.sum(0)
        if alpha != 1:
            S = alpha * S + (1 - alpha) * torch.diag(torch.diagonal(S))
        self.S = S
        L, info = torch.linalg.cholesky_ex(S)
        self.L = L if int(info) == 0 else None

    def right(self, i: int, M: torch.Tensor) -> torch.Tensor:
        out = M @ self.G[i]
        if self.alpha != 1:
            out = self.alpha * out + (1 - self.alpha) * M * torch.diagonal(self.G[i])
        return out

    def solve(self, N: torch.Tensor) -> torch.Tensor:
        if self.L is not None:
            return torch.cholesky_solve(N.T, self.L).T
        return torch.linalg.lstsq(self.S, N.T).solution.T


def regmean_dense(deltas: torch.Tensor, grams: torch.Tensor | Normal, alpha: float) -> torch.Tensor:
    """The RegMean formula on dense updates: ΔW* = (Σ_i ΔW_i G̃_i)(Σ_i G̃_i)⁻¹ (ΔW_i [n, out, in], G_i [n, in, in]),
    in fp64."""
    S = grams if isinstance(grams, Normal) else Normal(grams, alpha)
    return S.solve(sum(S.right(i, d.double()) for i, d in enumerate(deltas)))


def regmean_lora(parts: list[LowRank | None], grams: torch.Tensor | Normal, alpha: float) -> LowRank:
    """RegMean of LoRA updates as an exact LoRA, from the factors: with ΔW_i = s_i B_i A_i,
    ΔW* = Σ_i s_i B_i A_i G̃_i (Σ G̃)⁻¹ = [s_1 B_1 … s_n B_n] · [A_1 G̃_1; …; A_n G̃_n] (Σ G̃)⁻¹, rank Σ r_i. A task
    that does not change the module (None) adds its Gram to Σ G̃ only. Costs n·r·d² plus one factorisation of
    Σ G̃ (d³/3) instead of the dense formula's n·out·d² and its factorisation."""
    return regmean_loras([parts], grams if isinstance(grams, Normal) else Normal(grams, alpha))[0]


def regmean_loras(modules: list[list[LowRank | None]], S: Normal) -> list[LowRank]:
    """``regmean_lora`` of several modules that read the same input (q, k and v), together: each task's Gram is
    read once for all of them (one product per task of its stacked A's), and one solve takes every module's
    rows."""
    n = S.G.shape[0]
    A_of = [[(j, m.A.to(S.G.device, torch.float64)) for j, parts in enumerate(modules)
             if (m := parts[i]) is not None] for i in range(n)]
    rows: dict[tuple[int, int], torch.Tensor] = {}
    for i, As in enumerate(A_of):
        if As:
            prod = S.right(i, torch.cat([a for _, a in As], 0))
            at = 0
            for j, a in As:
                rows[(j, i)] = prod[at:at + a.shape[0]]
                at += a.shape[0]
    order = [(j, i) for j in range(len(modules)) for i in range(n) if (j, i) in rows]
    solved = S.solve(torch.cat([rows[k] for k in order], 0))
    out, at = [], 0
    for j, parts in enumerate(modules):
        have = [(i, m) for i, m in enumerate(parts) if m is not None]
        r = sum(m.rank for _, m in have)
        B = torch.cat([m.B.to(S.G.device, torch.float64) * m.scale for _, m in have], 1)
        out.append(LowRank(solved[at:at + r].float(), B.float(), 1.0))
        at += r
    return out


def _regmean(tv: TaskVectors, p: Params):
    """Per linear module with Grams: RegMean (from the factors when every task's update is a LoRA); modules
    without Grams (norms, biases, embeddings of a full model) take the mean, as fusion-bench does. Consecutive
    modules whose Grams are one tensor (they read one input: q, k, v) share one factorisation and one pass over
    the Grams."""
    grams = _stat(p, "grams", "regmean")
    group: list[str] = []

    def flush():
        G = grams[group[0]]
        S = Normal(G.to(tv.device), p.alpha)
        parts = [tv.parts(mod) for mod in group]
        if all(m is None or isinstance(m, LowRank) for ps in parts for m in ps):
            yield from zip(group, regmean_loras(parts, S))
        else:
            for mod in group:
                yield mod, regmean_dense(tv.stacked(mod), S, p.alpha).float()

    for mod in tv.modules:
        G = grams.get(mod)
        if group and (G is None or G is not grams[group[0]]):
            yield from flush()
            group = []
        if G is None or len(tv.shape(mod)) != 2:
            yield mod, tv.stacked(mod).mean(0)
            continue
        group.append(mod)
    if group:
        yield from flush()


register("regmean", "RegMean", "https://arxiv.org/abs/2212.09849",
         "Per linear module, ΔW* = (Σ ΔW_i G̃_i)(Σ G̃_i)⁻¹ with G_i the Gram of its inputs on task i's dev examples "
         "under expert i, off-diagonals scaled by --alpha; an exact LoRA from the factors.",
         options=("alpha", "lambda"), data=True)(_regmean)
register("regmean++", "RegMean++", "Nguyen et al. 2025, RegMean++ (fusion-bench: regmean_plusplus)",
         "RegMean layer by layer, each layer's inputs taken from the partially merged model (the layers below "
         "already merged), the modules inside a layer from expert i's own.",
         options=("alpha", "lambda"), data=True)(_regmean)


# ----------------------------------------------------------------------------- Fisher merging

FISHER_FLOOR = 1e-6  # fusion-bench's minimal_fisher_weight


def fisher_coefficients(fishers: dict[str, torch.Tensor], weights: list[float]) -> list[float]:
    """fusion-bench's normalised scaling (``normalize_fisher_weight``): c_i = (w_i / n) · u_i / Σ_j u_j with
    u_i = 1 / (‖F_i‖₂ + 1e-6), ‖F_i‖ over every module, so each task's Fisher counts at one scale."""
    n = len(weights)
    sq = [0.0] * n
    for F in fishers.values():
        for i in range(n):
            sq[i] += float(F[i].double().pow(2).sum())
    u = [1.0 / (s ** 0.5 + FISHER_FLOOR) for s in sq]
    return [w / n * x / sum(u) for w, x in zip(weights, u)]


@register("fisher", "Fisher merging", "https://arxiv.org/abs/2111.09832",
          "Σ c_i (F_i + 1e-6) ΔW_i / Σ c_i (F_i + 1e-6) with F_i the diagonal Fisher of the linear weights on task "
          "i's dev examples under expert i (c_i: --weights over n, each Fisher normalised to unit norm).",
          options=("weights", "lambda"), data=True)
def fisher(tv: TaskVectors, p: Params):
    """Matena and Raffel's diagonal-Fisher average in task-vector form (θ_0 cancels:
    Σ c_i F_i (θ_0 + τ_i) / Σ c_i F_i = θ_0 + Σ c_i F_i τ_i / Σ c_i F_i), with fusion-bench's floor and
    normalisation. Dense output (a per-entry weighting is not low rank); modules without a Fisher take the mean."""
    fishers = _stat(p, "fisher", "fisher")
    c = torch.tensor(fisher_coefficients(fishers, p.w(tv.n)), dtype=torch.float32, device=tv.device)
    for mod in tv.modules:
        D = tv.stacked(mod)
        if mod not in fishers:
            yield mod, D.mean(0)
            continue
        cw = c.view(-1, *([1] * (D.dim() - 1))) * (fishers[mod].to(tv.device, torch.float32) + FISHER_FLOOR)
        yield mod, (cw * D).sum(0) / cw.sum(0)


# ----------------------------------------------------------------------------- learned coefficients


@register("adamerging", "AdaMerging", "https://arxiv.org/abs/2310.02575",
          "Σ_i λ_{i,m} ΔW_i with the coefficients learned per task (and per module, layer-wise) by minimising the "
          "entropy of the merged model's predictions on the dev prompts; an exact LoRA.",
          options=("lambda",), data=True)
def adamerging(tv: TaskVectors, p: Params):
    coef = _stat(p, "coefficients", "adamerging")  # {module: [λ_1 … λ_n]}
    for mod in tv.modules:
        c = coef[mod]
        parts = tv.parts(mod)
        if all(m is None or isinstance(m, LowRank) for m in parts):
            yield mod, P.lora_sum([(ci, m) for ci, m in zip(c, parts) if m is not None], tv.device)
        else:
            D = tv.stacked(mod)
            yield mod, (D * torch.tensor(c, dtype=D.dtype, device=D.device).view(-1, *([1] * (D.dim() - 1)))).sum(0)


def _searched(p: Params, n: int) -> list[float]:
    return list(_stat(p, "weights", "lorahub"))


register("lorahub", "LoraHub", "https://arxiv.org/abs/2307.13269",
         "Σ w_i ΔW_i with the weights found by gradient-free search (CMA-ES, each generation in one batched pass) "
         "on the dev examples' answer loss plus LoraHub's L1 penalty; an exact LoRA.",
         options=("lambda",), coefficients=_searched, data=True)(_weighted_sum(_searched))
