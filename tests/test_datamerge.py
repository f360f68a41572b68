"""The data-aware merges (methods/dataaware.py, merging/): each statistic against a plain computation on the
dense weights (one example at a time through transformers, no per-row engine, no packing), each merge
formula against its peer (fusion-bench) on the same statistics, and the LoRA routes against the dense ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_lora

from mergetool.examples import check_examples
from mergetool.merging import DataOptions, dev_data, merge_with_data, statistics
from mergetool.merging.data import sequence_items
from mergetool.methods import Params, get, merge
from mergetool.methods.dataaware import regmean_dense, regmean_lora, scaled_grams
from mergetool.model import load_model, resolve_base
from mergetool.updates import PREFIX, LowRank

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64), "up_proj": (128, 64),
          "down_proj": (64, 128)}
TASKS = ["country-capital", "country-currency"]


def relerr(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rows(n_per_task=5):
    rs = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    out = []
    for t in TASKS:
        out += [r for r in rs if r["task"] == t][:n_per_task]
    return out


def examples(n_per_task=5):
    exs = check_examples(rows(n_per_task), "dev")
    for e in exs:
        e.context = e.rec["prompt"]
    return exs


def experts(projs=("q_proj", "v_proj", "up_proj"), layers=(0, 1), gain=3.0):
    out = []
    for i, t in enumerate(TASKS):
        u = random_lora(10 + i, rank=2 + i, alpha=8, targets={p: SHAPES[p] for p in projs}, layers=layers,
                        name=t, task=t)
        for m in u.modules.values():
            m.B *= gain
        out.append(u)
    return out


@pytest.fixture(scope="module")
def model_tok(tiny_lm):
    return load_model(resolve_base(str(tiny_lm)), CPU)


def dense_model(model, updates_by_module: dict):
    """A copy of the model with ΔW added into its weights (the plain route: no hooks)."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for k, d in updates_by_module.items():
            m.get_submodule(k[len(PREFIX):]).weight += d
    return m


def plain_grams(model, tok, dev, i, paths, weights: dict) -> dict:
    """Task i's Gram of each module's input: its examples one by one, whole sequences, through the model with
    ``weights`` (module -> ΔW) added in."""
    m = dense_model(model, weights)
    seqs = [ctx for ctx, _ in sequence_items(tok, [dev.examples[j] for j in dev.of[i]])]
    got = {p: [] for p in paths}
    hs = [m.get_submodule(p).register_forward_hook(lambda mod, inp, out, p=p: got[p].append(inp[0][0].detach()))
          for p in paths]
    with torch.no_grad():
        for s in seqs:
            m(input_ids=torch.tensor([s]))
    for h in hs:
        h.remove()
    return {p: (torch.cat(x).double().T @ torch.cat(x).double()) / sum(len(s) for s in seqs) for p, x in got.items()}


def test_grams_equal_a_plain_loop_over_examples(model_tok):
    model, tok = model_tok
    ups = experts()
    dev = dev_data(ups, examples(), "regmean")
    grams = statistics("regmean", model, tok, ups, dev, Params(), DataOptions())["grams"]
    assert set(grams) == set(ups[0].modules)
    for i, u in enumerate(ups):
        ref = plain_grams(model, tok, dev, i, [k[len(PREFIX):] for k in u.modules],
                          {k: m.delta() for k, m in u.modules.items()})
        for k in u.modules:
            assert relerr(grams[k][i], ref[k[len(PREFIX):]]) < 1e-5, k
    # q and v read the same input: one Gram
    q, v = (PREFIX + "model.layers.1.self_attn." + p for p in ("q_proj", "v_proj"))
    assert grams[q] is grams[v]


