"""The subspace merges of 2025, computed exactly from the LoRA factors: Core Space, TSV-M, Iso-C, Iso-CTS, STAR, CART.

Each merges the task updates ΔW_i inside a low-dimensional subspace of them, yet the papers' code forms every
dense ΔW_i first. For LoRAs that subspace is known from the factors. With ΔW_i = B_i A_i (scale and --weights
folded into B_i), B_c = [B_1 … B_n] = Q_b R_b and [A_1; …; A_n]ᵀ = Q_a R_a (thin QRs, fp64),

    ΔW_i = Q_b C_i Q_aᵀ,    C_i = R_b[:, i] R_a[:, i]ᵀ    ([:, i]: the r_i columns of task i)

exactly, with C_i at most Σr × Σr: the *core* of task i (the core space of Panariello et al., in QR bases).
TSV-M, Iso-C, Iso-CTS, STAR and CART use only sums, SVDs, projections and polar factors of the updates, which
all commute with the isometry X ↦ Q_b X Q_aᵀ; so each runs on the cores and its result C is written as the
exact LoRA Q_b C Q_aᵀ (factored by the SVD of C, rank ≤ Σ r_i), at a cost that grows with (out + in)·(Σr)²
instead of out·in·min(out, in) per SVD. Two conventions make "the same result" well defined:

- rank budgets count as on the matrix the method is given: TSV keeps ⌊min(m, n)/T⌋ triplets per task and
  CART ⌊ρ·min(m, n)⌋ per correction, (m, n) the module's shape (inside core-space or knots, the cores'
  shape, as the Core Space code does);
- singular values under RTOL·σ_max (``knots.RTOL``) are exact zeros that rounding made positive. A dense SVD
  returns arbitrary vectors for them, and the papers' code lets those vectors into TSV's and Iso-CTS's
  orthogonalisation and Iso-C's mean; here they are dropped on every route. The dense route (the same
  algorithms on the dense ΔW_i, fp64) then equals the LoRA route on LoRA inputs, and the papers' code on
  full-rank updates.

Dense inputs (full-model task vectors) take the dense route per module; vectors (norms, biases) take the
weighted mean (1/n) Σ w_i δ_i, as the TSV and Iso code average them. Core Space is the one method here that
depends on the factors themselves, not only on ΔW_i (see ``core_space``).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from ..errors import UsageError
from ..updates import LowRank
from .base import Params, TaskVectors, lookup, register, weights_tensor
from .knots import CHUNK_BYTES, RTOL, _signature, factorisation_failed

F64 = torch.float64
CART_RANK = 0.12  # CART's rank ratio ρ (the authors' 8-task configuration, configs/CART/ViT-b-32_8_CART.yaml)

# ----------------------------------------------------------------------------- exact cores from the factors


def _rank(S: torch.Tensor, ref=None) -> int:
    """How many singular values exceed RTOL·ref (ref: the largest); none of a zero matrix."""
    if ref is None:
        ref = S[0] if S.numel() else 0.0
    ref = float(ref)
    return int((S > RTOL * ref).sum()) if ref > 0 else 0


def _svd(X: torch.Tensor, ref=None):
    """Thin SVD of X (fp64) truncated to the singular values above RTOL·ref (default σ_max)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    k = _rank(S, ref)
    return U[:, :k], S[:k], Vh[:k]


