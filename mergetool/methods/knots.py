"""KnOTS (Stoica et al., ICLR 2025, https://arxiv.org/abs/2410.19735), computed from the LoRA factors.

Per module, the side-by-side updates [ΔW_1 | … | ΔW_n] = U S [V_1ᵀ … V_nᵀ]; task i becomes the
coordinates Q_i = S V_iᵀ in the shared basis U (so ΔW_i = U Q_i exactly). The inner method merges the
Q_i, one vector per task spanning all modules (so TIES trims and elects signs globally, as the
paper's code does), and U · Q_merged is written as an exact LoRA (B = U, A = Q_merged) of rank
≤ Σ r_i.

The dense side-by-side matrix is never formed. With ΔW_i = B_i A_i (scale folded into B_i),
B_c = [B_1 … B_n] = Q_b R_b and A_iᵀ = Q_i R_i (thin QRs), so
[ΔW_1 | … | ΔW_n] = Q_b · (R_b · blockdiag(R_iᵀ)) · blockdiag(Q_i)ᵀ, and the SVD of the small
Σr × Σr core C = U_c S V_cᵀ gives U = Q_b U_c and V_iᵀ = V_c,iᵀ Q_iᵀ exactly, at a cost linear in the
layer width. Modules of equal shapes and ranks are batched through one QR/SVD call; factorisations
run in fp64. Dense inputs (full-model task vectors, DoRA's effective updates) take the plain route: the
fp64 SVD of the dense side-by-side matrix, exactly what the paper's code does. Vectors (biases, norms) have
no basis to align: they go to the inner method as they are, in the same task vectors (as in Core Space).
"""

from __future__ import annotations

import torch

from ..errors import MergetoolError, UsageError
from ..updates import LowRank
from .base import Params, TaskVectors, lookup, register

RTOL = 1e-6  # singular values below RTOL · σ_max are dropped (they carry < 1e-6 of the update)
CHUNK_BYTES = 1 << 30  # bound the fp64 work per batched factorisation


def factorisation_failed(e: Exception, mods: list, names: list[str]) -> MergetoolError:
    """The one line for a QR, SVD or eigendecomposition that LAPACK cannot finish (values whose products overflow
    fp64, such as a LoRA scale of 1e300, or NaN): the module(s) it was factorising and the adapters merged there.
    (A ``(group, module)`` key of a batched ``knots_many`` names its module.)"""
    shown = [m[1] if isinstance(m, tuple) else m for m in mods]
    where = shown[0] + (f" (and {len(shown) - 1} more modules)" if len(shown) > 1 else "")
    routine = str(e).split(":")[0].strip() or "a factorisation"
    return MergetoolError(where, f"the factorisation of the updates of {', '.join(dict.fromkeys(names))} fails "
                          f"({routine} does not converge: values too large or not finite)",
                          "check those adapters for a scale far beyond the usual (lora_alpha / r) or corrupt "
                          "factors")


def _keep(S: torch.Tensor) -> int:
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    return int((S > RTOL * S[0]).sum())


def factor_coords(Bs: list[torch.Tensor], As: list[torch.Tensor]):
    """Batched KnOTS basis from factors. ``Bs[i]`` is [M, out, r_i] (scale folded in), ``As[i]`` [M, r_i, in].

    Returns U [M, out, q], S [M, q] and per-task coordinates Q_i = S V_iᵀ, each [M, q], in fp64.
    """
    Bc = torch.cat([b.double() for b in Bs], 2)
    Qb, Rb = torch.linalg.qr(Bc)  # [M, out, p], [M, p, R]
    Qa, blocks, col = [], [], 0
    for B, A in zip(Bs, As):
        r = B.shape[2]
        Q, R = torch.linalg.qr(A.double().transpose(1, 2))  # A_iᵀ = Q_i R_i: [M, in, r'], [M, r', r]
        Qa.append(Q)
        blocks.append(Rb[:, :, col:col + r] @ R.transpose(1, 2))
        col += r
    Uc, S, Vh = torch.linalg.svd(torch.cat(blocks, 2), full_matrices=False)
    U = Qb @ Uc
    coords, col = [], 0
    for Q in Qa:
        r = Q.shape[2]
        coords.append(S.unsqueeze(2) * (Vh[:, :, col:col + r] @ Q.transpose(1, 2)))
        col += r
    return U, S, coords


def dense_coords(deltas: list[torch.Tensor]):
    """The plain algorithm: fp64 SVD of the dense side-by-side [ΔW_1 | … | ΔW_n] (one module)."""
    U, S, Vh = torch.linalg.svd(torch.cat([d.double() for d in deltas], 1), full_matrices=False)
    w = deltas[0].shape[1]
    return U, S, [S.unsqueeze(1) * Vh[:, i * w:(i + 1) * w] for i in range(len(deltas))]


def _signature(parts: list) -> tuple:
    return tuple(None if m is None else (m.rank if isinstance(m, LowRank) else -1) for m in parts)


