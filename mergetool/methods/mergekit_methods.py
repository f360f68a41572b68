"""The merge methods of mergekit 0.1.5 that apply to task vectors and that the other families lack: SCE,
NuSLERP, NearSwap, RAM, DELLA-linear and Breadcrumbs-TIES; and the consensus variants of task arithmetic and
TIES (Wang et al. 2024), which mergekit does not have. Each is checked against its peer on the same tensors
(``tests/test_oracles.py``); where mergetool's reading differs from mergekit's, the docstring says how.

mergekit's ``arcee_fusion`` is left out: its importance score is a softmax over the *absolute* weights of the
base and the fine-tuned model (a KL divergence per row), which a task vector alone does not determine.
"""

from __future__ import annotations

import torch

from . import primitives as P
from .base import Params, TaskVectors, lookup, register
from .families import _breadcrumbs, _della, _gta

# ----------------------------------------------------------------------------- generalised task arithmetic

register("della-linear", "DELLA (linear)", "https://arxiv.org/abs/2406.11617",
         "MagPrune (rank-dependent drop, --epsilon) and rescale, then the weighted sum (mergekit's della_linear).",
         options=("weights", "density", "epsilon", "rescale", "seed", "lambda"),
         default_density=0.5)(_gta(_della, False))
register("breadcrumbs-ties", "Model Breadcrumbs + TIES", "https://arxiv.org/abs/2312.06795",
         "Drop the --gamma largest and the smallest entries keeping --density, then TIES's sign election and "
         "disjoint mean (mergekit's breadcrumbs_ties with normalize: true).",
         options=("weights", "density", "gamma", "trim-scope", "lambda"), default_density=0.9)(_gta(_breadcrumbs, True))


# ----------------------------------------------------------------------------- SCE


