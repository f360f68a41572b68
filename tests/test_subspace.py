"""The subspace merges (Core Space, TSV-M, Iso-C, Iso-CTS, STAR, CART): agreement with fusion-bench where it has
the method, with references written here from the papers' equations over dense ΔW otherwise, and the LoRA route
(exact cores from the factors) equal to the dense route on the same updates."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_lora, run_cli

from mergetool.errors import UsageError
from mergetool.methods import Params, check_options, get, merge_stream
from mergetool.updates import Dense, LowRank, Update

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
NEW = ["core-space", "tsv", "iso-c", "iso-cts", "star", "cart"]
F64 = torch.float64


def ours(updates, method, **kw) -> dict[str, torch.Tensor]:
    return {m: (r.delta(dtype=F64) if isinstance(r, LowRank) else r.double())
            for m, r in merge_stream(updates, get(method), Params(**kw), CPU)}


def as_dense(u: Update) -> Update:
    return Update(u.name, {k: Dense(m.delta(dtype=F64)) for k, m in u.modules.items()}, u.meta)


def deltas(u: Update) -> dict[str, torch.Tensor]:
    return {k: m.delta(dtype=F64) for k, m in u.modules.items()}


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def full_rank(seed: int, n: int = 3) -> list[Update]:
    """n dense, full-rank task vectors: two matrices and a norm-like vector (fp64)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layer.a": (48, 40), "layer.b": (24, 40), "layer.norm": (40,)}
    return [Update(f"t{i}", {k: Dense(torch.randn(s, generator=g, dtype=F64)) for k, s in shapes.items()})
            for i in range(n)]


def loras(n: int = 3, rank=lambda s: 2 + s) -> list[Update]:
    return [random_lora(s, rank=rank(s)) for s in range(n)]


