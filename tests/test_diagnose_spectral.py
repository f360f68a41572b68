"""The "Demystifying Mergeability" weight-space family (diagnose/spectral.py), all pairs from the LoRA factors,
against a plain per-pair computation on the dense ΔW: SVDs of each dense module and of the stacked pair."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import random_lora

from mergetool.diagnose.spectral import NAMES, TOP_K, TOP_SV, pair_spectra
from mergetool.diagnose.weightspace import pair_metrics
from mergetool.updates import Dense, LowRank, Update

TARGETS = {"q_proj": (48, 40), "v_proj": (24, 40)}


def dense_pair(a: Update, b: Update) -> dict:
    """Each metric of one pair the plain way, from the dense ΔW in fp64 (the authors' recipe, with the choices
    documented in spectral.py: k stops at the numerical rank, both overlaps divided by √k)."""
    mods = list(dict.fromkeys([*a.modules, *b.modules]))
    shape = {m: (a.modules.get(m) or b.modules.get(m)).shape for m in mods}

    def dense(u, m):
        return u.modules[m].delta(dtype=torch.float64) if m in u.modules else torch.zeros(shape[m], dtype=torch.float64)

    va = torch.cat([dense(a, m).reshape(-1) for m in mods])
    vb = torch.cat([dense(b, m).reshape(-1) for m in mods])

    def two(x, y):  # the 2×D stack's singular values, by a plain SVD
        return torch.linalg.svdvals(torch.stack([x, y]))

    def erank(s):
        p = s / s.sum()
        p = p[p > 0]
        return math.exp(float(-(p * p.log()).sum()))

    s = two(va, vb)
    out = {"dot_product": float(va @ vb),
           "weight_space_angle": math.degrees(math.acos(float(va @ vb / (va.norm() * vb.norm())))),
           "magnitude_ratio": float(min(va.norm(), vb.norm()) / max(va.norm(), vb.norm())),
           "pair_effective_rank": erank(s), "pair_stable_rank": float(s.sum() ** 2 / (s ** 2).sum()),
           "spectral_gap": float((s[0] - s[1]) / s[0])}
    num = den = 0.0
    col, row, sv = [], [], []
    for m in mods:
        x, y = dense(a, m), dense(b, m)
        if x.norm() == 0 or y.norm() == 0:
            continue
        w = float(x.norm() + y.norm())
        num += erank(two(x.reshape(-1), y.reshape(-1))) * w
        den += w
        ux, sx, vx = torch.linalg.svd(x, full_matrices=False)
        uy, sy, vy = torch.linalg.svd(y, full_matrices=False)
        eps = torch.finfo(torch.float32).eps
        rank = [int((s_ > s_[0] * max(x.shape) * eps).sum()) for s_ in (sx, sy)]
        k = min(TOP_K, *rank)
        col.append(float((ux[:, :k].T @ uy[:, :k]).norm()) / math.sqrt(k))
        row.append(float((vx[:k] @ vy[:k].T).norm()) / math.sqrt(k))
        L = min(TOP_SV, len(sx))
        sv.append(float(torch.nn.functional.cosine_similarity(sx[:L], sy[:L], dim=0)))
    out["pair_effective_rank_layerwise"] = num / den
    out["subspace_overlap_col"] = sum(col) / len(col)
    out["subspace_overlap_row"] = sum(row) / len(row)
    out["singular_value_overlap"] = sum(sv) / len(sv)
    return out


def pool() -> list[Update]:
    us = [random_lora(i, rank=r, targets=TARGETS, layers=[0, 1], name=f"r{r}") for i, r in enumerate((2, 3, 12, 16))]
    g = torch.Generator().manual_seed(5)
    dense = {m: Dense(torch.randn(us[0].modules[m].shape, generator=g) * 0.05) for m in us[0].modules}
    first = next(iter(us[0].modules))
    del dense[first]  # a module one update does not change
    us.append(Update("dense", dense, {"name": "dense"}))
    copy = us[1]
    us.append(Update("copy-dense", {k: Dense(m.delta()) for k, m in copy.modules.items()}, {"name": "copy-dense"}))
    zeroed = random_lora(9, rank=4, targets=TARGETS, layers=[0, 1], name="zeroed")
    m = zeroed.modules[first]
    zeroed.modules[first] = LowRank(m.A, torch.zeros_like(m.B), m.scale)  # peft's initial B = 0 on one module
    us.append(zeroed)
    return us


def test_every_pair_from_the_factors_equals_the_dense_computation():
    us = pool()
    conflicts = pair_metrics(us, budget=20000)
    got = pair_spectra(us, conflicts)
    assert set(got) == set(NAMES)
    for i, j in itertools.combinations(range(len(us)), 2):
        want = dense_pair(us[i], us[j])
        for k in NAMES:
            assert float(got[k][i, j]) == pytest.approx(want[k], rel=1e-5, abs=1e-5), (k, us[i].name, us[j].name)
            assert float(got[k][j, i]) == pytest.approx(want[k], rel=1e-5, abs=1e-5), k


def test_a_lora_and_its_dense_copy_are_the_same_update():
    us = pool()
    got = pair_spectra(us, pair_metrics(us))
    i, j = 1, 5  # r3 and its dense copy
    assert float(got["subspace_overlap_col"][i, j]) == pytest.approx(1, abs=1e-6)
    assert float(got["subspace_overlap_row"][i, j]) == pytest.approx(1, abs=1e-6)
    assert float(got["singular_value_overlap"][i, j]) == pytest.approx(1, abs=1e-6)
    assert float(got["weight_space_angle"][i, j]) == pytest.approx(0, abs=0.1)
    assert float(got["magnitude_ratio"][i, j]) == pytest.approx(1) and float(got["pair_effective_rank"][i, j]) == pytest.approx(1)
    # the dense copy is full rank in fp32 rounding but has rank 3 numerically: k is 3, not 10
    assert float(got["spectral_gap"][i, j]) == pytest.approx(1, abs=1e-6)


def test_orthogonal_and_opposite_updates():
    """Updates on disjoint row and column spaces: overlaps 0, angle 90°, effective rank 2 when equal in norm;
    an update and its negation: angle 180°, overlaps 1 (a subspace has no sign), effective rank 1."""
    A = torch.zeros(2, 8)
    A[0, 0] = A[1, 1] = 1
    B = torch.zeros(6, 2)
    B[0, 0] = B[1, 1] = 1
    A2, B2 = torch.zeros(2, 8), torch.zeros(6, 2)
    A2[0, 4] = A2[1, 5] = 1
    B2[3, 0] = B2[4, 1] = 1
    a = Update("a", {"m": LowRank(A, B)})
    b = Update("b", {"m": LowRank(A2, B2)})
    c = Update("c", {"m": LowRank(A, -B)})
    got = pair_spectra([a, b, c], pair_metrics([a, b, c]))
    assert float(got["subspace_overlap_col"][0, 1]) == 0 and float(got["subspace_overlap_row"][0, 1]) == 0
    assert float(got["weight_space_angle"][0, 1]) == pytest.approx(90)
    assert float(got["pair_effective_rank"][0, 1]) == pytest.approx(2) and float(got["spectral_gap"][0, 1]) == pytest.approx(0)
    assert float(got["pair_stable_rank"][0, 1]) == pytest.approx(2)
    assert float(got["weight_space_angle"][0, 2]) == pytest.approx(180)
    assert float(got["subspace_overlap_col"][0, 2]) == pytest.approx(1) and float(got["pair_effective_rank"][0, 2]) == pytest.approx(1)
    assert float(got["singular_value_overlap"][0, 1]) == pytest.approx(1)  # the same spectrum, other spaces


def test_a_zero_update_has_no_angle_and_no_subspace():
    a = random_lora(1, rank=3, targets=TARGETS, layers=[0])
    z = Update("z", {k: LowRank(m.A, torch.zeros_like(m.B), m.scale) for k, m in a.modules.items()})
    got = pair_spectra([a, z], pair_metrics([a, z]))
    for k in ("weight_space_angle", "subspace_overlap_col", "subspace_overlap_row", "singular_value_overlap",
              "pair_effective_rank_layerwise"):
        assert math.isnan(float(got[k][0, 1])), k
    assert float(got["magnitude_ratio"][0, 1]) == 0 and float(got["pair_effective_rank"][0, 1]) == pytest.approx(1)
