"""Gradient metrics ("Demystifying Mergeability"): each model's mean cross-entropy gradient on its own
calibration examples, and the pairwise L2 distance, cosine and inner product of those gradients.

The gradient is taken at the expert's own weights (the base with its update beside the frozen weights, as
everywhere in mergetool) with respect to the dense weights of the modules the updates change, the same space
as the task vectors (the factors A and B of a LoRA are not identifiable, so gradients in their space would
not compare across experts). The loss is the mean over examples of each example's mean token cross-entropy
on its answer (the right choice, the target, or the passage), in fp32, without dropout. As in the paper's
code, each expert's gradient is on its own data, so two experts' gradients are on different inputs.
"""

from __future__ import annotations

import torch

from ..adapters import RowAdapters
from ..examples import Example
from ..train import Targets, lm_batch, model_row_losses, training_pairs
from ..updates import Update

BUDGET = 4 * 2**30


def mean_gradients(model, tok, updates: list[Update], data: list[list[Example]], batch: int = 16,
                   budget: int = BUDGET) -> tuple[torch.Tensor, list[str]]:
    """[n, p] fp32 gradients (on the CPU) of the n experts over the adapted modules' weights, and the module
    paths in the order they are laid out. ``data[i]`` are expert i's calibration examples."""
    dev = next(model.parameters()).device
    with RowAdapters(model, updates) as ad:
        paths = ad.linear_paths()  # a Conv1D's gradient is [in, out]: the pair metrics do not see the layout
        params = [model.get_submodule(p).weight for p in paths]
        size = sum(p.numel() for p in params)
        if len(updates) * size * 4 > budget:
            from ..errors import MergetoolError

            raise MergetoolError("--gradients", f"{len(updates)} gradients of {size:,} entries need "
                                 f"{len(updates) * size * 4 / 2**30:.1f} GiB", "diagnose fewer adapters at once")
        out = torch.zeros((len(updates), size), dtype=torch.float32)
        every = list(model.parameters())
        was = [p.requires_grad for p in every]
        try:
            for p in every:
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            for i, exs in enumerate(data):
                ad.use(i)
                texts = training_pairs(exs)
                for p in params:
                    p.grad = None
                for s in range(0, len(texts), batch):
                    ids, mask, lab = lm_batch(tok, texts[s:s + batch], dev)
                    loss = model_row_losses(model, ids, mask, Targets(lab)).sum() / len(texts)
                    loss.backward()
                out[i] = torch.cat([p.grad.float().reshape(-1).cpu() for p in params])
        finally:
            for p, w in zip(every, was):
                p.requires_grad_(w)
                p.grad = None
    return out, paths


def pair_gradient_metrics(G: torch.Tensor) -> dict:
    """Pairwise L2 distance, cosine and inner product of the rows of G (fp64)."""
    g = G.double()
    dots = g @ g.T
    sq = dots.diagonal()
    norms = sq.clamp_min(0).sqrt()
    cos = dots / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    cos = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.full_like(cos, float("nan")))
    return {"grad_l2": (sq[:, None] + sq[None, :] - 2 * dots).clamp_min(0).sqrt(), "grad_cosine": cos,
            "grad_dot": dots, "grad_norm": norms}
