"""The weight-space metrics of "Demystifying Mergeability" that the collapse paper's conflicts do not cover,
for every pair of updates at once, defined as the authors' code defines them (``metrics/mergeability.py``)
except where said.

From the two task vectors' Gram matrix [[‖τ_i‖², ⟨τ_i, τ_j⟩], [⟨τ_i, τ_j⟩, ‖τ_j‖²]] (exact: the inner products
come from ``weightspace.pair_metrics``, from the r×r factor products for LoRA modules):

- ``dot_product`` ⟨τ_i, τ_j⟩; ``weight_space_angle`` arccos of the global cosine, in degrees;
  ``magnitude_ratio`` min(‖τ_i‖, ‖τ_j‖) / max(‖τ_i‖, ‖τ_j‖) (0 when one is zero);
- of the 2×D matrix [τ_i; τ_j] (the pair's *concatenation*, as the authors stack it), whose singular values
  σ₁ ≥ σ₂ are the square roots of the Gram's eigenvalues: ``pair_effective_rank`` exp(H(σ/Σσ)) (in [1, 2]),
  ``pair_stable_rank`` (σ₁ + σ₂)² / (σ₁² + σ₂²) (the authors' formula: Σσ squared over Σσ², not the textbook
  ‖M‖_F² / ‖M‖₂²), ``spectral_gap`` (σ₁ − σ₂) / σ₁ (their ``singular_value_ratio`` σ₂/σ₁ is 1 minus it, left
  out); ``pair_effective_rank_layerwise``: the same effective rank per module, averaged with weights
  ‖τ_i‖ + ‖τ_j‖ of the module over the modules both change (their ``layerwise_effective_rank``).

From each update's own SVD per matrix module, ΔW = U S Vᵀ (for a LoRA from the factors: B = Q_B R_B,
Aᵀ = Q_A R_A, the r×r core R_B R_Aᵀ = U_c S V_cᵀ, U = Q_B U_c, V = Q_A V_c; never the dense ΔW), averaged over
the matrix modules both change:

- ``subspace_overlap_col`` ‖U_iᵀ U_j‖_F / √k over the top k = min(10, rank_i, rank_j) left singular vectors:
  the root mean square of the cosines of the k principal angles between the two column spaces (1: the same
  space, 0: orthogonal); ``subspace_overlap_row`` the same for the right singular vectors (row spaces);
- ``singular_value_overlap`` the cosine of the two top-100 singular value vectors (the authors normalise each
  by its sum first, which a cosine ignores).

Where this differs from the authors' code, and why: they divide the left overlap by k and the right one by
√k; both are divided by √k here, so that both lie in [0, 1]. They take k = min(10, min(out, in)), which for a
LoRA of rank r < 10 reaches into the null space, whose basis the SVD picks arbitrarily; here k stops at the
numerical rank (singular values above max(out, in)·ε·σ₁, ε of the stored dtype, as numpy's matrix_rank). They
return a constant for a zero update; here a metric that needs a non-zero update is null. Their bottom-k overlaps
(the weakest singular vectors) are left out: for a LoRA they lie in that arbitrary null space.
"""

from __future__ import annotations

import torch

from ..updates import LowRank, Update

TOP_K = 10  # principal directions per subspace (the authors' default)
TOP_SV = 100  # singular values compared (the authors' default)
BUDGET = 256 * 2**20  # bytes of bases held at once (modules are taken a chunk at a time)
NAMES = ("dot_product", "weight_space_angle", "magnitude_ratio", "pair_effective_rank", "pair_stable_rank",
         "spectral_gap", "pair_effective_rank_layerwise", "subspace_overlap_col", "subspace_overlap_row",
         "singular_value_overlap")


