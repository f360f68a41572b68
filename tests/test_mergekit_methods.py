"""The mergekit-style methods (methods/mergekit_methods.py) against their peers on the same tensors: mergekit
0.1.5's sce, nuslerp, nearswap, ram, della_linear and breadcrumbs_ties, and fusion-bench's TALL masks for the
consensus merges. The helpers are test_oracles.py's."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora
from test_oracles import TOL, MaskFeed, deltas, della_masks, group, mk_gta, ours, per, relerr

pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402

W = [0.7, 1.3, 0.4]


@pytest.fixture
def loras():
    # B large enough that each tensor's summed mean square passes mergekit's absolute 1e-6 guard in SCE
    out = [random_lora(s, rank=2 + s) for s in range(3)]
    for u in out:
        for m in u.modules.values():
            m.B = m.B * 30
    return out


@pytest.mark.parametrize("density", [1.0, 0.5, 0.1])
def test_sce_matches_mergekit(loras, density):
    got = ours(loras, "sce", density=density)
    for mod in got:
        ds = [deltas(u)[mod] for u in loras]
        assert float(torch.stack(ds).square().reshape(3, -1).mean(1).sum()) > 1e-6  # not mergekit's fallback
        ref = registry.get("sce").merge_group(group(ds), int8_mask=False, select_topk=density)
        assert relerr(got[mod], ref) < TOL, mod


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp_matches_mergekit(loras, row_wise, flatten):
    w = [0.3, 0.9]
    got = ours(loras[:2], "nuslerp", weights=w, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    for mod in got:
        ds = [deltas(u)[mod] for u in loras[:2]]
        ref = registry.get("nuslerp").merge_group(group(ds), weight=per(w), nuslerp_row_wise=row_wise,
                                                   nuslerp_flatten=flatten)
        assert relerr(got[mod], ref) < TOL, mod


def test_nearswap_matches_mergekit(loras):
    for t in (1e-4, 3e-3, 0.5):
        got = ours(loras[:1], "nearswap", t=t)
        for mod in got:
            d = deltas(loras[0])[mod]
            ref = registry.get("nearswap").merge_group(group([d]), t=t)
            assert relerr(got[mod], ref) < TOL
            assert float(got[mod].abs().max()) <= t * (1 + 1e-6)  # the clip it amounts to


def test_ram_matches_mergekit(loras):
    sparse = []
    for i, u in enumerate(loras):  # overlapping and unique entries: zero out different quarters per task
        mods = {}
        for mod, m in u.modules.items():
            d = m.delta()
            d.view(-1)[i::4] = 0
            mods[mod] = d
        sparse.append(mods)
    from mergetool.updates import Dense, Update

    ups = [Update(f"s{i}", {k: Dense(v) for k, v in s.items()}) for i, s in enumerate(sparse)]
    for eps in (1e-5, 1e-2):
        got = ours(ups, "ram", ram_epsilon=eps)
        for mod in got:
            ref = registry.get("ram").merge_group(group([s[mod] for s in sparse]), epsilon=eps)
            assert relerr(got[mod], ref) < TOL


def test_della_linear_matches_mergekit(loras, monkeypatch):
    got = ours(loras, "della-linear", weights=W, density=0.5, epsilon=0.2, rescale="l1", seed=3)
    monkeypatch.setattr(torch, "bernoulli", MaskFeed(della_masks(loras, got, 0.5, 0.2, 3)))
    for mod in got:
        ref = mk_gta("della_linear", [deltas(u)[mod] for u in loras], W, density=0.5, rescale=True, epsilon=0.2)
        assert relerr(got[mod], ref) < TOL


def test_breadcrumbs_ties_matches_mergekit_normalized(loras):
    got = ours(loras, "breadcrumbs-ties", weights=W, density=0.6, gamma=0.05, trim_scope="tensor")
    for mod in got:
        ref = mk_gta("breadcrumbs_ties", [deltas(u)[mod] for u in loras], W, density=0.6, gamma=0.05,
                     normalize=True)
        assert relerr(got[mod], ref) < TOL


@pytest.mark.parametrize("inner,method", [("task-arithmetic", "consensus-ta"), ("ties", "consensus-ties")])
@pytest.mark.parametrize("lam,k", [(0.4, 2), (0.2, 1), (0.6, 3)])
def test_consensus_matches_fusion_bench_tall_masks(loras, inner, method, lam, k):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.tall_mask.utils import generate_task_masks

    kw = dict(weights=W, density=0.3, trim_scope="tensor") if inner == "ties" else dict(weights=W)
    mtl = ours(loras, inner, **kw)
    got = ours(loras, method, tall_lambda=lam, consensus_k=k, **kw)
    kept = 0
    for mod in got:
        tvs = torch.stack([deltas(u)[mod].reshape(-1) for u in loras])
        if inner == "task-arithmetic":  # the multi-task vector as the method sums it (not B·A products)
            mtl[mod] = (tvs * torch.tensor(W).view(-1, 1)).sum(0).reshape(mtl[mod].shape)
        masks = generate_task_masks(tvs, tvs, torch.zeros_like(tvs[0]), tv=mtl[mod].reshape(-1), tall_mask_lambda=lam)
        ref = (mtl[mod].reshape(-1) * (masks.float().sum(0) >= k)).reshape(mtl[mod].shape)
        assert torch.equal(got[mod], ref)
        kept += int((ref != 0).sum())
    total = sum(int((m != 0).sum()) for m in mtl.values())
    assert 0 < kept < total if k >= 2 else 0 < kept <= total  # k ≥ 2 drops the weights one task alone uses


def test_consensus_with_k_zero_is_its_inner_method(loras):
    for inner, method in (("task-arithmetic", "consensus-ta"), ("ties", "consensus-ties")):
        a, b = ours(loras, inner, weights=W), ours(loras, method, weights=W, consensus_k=0)
        assert all(relerr(b[m], a[m]) < TOL for m in a)
