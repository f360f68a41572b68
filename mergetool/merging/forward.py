"""Differentiable scores of a packed batch, for the merges that take gradients (Fisher merging, AdaMerging): the
same packed forward pass and the same normalisation as ``eval`` (``scoring``, ``evaluate.choose``), with the
autograd graph kept."""

from __future__ import annotations

import torch

from ..scoring import Packed, token_logprobs


def choice_scores(model, packed: Packed, choices: list[list[str]], norm: str
                  ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every choice's normalised score (``--norm``: mean token log-probability, per character, or the sum) and its
    summed log-likelihood, for every item of the batch in row then item order (flat tensors), and each item's
    number of choices. ``choices[k]`` are item k's choice strings (for ``chars``)."""
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lp = token_logprobs(model, torch.tensor(packed.rr, device=dev), torch.tensor(packed.pos, device=dev),
                        torch.tensor(packed.tgt, device=dev), **packed.inputs(dev, dtype))
    counts = [n for row in packed.n_choices for n in row]
    owner = torch.tensor(packed.owner, device=dev)
    sums = torch.zeros(sum(counts), dtype=torch.float32, device=dev).index_add(0, owner, lp.float())
    if norm == "tokens":
        return sums / torch.bincount(owner, minlength=sums.numel()).clamp_min(1), sums, counts
    if norm == "chars":
        chars = torch.tensor([max(len(c), 1) for cs in choices for c in cs], dtype=torch.float32, device=dev)
        return sums / chars, sums, counts
    return sums, sums, counts


def batch_items(batch: list[tuple[int, list[int]]]) -> list[int]:
    """The item indices of a batch, in row then item order (as the packed tensors lay them)."""
    return [x for _, r in batch for x in r]


def item_tokens(packed: Packed, sizes: list[int]) -> torch.Tensor:
    """[items, longest] indices into the flattened [rows·width] batch of each item's tokens (padded with -1),
    items in row then item order; ``sizes`` are their token counts in the packed layout."""
    width = packed.ids.shape[1]
    flat = (packed.flat_r * width + packed.flat_c).tolist()
    out = torch.full((len(sizes), max(sizes)), -1, dtype=torch.long)
    at = 0
    for k, n in enumerate(sizes):
        out[k, :n] = torch.tensor(flat[at:at + n])
        at += n
    return out