def pair_spectra(updates: list[Update], conflicts: dict, device: torch.device | str = "cpu",
                 budget: int = BUDGET) -> dict:
    """Every pair's metrics of the module docstring: a dict of [n, n] fp64 tensors (NaN where undefined).
    ``conflicts`` is ``weightspace.pair_metrics`` of the same updates (its inner products are reused)."""
    dev = torch.device(device)
    dots = conflicts["dots"].to(dev)
    sq = dots.diagonal().clamp_min(0)  # the Gram's own diagonal: a small angle is a difference of its entries
    l2 = sq.sqrt()
    nan = torch.full_like(dots, float("nan"))
    both = (l2[:, None] > 0) & (l2[None, :] > 0)
    either = (l2[:, None] > 0) | (l2[None, :] > 0)
    cos = (dots / torch.where(both, l2[:, None] * l2[None, :], 1.0)).clamp(-1, 1)
    hi, lo = torch.maximum(l2[:, None], l2[None, :]), torch.minimum(l2[:, None], l2[None, :])
    s1, s2 = _pair_singular_values(sq, dots)
    out = {"dot_product": dots,
           "weight_space_angle": torch.where(both, torch.rad2deg(torch.arccos(cos)), nan),
           "magnitude_ratio": torch.where(either, lo / torch.where(hi > 0, hi, 1.0), nan),
           "pair_effective_rank": torch.where(either, _effective_rank(s1, s2), nan),
           "pair_stable_rank": torch.where(either, (s1 + s2).pow(2) / torch.where(either, s1 * s1 + s2 * s2, 1.0), nan),
           "spectral_gap": torch.where(either, (s1 - s2) / torch.where(s1 > 0, s1, 1.0), nan)}
    # per module, batched over the modules: [M, n, n] Grams -> each pair's effective rank, weighted
    md = torch.stack(conflicts["module_dots"]).to(dev) if conflicts["module_dots"] else dots[None] * 0
    sqm = md.diagonal(0, 1, 2).clamp_min(0)
    norm = sqm.sqrt()
    on = (norm[:, :, None] > 0) & (norm[:, None, :] > 0)
    a, b = _pair_singular_values(sqm, md)
    w = torch.where(on, norm[:, :, None] + norm[:, None, :], 0.0)
    er_w = w.sum(0)
    er = (_effective_rank(a, b) * w).sum(0)
    out["pair_effective_rank_layerwise"] = torch.where(er_w > 0, er / torch.where(er_w > 0, er_w, 1.0), nan)
    sums, count = _subspace_sums(updates, conflicts["modules"], dev, budget)
    for k, v in sums.items():
        out[k] = torch.where(count > 0, v / count.clamp_min(1), nan)
    return out


