"""Parameter-conflict metrics of every pair of updates at once ("Task-level model-merging collapse", eq. 4-7),
and each update's norm, largest singular value and effective rank.

The domain is every entry of the task vectors: for a LoRA module its effective ΔW = scale·B A (never A and B
apart: they are not identifiable), over the union of the modules the updates change (a module an update
does not change is zero there). With X the [n, m] block of the n task vectors over some entries:

- magnitude change ratio (eq. 4): ‖τ_i − τ_j‖₁ / (‖τ_i‖₁ + ‖τ_j‖₁) (θ_i − θ_j = τ_i − τ_j: the base cancels);
- sign change ratio (eq. 5): #[sign τ_i ≠ sign τ_j] / #entries, with sign(0) = 0 as the paper writes it, so an
  entry that only one update changes counts; ``*_strict`` counts only strictly opposite signs (TIES's notion);
- conflicting magnitude change ratio (eq. 6): ‖(τ_i − τ_j)[sign τ_i ≠ sign τ_j]‖₁ / (‖τ_i‖₁ + ‖τ_j‖₁);
- cosine (eq. 7): the mean over modules of each module's cosine (modules where both are non-zero), and the
  cosine of the whole vectors (``cosine_global``); the L2 distance ‖τ_i − τ_j‖₂.

All pairs come from a few matrix products per block instead of a loop over pairs: with S = sign(X),
NZ = [X ≠ 0] and |X|, the counts of equal and opposite strict signs are (NZ NZᵀ ± S Sᵀ)/2, and the magnitude
of i where j has the same (opposite) strict sign is (|X| NZᵀ ± X Sᵀ)/2; inner products of LoRA modules come
from the factors, ⟨B_i A_i, B_j A_j⟩ = Σ (B_iᵀB_j) ∘ (A_i A_jᵀ), r×r blocks. Only ‖τ_i − τ_j‖₁ has no such
form and is summed pair by pair, vectorised over j. The modules stream through in row blocks that fit
``budget`` bytes: the dense ΔW of all updates is never in memory at once. Sums in fp64; counts exact.
"""

from __future__ import annotations

import math

import torch

from ..updates import LowRank, Update

BUDGET = 256 * 2**20
EXACT = 2**24  # entries per fp32 product: counts stay exact integers
L1_COLUMNS = 4096  # entries per fp32 pairwise L1 sum (torch.cdist), accumulated in fp64


def _rows(m, r0: int, r1: int, dev) -> torch.Tensor:
    """Rows r0:r1 of a module's ΔW, fp32, flattened (a vector delta is one row)."""
    if isinstance(m, LowRank):
        return ((m.B[r0:r1].to(dev, torch.float32) * m.scale) @ m.A.to(dev, torch.float32)).reshape(-1)
    d = m.delta(dev)
    return (d[r0:r1] if d.dim() >= 2 else d).reshape(-1)


def _factor_dots(parts: list, dev) -> torch.Tensor | None:
    """[n, n] inner products ⟨ΔW_i, ΔW_j⟩ of one module from the factors, when every present part is a LoRA."""
    if not all(p is None or isinstance(p, LowRank) for p in parts):
        return None
    n = len(parts)
    out = torch.zeros((n, n), dtype=torch.float64, device=dev)
    idx = [i for i, p in enumerate(parts) if p is not None]
    if not idx:
        return out
    B = [parts[i].B.to(dev, torch.float64) * parts[i].scale for i in idx]
    A = [parts[i].A.to(dev, torch.float64) for i in idx]
    gb = torch.cat(B, 1).T @ torch.cat(B, 1)
    ga = torch.cat(A, 0) @ torch.cat(A, 0).T
    cuts = [0]
    for b in B:
        cuts.append(cuts[-1] + b.shape[1])
    prod = gb * ga
    for a, i in enumerate(idx):
        for c, j in enumerate(idx):
            out[i, j] = prod[cuts[a]:cuts[a + 1], cuts[c]:cuts[c + 1]].sum()
    return out