def peer(path: str):
    """A fusion-bench module loaded from its file: importing it as a package member would run its subpackage's
    __init__, which imports the training stack (lightning, hydra) that these pure-tensor functions do not use."""
    fb = pytest.importorskip("fusion_bench")
    file = Path(fb.__file__).parent / path
    spec = importlib.util.spec_from_file_location(f"fusion_bench_peer_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- peers


def test_tsv_iso_c_iso_cts_match_fusion_bench_on_full_rank_updates():
    tsvm = peer("method/task_singular_vector/utils/TSVM_utils.py")
    iso = peer("method/isotropic_merging/iso_utils.py")
    ups = full_rank(0)
    sds = [deltas(u) for u in ups]
    cases = {"tsv": tsvm.compute_and_sum_svd_mem_reduction(sds, accelerator="cpu"),
             "iso-c": iso.iso_c(sds, accelerator="cpu"),
             "iso-cts": iso.iso_cts(sds, common_space_fraction=0.8, accelerator="cpu")}
    for method, want in cases.items():
        got = ours(ups, method)
        for k in want:
            assert rel({k: got[k]}, {k: want[k]}) < 1e-6, (method, k)


def test_iso_c_on_loras_is_fusion_bench_within_the_span():
    """On a rank-r sum the dense Iso-C spreads Σσ over all min(m, n) directions, most of them arbitrary null-space
    vectors; ours keeps it in the r directions of the span: projected onto that span, fusion-bench's result is
    r/min(m, n) times ours."""
    iso = peer("method/isotropic_merging/iso_utils.py")
    ups = loras()
    got = ours(ups, "iso-c")
    want = iso.iso_c([deltas(u) for u in ups], accelerator="cpu")
    for k, mine in got.items():
        U, S, Vh = torch.linalg.svd(mine)
        r = int((S > 1e-6 * S[0]).sum())
        Pu, Pv = U[:, :r] @ U[:, :r].T, Vh[:r].T @ Vh[:r]
        assert rel({k: Pu @ want[k] @ Pv * (min(mine.shape) / r)}, {k: mine}) < 1e-6, k


def test_dense_tsv_on_loras_depends_on_rounding_ours_does_not():
    """Why the zero singular triplets are dropped: the dense TSV-M keeps ⌊min(m, n)/T⌋ ≥ r triplets per task, the
    extra ones arbitrary null-space vectors that enter the orthogonalisation, so fusion-bench's merge of the same
    LoRA updates changes with the rounding of its input (fp32 or fp64); ours does not."""
    tsvm = peer("method/task_singular_vector/utils/TSVM_utils.py")
    ups = loras()
    sds = [deltas(u) for u in ups]
    fb64 = tsvm.compute_and_sum_svd_mem_reduction(sds, accelerator="cpu")
    fb32 = tsvm.compute_and_sum_svd_mem_reduction([{k: v.float() for k, v in sd.items()} for sd in sds],
                                                  accelerator="cpu")
    assert rel({k: v.double() for k, v in fb32.items()}, fb64) > 0.1
    f32 = [Update(u.name, {k: Dense(v.float()) for k, v in sd.items()}) for u, sd in zip(ups, sds)]
    assert rel(ours(f32, "tsv"), ours(ups, "tsv")) < 1e-5


# ----------------------------------------------------------------------------- references from the papers' equations


def star_reference(ds: list[torch.Tensor], eta: float) -> torch.Tensor:
    """STAR: keep the top r singular values with Σ_{j≤r} σ_j ≥ η Σ σ_j, rescale to the full nuclear norm, average."""
    out = 0
    for d in ds:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        r = min(int((S.cumsum(0) < eta * S.sum()).sum()) + 1, len(S))
        out = out + U[:, :r] @ torch.diag(S[:r] * S.sum() / S[:r].sum()) @ Vh[:r]
    return out / len(ds)


def cart_reference(ds: list[torch.Tensor], frac: float, lam: float) -> torch.Tensor:
    """CART: τ̄ + λ Σ_i SVD_k(τ_i − τ̄), k = max(1, ⌊ρ·min(m, n)⌋)."""
    mean = sum(ds) / len(ds)
    k = max(1, int(frac * min(mean.shape)))
    out = mean
    for d in ds:
        U, S, Vh = torch.linalg.svd(d - mean, full_matrices=False)
        out = out + lam * U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
    return out


@pytest.mark.parametrize("inputs", ["loras", "full-rank"])
def test_star_and_cart_match_the_papers_equations(inputs):
    ups = loras() if inputs == "loras" else full_rank(1)
    mats = [k for k in ups[0].modules if ups[0].modules[k].delta().dim() == 2]
    for eta in (0.4, 0.75):
        got = ours(ups, "star", eta=eta)
        want = {k: star_reference([deltas(u)[k] for u in ups], eta) for k in mats}
        assert rel({k: got[k] for k in mats}, want) < 1e-6, eta
    for frac, lam in ((0.05, 2.0), (0.3, 0.5)):  # k below and above the rank of the centred LoRA updates
        got = ours(ups, "cart", rank_fraction=frac, correction=lam)
        want = {k: cart_reference([deltas(u)[k] for u in ups], frac, lam) for k in mats}
        assert rel({k: got[k] for k in mats}, want) < 1e-6, frac


def core_space_reference(As, Bs, density: float) -> torch.Tensor:
    """Core Space with TIES, from the paper over the stacked factors: U_B from the SVD of [B_1 … B_T], V_A from
    the SVD of [A_1; …; A_T]; M_i = U_Bᵀ B_i A_i V_A; TIES on the cores of this matrix (keep the top
    ⌊density·|M_i|⌋ magnitudes, elect the sign of the sum, average the agreeing entries); ΔW = U_B M V_Aᵀ."""
    UB = torch.linalg.svd(torch.cat(Bs, 1), full_matrices=False)[0]
    VA = torch.linalg.svd(torch.cat(As, 0), full_matrices=False)[2].T
    M = torch.stack([UB.T @ B @ A @ VA for A, B in zip(As, Bs)]).flatten(1)
    k = int(density * M.shape[1])
    keep = torch.zeros_like(M, dtype=torch.bool).scatter(1, M.abs().topk(k, dim=1).indices, True)
    M = M * keep
    agree = torch.sign(M) == torch.sign(M.sum(0))
    merged = (M * agree).sum(0) / agree.sum(0).clamp(min=1)
    return UB @ merged.view(UB.shape[1], VA.shape[1]) @ VA.T


def test_core_space_ties_matches_the_papers_equations():
    """Per-matrix TIES, as the Core Space code merges (here --trim-scope tensor); mergetool keeps exactly
    ⌊density·N⌋ entries where the paper's TIES code keeps one more (its ≥ kth-value mask)."""
    ups = loras()
    got = ours(ups, "core-space", inner="ties", density=0.2, trim_scope="tensor")
    for k in got:
        ms = [u.modules[k] for u in ups]
        want = core_space_reference([m.A.double() for m in ms], [m.B.double() * m.scale for m in ms], 0.2)
        assert rel({k: got[k]}, {k: want}) < 1e-5, k


# ----------------------------------------------------------------------------- LoRA route = dense route


@pytest.mark.parametrize("method,kw", [("tsv", {}), ("tsv", {"rank_fraction": 0.04}), ("iso-c", {}),
                                       ("iso-cts", {}), ("iso-cts", {"common_fraction": 0.5}), ("star", {}),
                                       ("cart", {}), ("cart", {"rank_fraction": 0.04}),
                                       ("core-space", {"inner": "tsv"}), ("core-space", {"inner": "mean"}),
                                       ("tsv", {"weights": [0.5, -1.0, 2.0]})])
def test_lora_route_equals_dense_route(method, kw):
    ups = loras()
    lora = list(merge_stream(ups, get(method), Params(**kw), CPU))
    assert all(isinstance(r, LowRank) and r.rank <= 2 + 3 + 4 for _, r in lora)
    assert rel(ours(ups, method, **kw), ours([as_dense(u) for u in ups], method, **kw)) < 1e-5


def test_core_space_ties_dense_route_factors_in_the_balanced_gauge():
    """Core Space depends on the factors; dense inputs are factored as B = U S^½, A = S^½ Vᵀ, so LoRAs given in
    that form take the same cores on both routes (and other factors of the same ΔW give other TIES merges)."""
    ups = loras()
    balanced = []
    for u in ups:
        mods = {}
        for k, m in u.modules.items():
            U, S, Vh = torch.linalg.svd(m.delta(dtype=F64), full_matrices=False)
            r = m.rank
            mods[k] = LowRank(S[:r, None].sqrt() * Vh[:r], U[:, :r] * S[:r].sqrt(), 1.0)
        balanced.append(Update(u.name, mods))
    kw = {"inner": "ties", "density": 0.3}
    assert rel(ours(balanced, "core-space", **kw), ours([as_dense(u) for u in ups], "core-space", **kw)) < 1e-5
    assert rel(ours(ups, "core-space", **kw), ours(balanced, "core-space", **kw)) > 1e-2


@pytest.mark.parametrize("inner", ["tsv", "iso-c", "star", "mean"])
def test_rotation_invariant_inner_methods_equal_the_method_itself(inner):
    """TSV, Iso-C and STAR commute with the orthonormal bases of KnOTS and Core Space: merged inside them they
    give the method itself (TSV's per-task rank ⌊Σr/T⌋ = r keeps every task whole for equal ranks)."""
    ups = loras(rank=lambda s: 4)
    want = ours(ups, inner)
    for outer in ("knots", "core-space"):
        assert rel(ours(ups, outer, inner=inner), want) < 1e-5, outer


def test_cart_inside_counts_its_rank_on_the_cores():
    """As an inner method CART's rank is ρ·min of the cores (Σr x Σr here), as in the Core Space code: with
    k = ⌊0.25·12⌋ = 3 on the cores it equals CART with k = 3 on the module."""
    ups = loras(rank=lambda s: 4)
    ups = [Update(u.name, {k: m for k, m in u.modules.items() if k.endswith("q_proj")}) for u in ups]  # 64 x 64
    want = ours(ups, "cart", rank_fraction=3.5 / 64)
    for outer in ("knots", "core-space"):
        assert rel(ours(ups, outer, inner="cart", rank_fraction=0.25), want) < 1e-5, outer


def test_missing_modules_and_vectors():
    """A task without a module is a zero update there; vectors take the mean."""
    a, b = random_lora(1, layers=[0]), random_lora(2, layers=[0, 1])
    norm = {"model.norm": Dense(torch.ones(64))}
    ups = [Update(a.name, {**a.modules, **norm}),
           Update(b.name, {**b.modules, "model.norm": Dense(3 * torch.ones(64))})]
    for method in NEW:
        kw = {"inner": "mean"} if method == "core-space" else {}  # core-space hands vectors to its inner method
        got = ours(ups, method, **kw)
        dense = ours([as_dense(u) for u in ups], method, **kw)
        assert torch.allclose(got["model.norm"], 2 * torch.ones(64, dtype=F64)), method
        assert rel(got, dense) < 1e-5, method


def test_option_ranges_are_checked():
    for kw, opt in (({"eta": 40.0}, "--eta"), ({"rank_fraction": 0.0}, "--rank-fraction"),
                    ({"common_fraction": 1.5}, "--common-fraction"), ({"correction": float("nan")}, "--correction")):
        with pytest.raises(UsageError, match=opt):
            check_options(get("star"), Params(**kw))
    with pytest.raises(UsageError, match="--inner"):
        list(merge_stream(loras(2), get("core-space"), Params(inner="knots"), CPU))


def test_cli_writes_an_exact_lora(adapters, tmp_path):
    out = tmp_path / "m.safetensors"
    r = run_cli("merge", "--method", "core-space", "--inner", "tsv", *map(str, adapters), "-o", str(out),
                "--save-peft", str(tmp_path / "peft"))
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    r = run_cli("merge", "--method", "star", "--eta", "40", *map(str, adapters))
    assert r.returncode == 2 and b"--eta" in r.stderr


def test_small_subspace_benchmark(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_subspace.py"), "--small", "--device", "cpu",
                        "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for method in NEW:
        row = res["methods"][method]
        assert row["lora_vs_dense_rel_err"] < 1e-5 and row["speedup"] > 0, method