def sce_mask(D: torch.Tensor, density: float) -> torch.Tensor:
    """SCE 'select': the ``density`` fraction of the entries whose variance across the tasks is largest,
    counted among the entries of nonzero variance (mergekit's ``sce_mask``)."""
    if density >= 1:
        return torch.ones_like(D[0], dtype=torch.bool)
    var = torch.var(D, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * density)
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=D.device)
    if k > 0:
        mask[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = True
    return mask.view(var.shape)


@register("sce", "SCE", "https://arxiv.org/abs/2408.07990",
          "Select the top --density entries by variance across tasks, weight each task by its mean square, "
          "erase entries against the elected sign, weighted mean (FuseChat's SCE, per tensor).",
          options=("density", "lambda"), default_density=1.0)
def sce(tv: TaskVectors, p: Params):
    """Per tensor: S(elect) keeps the top-variance entries, C(alculate) weights task i by
    m_i = mean(τ_i²) / Σ_j mean(τ_j²) (of the selected entries), E(rase) drops entries whose sign disagrees with
    the elected sign of Σ τ_i; merged = Σ m_i e_i τ_i / max(Σ m_i e_i, 1e-6). mergekit falls back to equal
    weights when Σ_j mean(τ_j²) < 1e-6, an absolute threshold that small updates (LoRAs) fall under; here only
    when it is 0. Like mergekit's, the method takes no --weights."""
    for mod in tv.modules:
        D = tv.stacked(mod)
        if p.density < 1:
            D = D * sce_mask(D, p.density)
        erase = (torch.sign(D) == P.elect_sign(D)).to(D.dtype)
        m = D.square().reshape(tv.n, -1).mean(1)
        m = torch.full_like(m, 1.0 / tv.n) if float(m.sum()) == 0 else m / m.sum()
        ew = m.view(-1, *([1] * (D.dim() - 1))) * erase
        yield mod, (D * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


# ----------------------------------------------------------------------------- NuSLERP and NearSwap


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int = -1, flatten: bool = False,
                 eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of v0 toward v1 by t along ``dim`` (each row, or each column with dim 0), or
    of the flattened tensors: the angle from the normalised vectors, the interpolation of the vectors as they
    are; linear where they are colinear ((1 − cos²) ≤ eps²)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@register("nuslerp", "NuSLERP", "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
          "SLERP of two task vectors with t = w_2/(w_1 + w_2) from --weights, over each whole tensor "
          "(--nuslerp-flatten, default), each row, or each column (--nuslerp-row-wise).",
          options=("weights", "nuslerp-row-wise", "nuslerp-flatten", "lambda"), min_inputs=2, max_inputs=2)
def nuslerp(tv: TaskVectors, p: Params):
    w = p.w(2)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    for mod in tv.modules:
        D = tv.stacked(mod)
        yield mod, nuslerp_pair(t, D[0], D[1], dim=0 if p.nuslerp_row_wise else -1, flatten=p.nuslerp_flatten)


@register("nearswap", "NearSwap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
          "One task vector clipped entrywise to magnitude --t: mergekit's base + clamp(t/|θ−θ_base|, 0, 1)·(θ−θ_base).",
          options=("t", "lambda"), min_inputs=1, max_inputs=1)
def nearswap(tv: TaskVectors, p: Params):
    """mergekit's NearSwap moves each weight of the base toward the model by w = clamp(t / |a − b|, 0, 1), which
    on the task vector τ = b − a is w·τ: τ where |τ| ≤ t, and t·sign(τ) beyond (|τ| floored at 1e-6 as there).
    mergekit's t has no default; here --t is shared with slerp (default 0.5): pass the threshold (the method's
    namesake merge used 1e-4)."""
    for mod in tv.modules:
        D = tv.stacked(mod)[0]
        yield mod, (p.t / D.abs().clamp(min=1e-6)).clamp(0, 1) * D


# ----------------------------------------------------------------------------- RAM


@register("ram", "Reinforced Agent Merging", "https://arxiv.org/abs/2601.13572",
          "Entries only one task changes (|τ| > --ram-epsilon) are kept whole; entries several change are "
          "averaged over those that change them.", options=("ram-epsilon", "lambda"))
def ram(tv: TaskVectors, p: Params):
    """merged = Σ_i τ_i · [|τ_i| > ε] / max(1, c), c = #{i : |τ_i| > ε} per entry (mergekit's ``ram``; its
    unique/overlap split is this one division). Takes no --weights, as mergekit's."""
    for mod in tv.modules:
        D = tv.stacked(mod)
        on = D.abs() > p.ram_epsilon
        count = on.sum(0)
        yield mod, (D * on).sum(0) / count.clamp(min=1)


# ----------------------------------------------------------------------------- consensus (TALL masks)


def _consensus(inner: str):
    """Consensus merging (Wang et al., ICML 2024): the multi-task vector τ_MTL of ``inner`` (task arithmetic:
    Σ w_i τ_i; TIES), each task's TALL mask m_t = |τ_t| > λ·|τ_MTL − τ_t| (λ = --tall-lambda), and τ_MTL kept
    only where at least k = --consensus-k masks hold (k = 2 drops the 'selfish' weights only one task uses
    and the 'catastrophic' ones none does; k = 0 is ``inner`` itself)."""

    def fn(tv: TaskVectors, p: Params):
        for mod, mtl in lookup(inner).fn(tv, p):
            D = tv.stacked(mod)
            masks = D.abs() > p.tall_lambda * (mtl.unsqueeze(0) - D).abs()
            yield mod, mtl * (masks.sum(0) >= p.consensus_k)

    return fn


register("consensus-ta", "Consensus Task Arithmetic", "https://arxiv.org/abs/2405.07813",
         "Σ w_i τ_i kept where at least --consensus-k tasks' TALL masks (|τ_t| > --tall-lambda·|τ_MTL − τ_t|) agree.",
         options=("weights", "tall-lambda", "consensus-k", "lambda"))(_consensus("task-arithmetic"))
register("consensus-ties", "Consensus TIES", "https://arxiv.org/abs/2405.07813",
         "The TIES merge kept where at least --consensus-k tasks' TALL masks (|τ_t| > --tall-lambda·|τ_MTL − τ_t|) "
         "agree.", options=("weights", "density", "trim-scope", "tall-lambda", "consensus-k", "lambda"),
         default_density=0.2)(_consensus("ties"))
