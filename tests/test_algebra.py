"""The algebra of every method: identities that must hold whatever the implementation."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora

from mergetool.methods import Params, all_methods, get, merge_stream
from mergetool.methods.knots import dense_coords, factor_coords, knots_basis
from mergetool.methods.base import TaskVectors
from mergetool.updates import Dense, LowRank, Update

CPU = torch.device("cpu")
ALL = sorted(all_methods())
# methods whose single-input result is the input itself (with their neutral options); Iso-C and Iso-CTS flatten
# the spectrum of even one task (Marczak et al.: the merge is σ̄ U Vᵀ whatever the number of tasks)
# the spectrum of even one task (Marczak et al.: the merge is σ̄ U Vᵀ whatever the number of tasks); slerp and
# nuslerp take two inputs; the data-aware methods merge from statistics of a model on data (tests/test_datamerge.py)
IDENTITY = [m for m in ALL if m not in ("model-stock", "slerp", "nuslerp", "iso-c", "iso-cts") and not get(m).data]


def merged(updates, method, **kw) -> dict[str, torch.Tensor]:
    p = Params(**kw)
    return {mod: (r.delta() if isinstance(r, (LowRank, Dense)) else r) for mod, r in
            merge_stream(updates, get(method), p, CPU)}


def dense(u: Update) -> dict[str, torch.Tensor]:
    return {mod: m.delta() for mod, m in u.modules.items()}


def rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in b)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def neutral(method: str) -> dict:
    kw = {"density": 1.0}
    if method == "weighted-base":
        kw["base_acc"] = [0.5]
    if method == "star":  # η = 1 keeps the whole nuclear norm: no truncation
        kw["eta"] = 1.0
    if method.startswith("consensus-"):  # k = 0 keeps every entry of the multi-task vector
        kw["consensus_k"] = 0
    if method == "nearswap":  # a threshold above every entry clips nothing
        kw["t"] = 1.0
    return kw


@pytest.mark.parametrize("method", IDENTITY)
def test_one_input_returns_itself(method):
    u = random_lora(1)
    out = merged([u], method, **neutral(method))
    assert rel(out, dense(u)) < 1e-5, method


@pytest.mark.parametrize("method", ["linear", "task-arithmetic", "ties", "magnitude", "dare-linear", "emr", "knots",
                                    "tsv", "star"])
def test_weight_minus_one_negates(method):
    u = random_lora(2)
    kw = neutral(method)
    kw["weights"] = [-1.0]
    out = merged([u], method, **kw)
    neg = {k: -v for k, v in dense(u).items()}
    assert rel(out, neg) < 1e-5


@pytest.mark.parametrize("method", ["ties", "dare-ties", "dare-linear", "magnitude", "della", "breadcrumbs"])
def test_density_one_changes_nothing(method):
    us = [random_lora(s) for s in range(3)]
    base = "ties" if method in ("ties", "dare-ties", "della") else "linear"
    a = merged(us, method, density=1.0)
    b = merged(us, base, density=1.0)
    assert rel(a, b) < 1e-6


@pytest.mark.parametrize("method", ["mean", "ties", "knots", "karcher", "multislerp", "model-stock", "emr",
                                    "magnitude", "breadcrumbs", "core-space", "tsv", "iso-c", "iso-cts", "star",
                                    "cart"])
def test_order_does_not_matter(method):
    us = [random_lora(s, rank=2 + s) for s in range(3)]
    a = merged(us, method)
    b = merged(us[::-1], method)
    assert rel(a, b) < 1e-4


def test_mean_is_the_average():
    us = [random_lora(s) for s in range(3)]
    out = merged(us, "mean")
    ds = [dense(u) for u in us]
    assert rel(out, {k: sum(d[k] for d in ds) / 3 for k in ds[0]}) < 1e-6


def test_lambda_scales_every_method():
    us = [random_lora(s) for s in range(2)]
    for m in ("mean", "ties", "knots", "slerp"):
        a, b = merged(us, m, lam=0.5), merged(us, m)
        assert rel(a, {k: 0.5 * v for k, v in b.items()}) < 1e-5, m


def test_linear_of_loras_stays_exact_lora():
    us = [random_lora(s, rank=2 + s) for s in range(3)]
    out = list(merge_stream(us, get("linear"), Params(weights=[0.5, -1.0, 2.0]), CPU))
    assert all(isinstance(r, LowRank) and r.rank == 2 + 3 + 4 for _, r in out)
    ds = [dense(u) for u in us]
    want = {k: 0.5 * ds[0][k] - ds[1][k] + 2 * ds[2][k] for k in ds[0]}
    assert rel({m: r.delta() for m, r in out}, want) < 1e-6


def test_knots_reconstructs_every_update_exactly():
    us = [random_lora(s, rank=2 + s) for s in range(3)]
    tv = TaskVectors.of_updates(us, CPU)
    bases, coords = knots_basis(tv)
    for i, u in enumerate(us):
        rec = {m: bases[m] @ coords[m][i] for m in bases}
        assert rel(rec, dense(u)) < 1e-5
    for m in bases:  # the basis is orthonormal and the rank at most Σ r_i
        U = bases[m]
        assert U.shape[1] <= 2 + 3 + 4
        assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-5)


def test_knots_with_a_plain_sum_returns_the_sum():
    us = [random_lora(s, rank=3) for s in range(4)]
    out = merged(us, "knots", inner="linear")
    ds = [dense(u) for u in us]
    assert rel(out, {k: sum(d[k] for d in ds) for k in ds[0]}) < 1e-5
    lora = list(merge_stream(us, get("knots"), Params(inner="linear"), CPU))
    assert all(isinstance(r, LowRank) and r.rank <= 12 for _, r in lora)


def test_knots_factor_route_equals_dense_route():
    g = torch.Generator().manual_seed(0)
    Bs = [torch.randn(1, 48, r, generator=g, dtype=torch.float64) for r in (2, 5, 3)]
    As = [torch.randn(1, r, 40, generator=g, dtype=torch.float64) for r in (2, 5, 3)]
    Uf, Sf, Cf = factor_coords(Bs, As)
    Ud, Sd, Cd = dense_coords([(B[0] @ A[0]) for B, A in zip(Bs, As)])
    k = 10
    assert torch.allclose(Sf[0][:k], Sd[:k], rtol=1e-9, atol=1e-9)
    for cf, cd in zip(Cf, Cd):  # U Q_i agrees (the SVD's signs may differ per component)
        assert torch.allclose(Uf[0][:, :k] @ cf[0][:k], Ud[:, :k] @ cd[:k], atol=1e-9)


def test_knots_dense_inputs_take_the_plain_route():
    us = [random_lora(s, rank=2) for s in range(3)]
    dense_us = [Update(u.name, {k: Dense(m.delta()) for k, m in u.modules.items()}) for u in us]
    a = merged(us, "knots", density=0.3)
    b = merged(dense_us, "knots", density=0.3)
    assert rel(a, b) < 1e-4


def test_slerp_endpoints_and_midpoint():
    us = [random_lora(s) for s in range(2)]
    d0, d1 = dense(us[0]), dense(us[1])
    assert rel(merged(us, "slerp", t=0.0), d0) < 1e-6
    assert rel(merged(us, "slerp", t=1.0), d1) < 1e-5
    mid = merged(us, "slerp", t=0.5)
    for k in d0:  # sin((1-t)θ)/sinθ = sin(tθ)/sinθ at t = 1/2: the midpoint lies along d0 + d1
        c = torch.nn.functional.cosine_similarity(mid[k].flatten(), (d0[k] + d1[k]).flatten(), 0)
        assert float(c) > 1 - 1e-6


def test_ties_global_trim_keeps_density_fraction():
    us = [random_lora(s) for s in range(2)]
    tv = TaskVectors.of_updates(us, CPU)
    from mergetool.methods.primitives import keep_count, kth_largest_abs

    k = keep_count(0.2, tv.numel())
    thr, ties = kth_largest_abs(tv, [k, k])
    for i in range(2):
        allv = torch.cat([tv.stacked(m)[i].abs().flatten() for m in tv.modules])
        assert float(thr[i]) == float(allv.sort(descending=True).values[k - 1])
        assert int((allv > thr[i]).sum()) + int(ties[i]) == k


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_trim_keeps_exactly_k_with_ties(scope):
    """bf16-quantised deltas tie massively at the threshold: the trim still keeps exactly k, by position."""
    g = torch.Generator().manual_seed(0)
    us = [Update(f"q{i}", {f"m{j}": Dense(torch.randint(-3, 4, (16, 32), generator=g).float()) for j in range(3)})
          for i in range(2)]
    from mergetool.methods.families import _trim

    tv = TaskVectors.of_updates(us, CPU)
    apply = _trim(tv, Params(trim_scope=scope), 0.3)
    trimmed = [apply(tv.stacked(m), m) for m in tv.modules]  # once per module, in order
    kept = [sum(int((t[i] != 0).sum()) for t in trimmed) for i in range(2)]
    want = int(0.3 * 3 * 512) if scope == "global" else 3 * int(0.3 * 512)
    assert kept == [want, want]
    again = _trim(tv, Params(trim_scope=scope), 0.3)
    for m, t in zip(tv.modules, trimmed):
        assert torch.equal(t, again(tv.stacked(m), m))


def test_dare_is_reproducible_and_unbiased():
    us = [random_lora(s) for s in range(2)]
    a = merged(us, "dare-linear", density=0.5, seed=3)
    b = merged(us, "dare-linear", density=0.5, seed=3)
    c = merged(us, "dare-linear", density=0.5, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    want = merged(us, "linear")
    # the paper's rescale keeps the expectation: the mean over many seeds approaches the plain sum
    avg = {k: sum(merged(us, "dare-linear", density=0.5, seed=s)[k] for s in range(40)) / 40 for k in a}
    assert rel(avg, want) < 0.2


def test_weighted_base_softmax_of_inverse_accuracy():
    us = [random_lora(s) for s in range(3)]
    acc = [0.9, 0.5, 0.1]
    out = merged(us, "weighted-base", base_acc=acc, tau=0.5)
    w = torch.softmax(torch.tensor([(1 - a) / 0.5 for a in acc]), 0)
    ds = [dense(u) for u in us]
    assert rel(out, {k: sum(float(w[i]) * ds[i][k] for i in range(3)) for k in ds[0]}) < 1e-6


def test_emr_for_task_rescales_to_the_task_l1():
    us = [random_lora(s) for s in range(3)]
    out = merged(us, "emr", for_task=us[1].name, names=[u.name for u in us])
    d = dense(us[1])
    l1 = sum(float(v.abs().sum()) for v in out.values())
    assert abs(l1 / sum(float(v.abs().sum()) for v in d.values()) - 1) < 1e-5


def test_model_stock_of_identical_inputs_is_the_input():
    u = random_lora(5)
    out = merged([u, u, u], "model-stock")
    assert rel(out, dense(u)) < 1e-5


def test_missing_modules_count_as_zero():
    a = random_lora(1, layers=[0])
    b = random_lora(2, layers=[0, 1])
    out = merged([a, b], "mean")
    da, db = dense(a), dense(b)
    for k in db:
        want = (da.get(k, torch.zeros_like(db[k])) + db[k]) / 2
        assert torch.allclose(out[k], want, atol=1e-6)