def _polar(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of X = P Σ Qᵀ (the orthonormal basis nearest to X's columns), taken on
    X's range: where the columns are dependent the dense code's square factor adds arbitrary directions."""
    P, _, Qh = _svd(X)
    return P @ Qh


def factor_qr(Bs: list[torch.Tensor], As: list[torch.Tensor]):
    """Batched over M modules: ``Bs[i]`` [M, out, r_i] (scale folded in), ``As[i]`` [M, r_i, in], fp64.
    Returns Q_b, R_b, Q_a, R_a with B_c = Q_b R_b and A_cᵀ = Q_a R_a."""
    Qb, Rb = torch.linalg.qr(torch.cat(Bs, 2))
    Qa, Ra = torch.linalg.qr(torch.cat(As, 1).transpose(1, 2))
    return Qb, Rb, Qa, Ra


def task_cores(Rb: torch.Tensor, Ra: torch.Tensor, ranks: list[int]) -> torch.Tensor:
    """C_i = R_b[:, i] R_a[:, i]ᵀ for each task's block of r_i columns: [n, M, p, q]."""
    cores, col = [], 0
    for r in ranks:
        cores.append(Rb[..., col:col + r] @ Ra[..., col:col + r].transpose(-1, -2))
        col += r
    return torch.stack(cores)


def lowrank(Ub: torch.Tensor, C: torch.Tensor, Va: torch.Tensor) -> LowRank:
    """U_b C V_aᵀ (U_b, V_a orthonormal) as an exact LoRA, factored by the SVD of the small C: rank = C's."""
    U, S, Vh = _svd(C.to(Ub.dtype))
    return LowRank((Vh @ Va.T).float(), (Ub @ (U * S)).float(), 1.0)


def _balanced(m, dev, w: float):
    """Factors of one task's update: a LoRA's own (scale and weight into B), or for a dense ΔW = U S Vᵀ the
    balanced B = U S^½, A = S^½ Vᵀ (rank by RTOL)."""
    if isinstance(m, LowRank):
        return m.B.to(dev, F64) * (m.scale * w), m.A.to(dev, F64)
    U, S, Vh = _svd(m.delta(dev, F64))
    r = S.sqrt()
    return U * (r * w), r[:, None] * Vh


def factor_chunks(tv: TaskVectors, weights: list[float], dense: bool = False):
    """(modules, present tasks, Bs, As) for the 2-D modules whose inputs are all LoRAs, in chunks of equal shape and
    ranks that go through one batched QR (fp64 work bounded as in knots). With ``dense``, also each 2-D module
    holding dense inputs, alone, with their balanced factors (Core Space's dense route)."""
    groups: dict[tuple, list[str]] = {}
    for mod in tv.modules:
        sig = _signature(tv.parts(mod))
        if len(tv.shape(mod)) == 2 and (dense or -1 not in sig):
            groups.setdefault((tv.shape(mod), sig) if -1 not in sig else (mod,), []).append(mod)  # dense: alone
    for key, mods in groups.items():
        rank = sum(r for r in key[1] if r) if len(key) == 2 else 1
        per = max(1, CHUNK_BYTES // (8 * sum(tv.shape(mods[0])) * rank * 3))
        for s in range(0, len(mods), per):
            parts = [tv.parts(m) for m in mods[s:s + per]]
            present = [i for i, m in enumerate(parts[0]) if m is not None]
            with _named(tv, mods[s:s + per], present):
                factors = [[_balanced(ps[i], tv.device, weights[i]) for ps in parts] for i in present]
            yield (mods[s:s + per], present, [torch.stack([b for b, _ in f]) for f in factors],
                   [torch.stack([a for _, a in f]) for f in factors])


@contextlib.contextmanager
def _named(tv: TaskVectors, mods: list[str], present: list[int] | None = None):
    """A factorisation of these modules that LAPACK cannot finish is one line naming them and the adapters."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        names = [tv.names[i] for i in (present if present is not None else range(tv.n))]
        raise factorisation_failed(e, mods, names) from None


def _dense(tv: TaskVectors, mod: str, weights: list[float]) -> torch.Tensor:
    """The weighted dense updates of one module, [n, m, n'] fp64 (zero where a task lacks the module)."""
    X = torch.zeros((tv.n, *tv.shape(mod)), dtype=F64, device=tv.device)
    for i, m in enumerate(tv.parts(mod)):
        if m is not None:
            X[i] = m.delta(tv.device, F64) * weights[i]
    return X


def subspace_merge(tv: TaskVectors, p: Params, core_fn):
    """Yield (module, merged) in module order. ``core_fn(X, shape)`` maps the weighted updates X [n, a, b] (fp64)
    of a module of shape (m, n) to the merged [a, b]; it runs on the exact cores of LoRA modules (an exact LoRA
    out) and on the dense ΔW_i of other matrices; vectors take the weighted mean."""
    w = p.w(tv.n)
    done = {}
    for mods, present, Bs, As in factor_chunks(tv, w):
        with _named(tv, mods, present):
            Qb, Rb, Qa, Ra = factor_qr(Bs, As)
            C = task_cores(Rb, Ra, [B.shape[2] for B in Bs])
        for j, mod in enumerate(mods):
            X = C.new_zeros((tv.n, *C.shape[2:]))
            X[present] = C[:, j]
            with _named(tv, [mod], present):
                done[mod] = lowrank(Qb[j], core_fn(X, tv.shape(mod)), Qa[j])
    for mod in tv.modules:
        if mod in done:
            yield mod, done.pop(mod)
        elif len(tv.shape(mod)) == 2:
            with _named(tv, [mod]):
                merged = core_fn(_dense(tv, mod, w), tv.shape(mod)).float()
            yield mod, merged
        else:
            D = tv.stacked(mod)
            yield mod, (D * weights_tensor(p, tv, D.dim() - 1)).mean(0)


# ----------------------------------------------------------------------------- the methods, on cores or dense ΔW


def _triplets(X: torch.Tensor, k: int, ref=None):
    """Each task's top-k singular triplets above RTOL·ref_i (default its σ_max), from one batched SVD,
    concatenated over the tasks: U [a, K], S [K], Vᵀ [K, b]."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    ks = [min(k, _rank(S[i], None if ref is None else ref[i])) for i in range(len(X))]
    return (torch.cat([U[i, :, :j] for i, j in enumerate(ks)], 1), torch.cat([S[i, :j] for i, j in enumerate(ks)]),
            torch.cat([Vh[i, :j] for i, j in enumerate(ks)], 0))


def tsv_core(X: torch.Tensor, shape, frac: float) -> torch.Tensor:
    """TSV-M (Gargiulo et al., CVPR 2025; official compute_and_sum_svd_mem_reduction, as fusion-bench's): task i
    keeps its top k = ⌊frac·min(m, n)⌋ singular triplets (U_i, Σ_i, V_i) (frac = 1/T by default: the tasks
    share the rank); the concatenations U = [U_1 … U_T], V = [V_1 … V_T] are replaced by their orthogonal polar
    factors U⊥, V⊥ (decorrelating the tasks' singular vectors), and ΔW = U⊥ diag(Σ_1 … Σ_T) V⊥ᵀ."""
    U, S, Vh = _triplets(X, max(1, int(frac * min(shape))))
    if S.numel() == 0:
        return X.new_zeros(X.shape[1:])
    return _polar(U) @ (S[:, None] * _polar(Vh.T).T)


def iso_c_core(X: torch.Tensor, shape) -> torch.Tensor:
    """Iso-C (Marczak et al., ICML 2025): the task-arithmetic sum Σ_i ΔW_i = U Σ Vᵀ with its spectrum made flat,
    σ̄ U Vᵀ, σ̄ the mean singular value. Flattened over the r directions of the sum (σ > RTOL·σ_max), so the
    nuclear norm is kept inside the updates' span: the dense code averages over all min(m, n), putting
    min(m, n) − r arbitrary null-space directions of a rank-r sum into the merge (within the span its
    result is r/min(m, n) times this one)."""
    U, S, Vh = _svd(X.sum(0))
    return S.mean() * (U @ Vh) if S.numel() else X.new_zeros(X.shape[1:])


def _span_rank(X: torch.Tensor) -> int:
    """Dimension of the joint column space of the X_i, rank [X_1 … X_n], from the eigenvalues σ² of Σ X_i X_iᵀ."""
    ev = torch.linalg.eigvalsh((X @ X.transpose(1, 2)).sum(0))
    return int((ev > RTOL ** 2 * ev[-1]).sum()) if ev[-1] > 0 else 0


def iso_cts_core(X: torch.Tensor, shape, frac: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al., ICML 2025; official iso_cts): in a space of dimension d, the top k_c ≈ frac·d
    singular directions of the sum Σ_i ΔW_i (common subspace) and, per task, the top (d − k_c)/T directions of
    its residual ΔW_i − U_c U_cᵀ ΔW_i (task-specific subspaces); both bases are orthogonalised (polar factors)
    and the spectrum made flat: ΔW = σ̄ U⊥ V⊥ᵀ, σ̄ the mean of the kept singular values. The dense code takes
    d = min(m, n); here d is the dimension of the updates' span, min(rank [ΔW_1 … ΔW_T], rank [ΔW_1; …; ΔW_T])
    (= min(m, n) for full-rank updates; ≤ Σ r_i for LoRAs, where min(m, n) would leave no task subspace).
    k_c is rounded so that the task share divides by T, as the official code does."""
    T = X.shape[0]
    d = min(_span_rank(X), _span_rank(X.transpose(1, 2)))
    kc = max(d - round((d - int(d * frac)) / T) * T, 0)
    per = (d - kc) // T
    U, S, Vh = _svd(X.sum(0))
    U, S, Vh = U[:, :kc], S[:kc], Vh[:kc]
    # residuals outside the common subspace; their rounding noise, below RTOL·‖ΔW_i‖_F, is dropped
    Ut, St, Vt = _triplets(X - U @ (U.T @ X), per, torch.linalg.matrix_norm(X))
    S = torch.cat([St, S])
    if S.numel() == 0:
        return X.new_zeros(X.shape[1:])
    return S.mean() * (_polar(torch.cat([Ut, U], 1)) @ _polar(torch.cat([Vt, Vh], 0).T).T)


def star_core(X: torch.Tensor, shape, eta: float) -> torch.Tensor:
    """STAR (Lee et al., NAACL 2025; official merger/STAR.py): each ΔW_i = U Σ Vᵀ keeps its top r singular
    values, r the smallest with Σ_{j≤r} σ_j ≥ η Σ_j σ_j, rescaled by Σ_j σ_j / Σ_{j≤r} σ_j so that the nuclear
    norm is kept; the truncated updates are averaged (1/T) Σ_i."""
    out = X.new_zeros(X.shape[1:])
    for U, S, Vh in zip(*torch.linalg.svd(X, full_matrices=False)):
        c = S[:_rank(S)].cumsum(0)
        if c.numel():
            r = min(int(torch.searchsorted(c, float(eta * c[-1]))) + 1, c.numel())
            out += (c[-1] / c[r - 1]) * ((U[:, :r] * S[:r]) @ Vh[:r])
    return out / X.shape[0]


def cart_core(X: torch.Tensor, shape, frac: float, lam: float) -> torch.Tensor:
    """CART (Choi et al., "Revisiting Weight Averaging for Model Merging"; official StaticMergeModule): the mean
    τ̄ = (1/T) Σ_i ΔW_i plus λ times the rank-k approximations of the centred task vectors,
    ΔW = τ̄ + λ Σ_i SVD_k(ΔW_i − τ̄), k = max(1, ⌊ρ·min(m, n)⌋). Where k reaches the rank of the centred
    updates the corrections sum to zero and CART is the mean."""
    mean = X.mean(0)
    U, S, Vh = _triplets(X - mean, max(1, int(frac * min(shape))))
    return mean + lam * ((U * S) @ Vh)


@register("tsv", "TSV-M", "https://arxiv.org/abs/2412.00081",
          "Task Singular Vectors merge: each task's top --rank-fraction (default 1/n) singular vectors, "
          "orthogonalised across tasks; an exact LoRA of rank ≤ Σ r_i.",
          options=("weights", "rank-fraction", "lambda"),
          fill=lambda p, n: p if p.rank_fraction is not None else replace(p, rank_fraction=1 / n))
def tsv(tv: TaskVectors, p: Params):
    return subspace_merge(tv, p, lambda X, shape: tsv_core(X, shape, p.rank_fraction))


@register("iso-c", "Iso-C", "https://arxiv.org/abs/2502.04959",
          "Isotropic merging in the common subspace: the sum of the task vectors with a flat spectrum "
          "(flattened within the updates' span); an exact LoRA of rank ≤ Σ r_i.", options=("weights", "lambda"))
def iso_c(tv: TaskVectors, p: Params):
    return subspace_merge(tv, p, iso_c_core)


@register("iso-cts", "Iso-CTS", "https://arxiv.org/abs/2502.04959",
          "Isotropic merging in common and task-specific subspaces (--common-fraction of the span common, "
          "default 0.8); an exact LoRA of rank ≤ Σ r_i.", options=("weights", "common-fraction", "lambda"))
def iso_cts(tv: TaskVectors, p: Params):
    return subspace_merge(tv, p, lambda X, shape: iso_cts_core(X, shape, p.common_fraction))


@register("star", "STAR", "https://arxiv.org/abs/2502.10339",
          "Spectral truncation keeping --eta (default 0.4) of each task's nuclear norm, rescaled to keep it, "
          "then the mean; an exact LoRA.", options=("weights", "eta", "lambda"))
def star(tv: TaskVectors, p: Params):
    return subspace_merge(tv, p, lambda X, shape: star_core(X, shape, p.eta))


@register("cart", "CART", "https://arxiv.org/abs/2412.12153",
          "Mean plus --correction (default 2) times the rank-k corrections of the centred task vectors, "
          "k = --rank-fraction (default 0.12) of min(m, n); an exact LoRA.",
          options=("rank-fraction", "correction", "lambda"),
          fill=lambda p, n: p if p.rank_fraction is not None else replace(p, rank_fraction=CART_RANK))
def cart(tv: TaskVectors, p: Params):
    return subspace_merge(tv, p, lambda X, shape: cart_core(X, shape, p.rank_fraction, p.correction))


@register("core-space", "Core Space", "https://arxiv.org/abs/2509.17786",
          "Merge the LoRAs' cores in the reference bases of the stacked B's and A's with --inner (default ties), "
          "write U_B·M·V_Aᵀ: an exact LoRA of rank ≤ Σ r_i.", options=("inner", "lambda"))
def core_space(tv: TaskVectors, p: Params):
    """Core Space (Panariello et al., NeurIPS 2025; official MatrixPerLayerMerger.get_core_matrices): reference
    bases U_B, the left singular vectors of B_c = [B_1 … B_T], and V_A, the right singular vectors of
    A_c = [A_1; …; A_T]; task i's core M_i = U_Bᵀ B_i A_i V_A; the inner method merges the cores (one vector per
    task over all modules, vectors such as norms included as they are), and ΔW = U_B M V_Aᵀ, with nothing lost
    (B_i A_i = U_B M_i V_Aᵀ). From the QRs above, U_B = Q_b P_b and V_A = Q_a P_a with R_b = P_b Σ_b W_bᵀ and
    R_a = P_a Σ_a W_aᵀ, so M_i = (P_bᵀ R_b[:, i]) (P_aᵀ R_a[:, i])ᵀ. Directions with σ < RTOL·σ_max are dropped.

    The bases depend on the factors, not only on ΔW_i (B G, G⁻¹A gives other cores), so TIES/DARE inside
    depend on them too, as in the paper; rotation-invariant inner methods (mean, tsv, iso-c, star) do not.
    Dense inputs are factored as B = U S^½, A = S^½ Vᵀ. Scales and weights: the scale is folded into B, the
    weights are the inner method's."""
    inner = lookup(p.inner)
    if "inner" in inner.options:
        raise UsageError("--inner", f"{inner.name} cannot be the core-space inner method",
                         "choose ties, mean, tsv, ...")
    bases: dict[str, tuple] = {}
    cores: dict[str, torch.Tensor] = {}
    for mods, present, Bs, As in factor_chunks(tv, [1.0] * tv.n, dense=True):
        with _named(tv, mods, present):
            Qb, Rb, Qa, Ra = factor_qr(Bs, As)
            Pb, Sb, _ = torch.linalg.svd(Rb, full_matrices=False)
            Pa, Sa, _ = torch.linalg.svd(Ra, full_matrices=False)
        C = task_cores(Pb.transpose(1, 2) @ Rb, Pa.transpose(1, 2) @ Ra, [B.shape[2] for B in Bs])
        for j, mod in enumerate(mods):
            kb, ka = _rank(Sb[j]), _rank(Sa[j])
            bases[mod] = (Qb[j] @ Pb[j, :, :kb], Qa[j] @ Pa[j, :, :ka])
            M = C.new_zeros((tv.n, kb, ka))
            M[present] = C[:, j, :kb, :ka]
            cores[mod] = M.float()
    stacks = {mod: cores.pop(mod) if mod in bases else tv.stacked(mod) for mod in tv.modules}
    for mod, m in inner.fn(TaskVectors.of_stacks(tv.names, stacks), inner.defaults(p, tv.n)):
        if mod in bases:
            with _named(tv, [mod]):
                m = lowrank(bases[mod][0], m, bases[mod][1])
        yield mod, m