def knots_basis(tv: TaskVectors, names_of=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per 2-D module: the shared basis U [out, k] and the stacked coordinates [n, k, in] (fp32). ``names_of(mod)``:
    the names of the updates merged at ``mod`` (default ``tv.names``), for the line of a failed factorisation."""
    dev, n = tv.device, tv.n
    names_of = names_of or (lambda mod: tv.names)
    groups: dict[tuple, list[str]] = {}
    for mod in tv.modules:
        if len(tv.shape(mod)) == 2:
            groups.setdefault((tv.shape(mod), _signature(tv.parts(mod))), []).append(mod)
    bases: dict[str, torch.Tensor] = {}
    coords: dict[str, torch.Tensor] = {}

    def store(mod, U, S, cs, present):
        k = _keep(S)
        stack = torch.zeros((n, k, tv.shape(mod)[1]), dtype=torch.float32, device=dev)
        for i, c in zip(present, cs):
            stack[i] = c[:k].float()
        bases[mod] = U[:, :k].float()
        coords[mod] = stack

    for (shape, sig), mods in groups.items():
        present = [i for i, s in enumerate(sig) if s is not None]
        if any(sig[i] == -1 for i in present):  # dense inputs: the plain route
            for mod in mods:
                parts = tv.parts(mod)
                try:
                    U, S, cs = dense_coords([parts[i].delta(dev, torch.float64) for i in present])
                except torch.linalg.LinAlgError as e:
                    raise factorisation_failed(e, [mod], [names_of(mod)[i] for i in present]) from None
                store(mod, U, S, cs, present)
            continue
        R = sum(sig[i] for i in present)
        per = max(1, CHUNK_BYTES // (8 * (shape[0] + shape[1]) * max(R, 1) * 3))
        for s in range(0, len(mods), per):
            chunk = mods[s:s + per]
            parts = [tv.parts(m) for m in chunk]
            Bs = [torch.stack([p[i].B.to(dev, torch.float64) * p[i].scale for p in parts]) for i in present]
            As = [torch.stack([p[i].A.to(dev, torch.float64) for p in parts]) for i in present]
            try:
                U, S, cs = factor_coords(Bs, As)
            except torch.linalg.LinAlgError as e:
                raise factorisation_failed(e, chunk, [x for m in chunk for x in (names_of(m)[i] for i in present)]) \
                    from None
            for j, mod in enumerate(chunk):
                store(mod, U[j], S[j], [c[j] for c in cs], present)
    return bases, coords


def knots_many(tvs: list[TaskVectors], p: Params):
    """Several groups at once (``score`` merges many groups of equal size): one batched QR/SVD computes every
    group's bases (their modules are batched as if they were one group's), then each group's coordinates
    are merged by the inner method on their own. Yields each group's stream in turn, the same as
    ``knots_fn`` of that group alone."""
    if len({tv.n for tv in tvs}) > 1:
        for tv in tvs:
            yield knots_fn(tv, p)
        return
    inner, ip = _inner(p, tvs[0].n)
    keys = [(g, mod) for g, tv in enumerate(tvs) for mod in tv.modules]
    union = TaskVectors(tvs[0].device, tvs[0].names, keys, {(g, m): tvs[g].shape(m) for g, m in keys},
                        get=lambda key: tvs[key[0]].stacked(key[1]), parts=lambda key: tvs[key[0]].parts(key[1]))
    bases, coords = knots_basis(union, lambda key: tvs[key[0]].names)
    for g, tv in enumerate(tvs):
        yield iter(list(_merged(tv, {mod: bases.pop((g, mod)) for mod in tv.modules if (g, mod) in bases},
                                {mod: coords.pop((g, mod)) for mod in tv.modules if (g, mod) in coords}, inner, ip)))


def _inner(p: Params, n: int):
    inner = lookup(p.inner)
    if inner.name == "knots":
        raise UsageError("--inner", "knots cannot be its own inner method", "choose ties, mean, dare-ties, ...")
    return inner, inner.defaults(p, n)


@register("knots", "KnOTS", "https://arxiv.org/abs/2410.19735",
          "SVD-align the LoRAs' side-by-side updates, merge the aligned coordinates with --inner "
          "(default ties), write an exact LoRA of rank ≤ Σ r_i.",
          options=("inner", "weights", "density", "trim-scope", "lambda"), many=knots_many)
def knots_fn(tv: TaskVectors, p: Params):
    inner, ip = _inner(p, tv.n)
    bases, coords = knots_basis(tv)
    yield from _merged(tv, bases, coords, inner, ip)


def _merged(tv: TaskVectors, bases: dict, coords: dict, inner, ip: Params):
    """The inner method over the aligned coordinates (and the vectors as they are), U · Q_merged as LoRAs."""
    stacks = {mod: coords[mod] if mod in bases else tv.stacked(mod) for mod in tv.modules}
    for mod, q in inner.fn(TaskVectors.of_stacks(tv.names, stacks), ip):
        yield mod, LowRank(q, bases[mod], 1.0) if mod in bases else q
