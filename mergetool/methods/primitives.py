"""Shared primitives: trim by magnitude, random drop, sign election, disjoint mean, rescaling.

All take stacks ``D [n, *shape]`` (one row per task) in fp32 on any device.
"""

from __future__ import annotations

import zlib

import torch

from ..updates import LowRank
from .base import TaskVectors

_HI_BINS = 1 << 15  # |x| as float32 bits is < 2**31: 15 high bits after dropping the 16 low ones
_LO_BINS = 1 << 16


def _count_rows(idx: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-row histogram of integer codes in [0, bins] (``bins`` itself is discarded): [n, bins]."""
    n = idx.shape[0]
    off = torch.arange(n, device=idx.device).view(n, 1) * (bins + 1)
    return torch.bincount((idx + off).view(-1), minlength=n * (bins + 1)).view(n, bins + 1)[:, :bins]


def _pick(hist: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the bin (from the top) holding the k-th largest, and how many lie above that bin."""
    cum = hist.flip(1).cumsum(1)  # cum[:, j] = count in the top j+1 bins
    j = (cum < k.view(-1, 1)).sum(1).clamp(max=hist.shape[1] - 1)
    above = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0).view(-1, 1)).view(-1), torch.zeros_like(j))
    return hist.shape[1] - 1 - j, above


def kth_largest_abs(tv: TaskVectors, k: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k_i-th largest |x| of each task's whole vector (all modules), in two streaming passes,
    and how many entries equal to it belong to the top k_i (the rest of the top k_i is strictly larger).

    A radix select on float32 bit patterns (monotonic for |x| ≥ 0): pass 1 counts the 15 high bits,
    pass 2 the 16 low bits inside the chosen high bin. Memory: one module at a time.
    """
    n, dev = tv.n, tv.device
    kk = torch.tensor(k, device=dev, dtype=torch.int64)
    hist = torch.zeros((n, _HI_BINS), dtype=torch.int64, device=dev)
    for mod in tv.modules:
        bits = tv.stacked(mod).abs().reshape(n, -1).view(torch.int32)
        hist += _count_rows((bits >> 16).long(), _HI_BINS)
    hi, above = _pick(hist, kk)
    need = kk - above
    hist2 = torch.zeros((n, _LO_BINS), dtype=torch.int64, device=dev)
    for mod in tv.modules:
        bits = tv.stacked(mod).abs().reshape(n, -1).view(torch.int32)
        lo = torch.where((bits >> 16) == hi.view(-1, 1).int(), bits & 0xFFFF, _LO_BINS).long()
        hist2 += _count_rows(lo, _LO_BINS)
    lo, above2 = _pick(hist2, need)
    return ((hi << 16) | lo).int().view(torch.float32), need - above2


def keep_count(density: float, numel: int) -> int:
    """How many entries a trim keeps: at least one (as mergekit and peft)."""
    return max(1, int(density * numel))


def _top_with_ties(a: torch.Tensor, thr: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` [n, m]: entries above thr_i, plus the first ties_i entries equal to it (by index)."""
    t = thr.view(-1, 1)
    eq = a == t
    if bool((eq.sum(1) <= ties).all()):  # every tied entry is kept: no ordering needed
        return a >= t
    return (a > t) | (eq & (eq.int().cumsum(1, dtype=torch.int32) <= ties.view(-1, 1)))


def topk_mask_rows(D: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly the k largest |x| of each task row of D (per-tensor scope); ties broken by index."""
    a = D.abs().reshape(D.shape[0], -1)
    if k <= 0:
        return torch.zeros_like(D, dtype=torch.bool)
    if a.is_cuda:  # CUDA's kthvalue runs one block per row; a segmented sort uses the whole GPU
        thr = a.sort(dim=1).values[:, a.shape[1] - k]
    else:
        thr = torch.kthvalue(a, a.shape[1] - k + 1, dim=1).values
    ties = k - (a > thr.view(-1, 1)).sum(1)
    return _top_with_ties(a, thr, ties).reshape(D.shape)


class GlobalTopK:
    """Exactly the k_i largest |x| of each task's whole vector. ``mask`` must see the modules in order,
    once each: tied entries at the threshold are taken first by (module, index) order."""

    def __init__(self, tv: TaskVectors, k: list[int]):
        self.thr, self.ties = kth_largest_abs(tv, k)

    def mask(self, D: torch.Tensor) -> torch.Tensor:
        a = D.abs().reshape(D.shape[0], -1)
        m = _top_with_ties(a, self.thr, self.ties)
        self.ties = self.ties - (m & (a == self.thr.view(-1, 1))).sum(1)
        return m.reshape(D.shape)


def generator(device: torch.device, seed: int, task: int, module: str) -> torch.Generator:
    """A generator seeded from (seed, task, module): masks do not depend on batching or order."""
    g = torch.Generator(device=device)
    g.manual_seed(zlib.crc32(f"{seed}:{task}:{module}".encode()))
    return g


def drop_mask(shape: tuple[int, ...], keep: torch.Tensor | float, seed: int, task: int, module: str,
              device: torch.device) -> torch.Tensor:
    """Bernoulli keep-mask (1 = kept) with keep probability ``keep`` (scalar or per-entry)."""
    probs = keep if isinstance(keep, torch.Tensor) else torch.full(shape, float(keep), device=device)
    return torch.bernoulli(probs, generator=generator(device, seed, task, module))


def della_keep_probs(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune: keep probability rises linearly with the magnitude rank inside each row,
    from density - ε (smallest) to density + ε (largest)."""
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).float() + 1
    lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
    norm = ((ranks - lo) / (hi - lo)).clamp(0, 1).nan_to_num(0.0)
    return ((density - epsilon) + norm * 2 * epsilon).reshape(x.shape)


def l1_rescale(x: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` (x masked) so its L1 norm matches x's, per task row (mergekit's rescale)."""
    dims = tuple(range(1, x.dim()))
    before = x.abs().sum(dims, keepdim=True)
    after = kept.abs().sum(dims, keepdim=True)
    ok = (before >= eps) & (after >= eps)
    return torch.where(ok, kept * (before / torch.where(ok, after, torch.ones_like(after))), kept)


def elect_sign(WD: torch.Tensor) -> torch.Tensor:
    """TIES 'elect': the sign of the summed (weighted) deltas, zero counting as +."""
    return torch.where(WD.sum(0) >= 0, 1.0, -1.0)


def disjoint_mean(WD: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """TIES 'disjoint merge': average the entries that agree with the elected sign, dividing by the
    summed |weights| of the agreeing tasks (1 where none agree). |w| rather than w, so that a negative
    weight negates a task instead of cancelling out of the average; for w ≥ 0 this is mergekit's rule."""
    agree = (torch.sign(WD) == elect_sign(WD)).to(WD.dtype)
    div = (w.abs() * agree).sum(0)
    return (WD * agree).sum(0) / torch.where(div == 0, torch.ones_like(div), div)


def lora_sum(parts: list[tuple[float, LowRank]], device: torch.device) -> LowRank:
    """Σ c_i s_i B_i A_i as one exact LoRA: [c_1 s_1 B_1 … c_n s_n B_n] @ [A_1; …; A_n] (rank Σ r_i, scale 1)."""
    B = torch.cat([m.B.to(device, torch.float32) * (c * m.scale) for c, m in parts], 1)
    A = torch.cat([m.A.to(device, torch.float32) for _, m in parts], 0)
    return LowRank(A, B, 1.0)
