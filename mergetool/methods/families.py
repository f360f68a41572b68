"""Every merge method, registered with its paper. Imported once by the registry."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UsageError
from ..weights import base_softmax
from . import primitives as P
from .base import Params, TaskVectors, register, weights_tensor

# ----------------------------------------------------------------------------- linear


def _weighted_sum(coef: Callable[[Params, int], list[float]]):
    def fn(tv: TaskVectors, p: Params):
        c = torch.tensor(coef(p, tv.n), dtype=torch.float32, device=tv.device)
        for mod in tv.modules:
            D = tv.stacked(mod)
            yield mod, (D * c.view(-1, *([1] * (D.dim() - 1)))).sum(0)

    return fn


def _mean_coef(p: Params, n: int) -> list[float]:
    return [1.0 / n] * n


def _linear_coef(p: Params, n: int) -> list[float]:
    return p.w(n)


def _weighted_base_coef(p: Params, n: int) -> list[float]:
    # Will it Merge? section 6: s_i = 1 - Acc_base(t_i); w_i = softmax(s_i / τ).
    if p.base_acc is None:
        raise UsageError("--base-acc", "weighted-base needs the base model's accuracy per task",
                         "pass --base-acc FILE (eval --summary records)")
    return base_softmax(p.base_acc, p.tau)


register("mean", "Mean", "https://arxiv.org/abs/2203.05482",
         "Average of the task vectors, (1/n) Σ ΔW_i (model soups).", coefficients=_mean_coef)(_weighted_sum(_mean_coef))
register("linear", "Linear", "https://arxiv.org/abs/2203.05482",
         "Weighted sum Σ w_i ΔW_i, weights from --weights.", options=("weights",),
         coefficients=_linear_coef)(_weighted_sum(_linear_coef))
register("task-arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089",
         "λ Σ w_i ΔW_i (Ilharco et al.); the same sum as linear, named after its paper.",
         options=("weights", "lambda"), coefficients=_linear_coef)(_weighted_sum(_linear_coef))
register("weighted-base", "Base-accuracy weighted mean", "Will it Merge? (Rahamim et al.), section 6",
         "Σ softmax((1 - Acc_base(t_i))/τ) ΔW_i: tasks the base knows least get the most weight.",
         options=("base-acc", "tau"), coefficients=_weighted_base_coef)(_weighted_sum(_weighted_base_coef))


# ----------------------------------------------------------------------------- sparsify + consensus


def _trim(tv: TaskVectors, p: Params, density: float):
    """Keep exactly the top ``density`` fraction by |δ| of each task, over its whole vector (global) or
    per tensor; ties at the threshold are broken by position, so the count is exact and deterministic."""
    if density >= 1:
        return lambda D, mod: D
    if p.trim_scope == "global":
        top = P.GlobalTopK(tv, [P.keep_count(density, tv.numel())] * tv.n)
        return lambda D, mod: D * top.mask(D)
    return lambda D, mod: D * P.topk_mask_rows(D, P.keep_count(density, D[0].numel()))


def _breadcrumbs(tv: TaskVectors, p: Params, density: float):
    """Drop the γ fraction of largest entries and the smallest, keeping ``density`` (Davari & Belilovsky)."""
    if density >= 1:
        return lambda D, mod: D

    def counts(numel):
        target = int(density * numel)
        top = min(int(p.gamma * numel), numel - target)
        return top + target, top  # keep the top (top + target) minus the top `top`

    if p.trim_scope == "global":
        k_keep, k_drop = counts(tv.numel())
        keep = P.GlobalTopK(tv, [k_keep] * tv.n)
        drop = P.GlobalTopK(tv, [k_drop] * tv.n) if k_drop > 0 else None
        return lambda D, mod: D * (keep.mask(D) & ~drop.mask(D) if drop else keep.mask(D))

    def per_tensor(D, mod):
        k_keep, k_drop = counts(D[0].numel())
        return D * (P.topk_mask_rows(D, k_keep) & ~P.topk_mask_rows(D, k_drop))

    return per_tensor


def _rescaled(D: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | float, how: str) -> torch.Tensor:
    kept = D * mask
    if how == "paper":
        return kept / keep  # E[kept / keep] = D
    if how == "l1":
        return P.l1_rescale(D, kept)
    return kept


def _dare(tv: TaskVectors, p: Params, density: float):
    """DARE (Yu et al.): drop each entry with probability 1 - density, rescale the rest."""
    if density >= 1:
        return lambda D, mod: D

    def apply(D, mod):
        mask = torch.stack([P.drop_mask(tuple(D.shape[1:]), density, p.seed, i, mod, D.device) for i in range(len(D))])
        return _rescaled(D, mask, density, p.rescale)

    return apply


def _della(tv: TaskVectors, p: Params, density: float):
    """DELLA MagPrune (Deep et al.): keep probability grows with magnitude rank; rescale by 1/keep."""
    if density >= 1:
        return lambda D, mod: D
    if not (0 < density - p.epsilon and density + p.epsilon < 1):
        raise UsageError("--epsilon", f"density ± epsilon ({density} ± {p.epsilon}) leaves (0, 1)",
                         "choose a smaller --epsilon")

    def apply(D, mod):
        keep = torch.stack([P.della_keep_probs(D[i], density, p.epsilon) for i in range(len(D))])
        mask = torch.stack([P.drop_mask(tuple(D.shape[1:]), keep[i], p.seed, i, mod, D.device) for i in range(len(D))])
        return _rescaled(D, mask, keep, p.rescale)

    return apply


def _gta(sparsify, consensus: bool):
    """Generalised task arithmetic: sparsify each task, weight, then sum or (consensus) TIES's
    elect-sign + disjoint mean."""

    def fn(tv: TaskVectors, p: Params):
        apply = sparsify(tv, p, p.density if p.density is not None else 1.0)
        for mod in tv.modules:
            D = apply(tv.stacked(mod), mod)
            w = weights_tensor(p, tv, D.dim() - 1)
            WD = D * w
            yield mod, P.disjoint_mean(WD, w) if consensus else WD.sum(0)

    return fn


register("ties", "TIES", "https://arxiv.org/abs/2306.01708",
         "Trim to the top --density by magnitude (--trim-scope), elect signs, disjoint mean.",
         options=("weights", "density", "trim-scope", "lambda"), default_density=0.2)(_gta(_trim, True))
register("magnitude", "Magnitude prune", "https://arxiv.org/abs/2306.01708",
         "Trim each task to the top --density by magnitude, then weighted sum (peft's magnitude_prune).",
         options=("weights", "density", "trim-scope", "lambda"), default_density=0.2)(_gta(_trim, False))
register("dare-linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099",
         "Drop entries with p = 1 - density, rescale (--rescale paper|l1), weighted sum.",
         options=("weights", "density", "rescale", "seed", "lambda"), default_density=0.5)(_gta(_dare, False))
register("dare-ties", "DARE + TIES", "https://arxiv.org/abs/2311.03099",
         "DARE's drop and rescale, then TIES's sign election and disjoint mean.",
         options=("weights", "density", "rescale", "seed", "lambda"), default_density=0.5)(_gta(_dare, True))
register("breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
         "Drop the --gamma largest and the smallest entries, keeping --density; weighted sum.",
         options=("weights", "density", "gamma", "trim-scope", "lambda"), default_density=0.9)(_gta(_breadcrumbs, False))
register("della", "DELLA", "https://arxiv.org/abs/2406.11617",
         "MagPrune (rank-dependent drop, --epsilon), rescale, sign election and disjoint mean.",
         options=("weights", "density", "epsilon", "rescale", "seed", "lambda"), default_density=0.5)(_gta(_della, True))


# ----------------------------------------------------------------------------- spherical


def _slerp_pair(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """SLERP of two flattened tensors (Shoemake); linear interpolation when |cos| > 0.9995."""
    na, nb = a.norm(), b.norm()
    ua = a / torch.where(na > eps, na, torch.ones_like(na))
    ub = b / torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = (ua * ub).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s) * a + (torch.sin(t * theta) / s) * b


@register("slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp",
          "Spherical interpolation of two task vectors per tensor, fraction --t of the way to the second.",
          options=("t", "lambda"), min_inputs=2, max_inputs=2)
def slerp(tv: TaskVectors, p: Params):
    for mod in tv.modules:
        D = tv.stacked(mod)
        yield mod, _slerp_pair(D[0].reshape(-1), D[1].reshape(-1), p.t).reshape(D.shape[1:])


@register("multislerp", "Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
          "Barycentric interpolation of n task vectors on the hypersphere (tangent-space mean), per tensor.",
          options=("weights", "lambda"), min_inputs=1)
def multislerp(tv: TaskVectors, p: Params, eps: float = 1e-8):
    for mod in tv.modules:
        D = tv.stacked(mod)
        if tv.n == 1:
            yield mod, D[0]
            continue
        flat = D.reshape(tv.n, -1)
        w = torch.tensor(p.w(tv.n), dtype=torch.float32, device=tv.device)
        w = w / w.sum()
        norms = flat.norm(dim=1, keepdim=True)
        if not bool((norms > 0).any()):  # every update zero here: no direction, and the merge is zero
            yield mod, torch.zeros_like(D[0])
            continue
        unit = flat / (norms + eps)
        mean = (unit * w.view(-1, 1)).sum(0)
        if mean.norm() < eps:
            raise UsageError("multislerp", f"module {mod}: the weighted directions cancel out",
                             "change the weights or use another method")
        mean = mean / mean.norm()
        tangent = unit - (unit @ mean).view(-1, 1) * mean  # project to the tangent space at the mean
        tr = (tangent * w.view(-1, 1)).sum(0)
        tn = tr.norm() + eps
        out = mean * torch.cos(tn) + tr * (torch.sin(tn) / tn)  # exponential map back to the sphere
        yield mod, (out * (norms.view(-1) * w).sum()).reshape(D.shape[1:])


@register("karcher", "Karcher mean", "https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
          "Weighted Riemannian (Karcher) mean of the task directions on the sphere, scaled by the mean norm.",
          options=("weights", "lambda"))
def karcher(tv: TaskVectors, p: Params, max_iter: int = 10, tol: float = 1e-5):
    w_all = p.w(tv.n)
    for mod in tv.modules:
        D = tv.stacked(mod)
        flat = D.reshape(tv.n, -1)
        norms = flat.norm(dim=1)
        alpha = torch.tensor(w_all, dtype=torch.float32, device=tv.device)
        alpha = alpha / alpha.sum()
        valid = norms > tol
        if not bool(valid.any()):
            yield mod, torch.zeros_like(D[0])
            continue
        units = flat[valid] / norms[valid].view(-1, 1)
        a = alpha[valid] / alpha[valid].sum()
        mean = (units * a.view(-1, 1)).sum(0)
        mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
        for _ in range(max_iter):
            dot = (units @ mean).clamp(-1, 1)
            theta = torch.acos(dot)
            coef = torch.where(theta < tol, torch.zeros_like(theta), a * theta / torch.sin(theta).clamp_min(1e-12))
            tangent = (coef.view(-1, 1) * (units - dot.view(-1, 1) * mean)).sum(0)
            tn = tangent.norm()
            if tn < tol:
                break
            mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
            mean = mean / mean.norm()
        yield mod, ((alpha * norms).sum() * mean).reshape(D.shape[1:])


@register("model-stock", "Model Stock", "https://arxiv.org/abs/2403.19522",
          "t·mean(ΔW) with t = N cosθ / (1 + (N-1) cosθ) from the mean pairwise cosine, per tensor.",
          options=("lambda",), min_inputs=2)
def model_stock(tv: TaskVectors, p: Params):
    n = tv.n
    for mod in tv.modules:
        flat = tv.stacked(mod).reshape(n, -1)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)
        cos = (unit @ unit.T)[torch.triu_indices(n, n, 1, device=tv.device).unbind()].clamp(-1, 1).mean()
        den = 1 + (n - 1) * cos
        t = torch.where(den.abs() < 1e-6, torch.zeros_like(cos), n * cos / den)
        yield mod, (t * flat.mean(0)).reshape(tv.shape(mod))


@register("emr", "EMR-Merging", "https://arxiv.org/abs/2405.17461",
          "Elect a unified task vector (sign of the sum, largest agreeing magnitude); --for-task NAME applies "
          "that task's mask and rescaler.", options=("weights", "for-task", "lambda"))
def emr(tv: TaskVectors, p: Params):
    def unified(D):
        WD = D * weights_tensor(p, tv, D.dim() - 1)
        sign = P.elect_sign(WD)
        return sign * (WD * (WD * sign > 0)).abs().amax(0)

    if p.for_task is None:
        for mod in tv.modules:
            yield mod, unified(tv.stacked(mod))
        return
    if p.for_task not in tv.names:
        raise UsageError("--for-task", f"no input named {p.for_task!r}", f"choose one of {', '.join(tv.names)}")
    i = tv.names.index(p.for_task)
    num = den = 0.0
    for mod in tv.modules:  # rescaler λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| over the whole vector
        D = tv.stacked(mod)
        u = unified(D)
        num += float(D[i].abs().sum())
        den += float((u * (D[i] * u > 0)).abs().sum())
    lam = num / den if den > 0 else 0.0
    for mod in tv.modules:
        D = tv.stacked(mod)
        u = unified(D)
        yield mod, lam * u * (D[i] * u > 0)