def test_regmean_from_factors_equals_the_dense_formula_and_fusion_bench(model_tok):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    model, tok = model_tok
    ups = experts()
    dev = dev_data(ups, examples(), "regmean")
    for alpha in (1.0, 0.6):
        merged = merge_with_data(ups, "regmean", Params(alpha=alpha), dev, model, tok, DataOptions(), CPU)
        grams = statistics("regmean", model, tok, ups, dev, Params(), DataOptions())["grams"]
        assert merged.kind == "lora" and merged.meta["method"] == "regmean"
        params = {}
        weights = [{}, {}]
        for k in ups[0].modules:
            path = k[len(PREFIX):]
            W0 = model.get_submodule(path).weight.detach().double()
            params[path + ".weight"] = [W0 + u.modules[k].delta().double() for u in ups]
            for i in range(2):
                weights[i][path] = grams[k][i]
        ref = merging_with_regmean_weights(params, weights, reduce_non_diagonal_ratio=alpha)
        for k, m in merged.modules.items():
            path = k[len(PREFIX):]
            W0 = model.get_submodule(path).weight.detach().double()
            assert isinstance(m, LowRank) and m.rank == sum(u.modules[k].rank for u in ups)
            dense = regmean_dense(torch.stack([u.modules[k].delta() for u in ups]), grams[k], alpha)
            assert relerr(m.delta().double(), dense) < 1e-5, k
            assert relerr(m.delta().double(), ref[path + ".weight"] - W0) < 1e-5, k


def test_regmean_lora_handles_a_task_that_leaves_the_module_alone():
    g = torch.Generator().manual_seed(0)
    X = [torch.randn(50, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    G = torch.stack([x.T @ x / 50 for x in X])
    a = LowRank(torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), 0.5)
    c = LowRank(torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g), 2.0)
    got = regmean_lora([a, None, c], G, 0.9).delta().double()
    ref = regmean_dense(torch.stack([a.delta(), torch.zeros(8, 16), c.delta()]), G, 0.9)
    assert relerr(got, ref) < 1e-6
    # the formula solves min Σ_i ‖X_i W − X_i W_i‖² (α = 1): its gradient vanishes there
    Ws = [a.delta().double(), torch.zeros(8, 16, dtype=torch.float64), c.delta().double()]
    W = regmean_dense(torch.stack(Ws), G, 1.0)
    grad = sum(((W - Wi) @ Gi) for Wi, Gi in zip(Ws, G))
    assert float(grad.abs().max()) < 1e-10
    assert torch.allclose(scaled_grams(G, 0.0), torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1)))


def test_regmean_pp_equals_a_plain_layer_by_layer_loop(model_tok):
    """RegMean++: layer l's Grams with layers < l merged and expert i's own layer l, one example at a time on
    dense weights, merged with fusion-bench's per-module RegMean; the same ΔW in every module."""
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import regmean_params_merge

    model, tok = model_tok
    ups = experts(projs=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    dev = dev_data(ups, examples(), "regmean++")
    alpha = 0.8
    merged = merge_with_data(ups, "regmean++", Params(alpha=alpha), dev, model, tok, DataOptions(), CPU)
    done: dict = {}
    for layer in (0, 1):
        here = [k for k in ups[0].modules if f".layers.{layer}." in k]
        grams = [plain_grams(model, tok, dev, i, [k[len(PREFIX):] for k in here],
                             {**done, **{k: u.modules[k].delta() for k in here}}) for i, u in enumerate(ups)]
        for k in here:
            path = k[len(PREFIX):]
            W0 = model.get_submodule(path).weight.detach().double()
            W = regmean_params_merge([W0 + u.modules[k].delta().double() for u in ups], [g[path] for g in grams],
                                     reduce_non_diagonal_ratio=alpha)
            done[k] = (W - W0).float()
    for k, m in merged.modules.items():
        assert relerr(m.delta(), done[k]) < 1e-4, k
    plain = merge_with_data(ups, "regmean", Params(alpha=alpha), dev, model, tok, DataOptions(), CPU)
    k1 = next(k for k in merged.modules if ".layers.1." in k)
    assert relerr(merged.modules[k1].delta(), plain.modules[k1].delta()) > 1e-3  # the lower layer's merge mattered