def _pair_singular_values(sq: torch.Tensor, dots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ₁ ≥ σ₂ of every [τ_i; τ_j] from its Gram [[sq_i, dots_ij], [dots_ij, sq_j]]: the square roots of
    tr/2 ± √((sq_i − sq_j)²/4 + dots_ij²), the smaller as det/λ₁ (no cancellation)."""
    si, sj = sq.unsqueeze(-1), sq.unsqueeze(-2)  # any leading batch dimensions
    lam1 = (si + sj) / 2 + ((si - sj).pow(2) / 4 + dots.pow(2)).sqrt()
    det = (si * sj - dots.pow(2)).clamp_min(0)
    lam2 = torch.where(lam1 > 0, det / torch.where(lam1 > 0, lam1, 1.0), 0.0)
    return lam1.sqrt(), lam2.clamp_min(0).sqrt()


def _effective_rank(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """exp(−Σ p log p) with p = σ / Σσ over the two singular values (0 log 0 = 0)."""
    tot = torch.where(s1 + s2 > 0, s1 + s2, 1.0)
    h = sum(torch.where(p > 0, -p * p.clamp_min(1e-300).log(), 0.0) for p in (s1 / tot, s2 / tot))
    return h.exp()


def _subspace_sums(updates: list[Update], modules: list[str], dev, budget: int):
    """Over the matrix modules, the sums of each pair's column and row subspace overlaps and singular value
    overlaps, and how many modules both change ([n, n] each). Modules of one shape are taken together, a chunk
    at a time: their bases in one batched factor SVD per LoRA rank, the cross Grams in one batched product."""
    n = len(updates)
    f64 = dict(dtype=torch.float64, device=dev)
    names = ("subspace_overlap_col", "subspace_overlap_row", "singular_value_overlap")
    sums = {k: torch.zeros((n, n), **f64) for k in names}
    count = torch.zeros((n, n), **f64)
    by_shape: dict[tuple, list[str]] = {}
    for mod in modules:
        shape = next(u.modules[mod].shape for u in updates if mod in u.modules)
        if len(shape) == 2:
            by_shape.setdefault(tuple(shape), []).append(mod)
    for (out_dim, in_dim), mods in by_shape.items():
        per_module = 8 * n * TOP_K * (out_dim + in_dim) * 2
        step = max(1, budget // max(per_module, 1))
        for c in range(0, len(mods), step):
            U, V, S, k = _bases([[u.modules.get(m) for u in updates] for m in mods[c:c + step]], out_dim, in_dim, dev)
            on = (k[:, :, None] > 0) & (k[:, None, :] > 0)  # [C, n, n]
            kk = torch.minimum(k[:, :, None], k[:, None, :]).clamp_min(1)
            for name, X in (("subspace_overlap_col", U), ("subspace_overlap_row", V)):
                sums[name] += torch.where(on, _overlap(X, kk), 0.0).sum(0)
            Sn = S / S.norm(dim=2, keepdim=True).clamp_min(1e-300)
            sums["singular_value_overlap"] += torch.where(on, Sn @ Sn.transpose(1, 2), 0.0).sum(0)
            count += on.double().sum(0)
    return sums, count


def _overlap(X: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
    """X [C, n, dim, K]: each module's n bases (zero columns past each one's k); kk [C, n, n] each pair's k.
    ‖X_iᵀ X_j‖_F / √k over the first k columns, for every k at once by 2-D prefix sums of the squared cross
    Gram blocks."""
    C, n, dim, K = X.shape
    flat = X.permute(0, 2, 1, 3).reshape(C, dim, n * K)
    G = (flat.transpose(1, 2) @ flat).pow(2).reshape(C, n, K, n, K).permute(0, 1, 3, 2, 4)
    P = G.cumsum(3).cumsum(4)  # [C, n, n, K, K]
    at = (kk - 1).unsqueeze(-1).unsqueeze(-1)
    val = P.gather(3, at.expand(C, n, n, 1, K)).gather(4, at).reshape(C, n, n)
    return (val / kk).clamp(0, 1).sqrt()


def _bases(parts: list[list], out_dim: int, in_dim: int, dev):
    """For C modules × n updates (``parts[c][i]``, None where update i leaves module c alone): U [C, n, out, K],
    V [C, n, in, K] (the top k singular vectors, zero columns after them), σ [C, n, L] (the top L singular
    values, L = min(TOP_SV, out, in)) and k [C, n] (0: no change), in fp64. A LoRA's from its factors, batched
    per rank (see the module docstring); a dense module's by its own SVD. k = min(TOP_K, the numerical rank:
    singular values above max(out, in)·ε·σ₁, ε of the stored dtype)."""
    C, n = len(parts), len(parts[0])
    L = min(TOP_SV, out_dim, in_dim)
    U = torch.zeros((C, n, out_dim, TOP_K), dtype=torch.float64, device=dev)
    V = torch.zeros((C, n, in_dim, TOP_K), dtype=torch.float64, device=dev)
    S = torch.zeros((C, n, L), dtype=torch.float64, device=dev)
    k = torch.zeros((C, n), dtype=torch.long, device=dev)

    def put(cs, ns, u, s, v, eps):
        rank = (s > s[:, :1] * max(out_dim, in_dim) * eps).sum(1)
        kept = torch.minimum(rank, torch.tensor(TOP_K, device=dev))
        keep = torch.arange(min(TOP_K, s.shape[1]), device=dev)[None, :] < kept[:, None]  # [N, ≤K]
        w = keep.shape[1]
        U[cs, ns, :, :w] = u[:, :, :w] * keep[:, None, :]
        V[cs, ns, :, :w] = v[:, :, :w] * keep[:, None, :]
        S[cs, ns, :min(L, s.shape[1])] = s[:, :L]
        k[cs, ns] = torch.where(s[:, 0] > 0, kept, 0)

    lowrank: dict[tuple, list[tuple[int, int]]] = {}
    for c, row in enumerate(parts):
        for i, p in enumerate(row):
            if isinstance(p, LowRank):
                lowrank.setdefault((p.rank, p.A.dtype), []).append((c, i))
            elif p is not None:
                stored = p.tensor.dtype if p.tensor is not None else torch.float32
                eps = torch.finfo(stored if stored.is_floating_point else torch.float32).eps
                u, s, vh = torch.linalg.svd(p.delta(dev, torch.float64), full_matrices=False)
                put([c], [i], u[None], s[None], vh.T[None], eps)
    for (r, dtype), at in lowrank.items():
        cs, ns = [c for c, _ in at], [i for _, i in at]
        B = torch.stack([parts[c][i].B.to(dev, torch.float64) * parts[c][i].scale for c, i in at])
        A = torch.stack([parts[c][i].A.to(dev, torch.float64) for c, i in at])
        qb, rb = torch.linalg.qr(B)  # ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ: the r×r core's SVD is ΔW's
        qa, ra = torch.linalg.qr(A.transpose(1, 2))
        uc, s, vch = torch.linalg.svd(rb @ ra.transpose(1, 2))
        put(cs, ns, qb @ uc, s, qa @ vch.transpose(1, 2), torch.finfo(dtype).eps)
    return U, V, S, k