def pair_metrics(updates: list[Update], device: torch.device | str = "cpu", budget: int = BUDGET) -> dict:
    """Every pair's conflict metrics, and each update's L1/L2 norms: a dict of [n, n] (or [n]) fp64 tensors
    (see the module docstring for the formulas); also the inner products ``dots`` [n, n], and per module
    (``modules``, in order) its own ``module_dots`` [n, n], which ``spectral`` reuses."""
    dev = torch.device(device)
    n = len(updates)
    f64 = dict(dtype=torch.float64, device=dev)
    l1, l2sq = torch.zeros(n, **f64), torch.zeros(n, **f64)
    l1diff, same, opp, both0, e_same, e_opp, dots = (torch.zeros((n, n), **f64) for _ in range(7))
    cos_sum, cos_n = torch.zeros((n, n), **f64), torch.zeros((n, n), **f64)
    entries = 0
    modules = list(dict.fromkeys(k for u in updates for k in u.modules))
    module_dots = []
    for mod in modules:
        parts = [u.modules.get(mod) for u in updates]
        shape = next(p.shape for p in parts if p is not None)
        rows = shape[0] if len(shape) >= 2 else 1
        width = math.prod(shape) // rows
        step = max(1, min(rows, budget // max(1, 4 * n * width), EXACT // max(width, 1)))
        mod_dots = _factor_dots(parts, dev)
        block_dots = torch.zeros((n, n), **f64) if mod_dots is None else None
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            X = torch.stack([_rows(p, r0, r1, dev) if p is not None else
                             torch.zeros((r1 - r0) * width, device=dev) for p in parts])
            m = X.shape[1]
            entries += m
            A = X.abs()  # block sums in fp32 (pairwise summation, exact for counts below 2^24), totals in fp64
            l1 += A.sum(1).double()
            l2sq += (X * X).sum(1).double()
            S = torch.sign(X)
            NZ = (X != 0).float()
            nz = NZ.sum(1).double()
            ss = (S @ S.T).double()
            nn_ = (NZ @ NZ.T).double() if bool((nz < m).any()) else torch.full((n, n), float(m), **f64)
            same += (nn_ + ss) / 2
            opp += (nn_ - ss) / 2
            both0 += m - nz[:, None] - nz[None, :] + nn_
            xs = (X @ S.T).double()
            an = (A @ NZ.T).double()
            e_same += (an + xs) / 2  # Σ |x_i| where x_j has the same strict sign
            e_opp += (an - xs) / 2  # ... the opposite strict sign
            for c in range(0, m, L1_COLUMNS):  # short fp32 sums, accumulated in fp64: exact to ~1e-8
                l1diff += torch.cdist(X[:, c:c + L1_COLUMNS], X[:, c:c + L1_COLUMNS], p=1).double()
            if block_dots is not None:
                Xd = X.double()  # fp64: the Gram feeds the pair spectra, whose small singular value is a difference
                block_dots += Xd @ Xd.T
        md = mod_dots if mod_dots is not None else block_dots
        module_dots.append(md)
        dots += md
        norms = md.diagonal().clamp_min(0).sqrt()
        ok = (norms[:, None] > 0) & (norms[None, :] > 0)
        cos_sum += torch.where(ok, md / (norms[:, None] * norms[None, :]).clamp_min(1e-300), 0.0)
        cos_n += ok.double()
    tot = l1[:, None] + l1[None, :]
    safe = torch.where(tot > 0, tot, torch.ones_like(tot))
    nan = torch.full_like(tot, float("nan"))
    l2 = l2sq.sqrt()
    out = {
        "magnitude_change_ratio": torch.where(tot > 0, l1diff / safe, nan),
        "sign_change_ratio": (entries - same - both0) / max(entries, 1),
        "sign_change_ratio_strict": opp / max(entries, 1),
        "conflict_magnitude_ratio": torch.where(tot > 0, (tot - e_same - e_same.T) / safe, nan),
        "conflict_magnitude_ratio_strict": torch.where(tot > 0, (e_opp + e_opp.T) / safe, nan),
        "cosine": torch.where(cos_n > 0, cos_sum / cos_n.clamp_min(1), nan),
        "cosine_global": torch.where((l2[:, None] > 0) & (l2[None, :] > 0),
                                     dots / (l2[:, None] * l2[None, :]).clamp_min(1e-300), nan),
        "l2_distance": (l2sq[:, None] + l2sq[None, :] - 2 * dots).clamp_min(0).sqrt(),
        "l1": l1, "l2": l2, "entries": entries, "dots": dots, "modules": modules, "module_dots": module_dots,
    }
    eye = torch.eye(n, dtype=torch.bool, device=dev)
    for k in ("magnitude_change_ratio", "sign_change_ratio", "sign_change_ratio_strict", "conflict_magnitude_ratio",
              "conflict_magnitude_ratio_strict", "l2_distance"):
        out[k] = torch.where(eye & ~out[k].isnan(), 0.0, out[k])
    return out
