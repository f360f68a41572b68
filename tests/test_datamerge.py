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
from mergetool.methods import Params, merge
from mergetool.methods.dataaware import regmean_dense, regmean_lora
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


def examples(n_per_task=5, choices=8):
    """Country questions, with the right answer and the first ``choices`` − 1 others."""
    rs = []
    for r in rows(n_per_task):
        right = r["choices"][r["answer"]]
        keep = [c for c in r["choices"] if c != right][:choices - 1]
        at = r["answer"] % choices
        rs.append({**r, "choices": keep[:at] + [right] + keep[at:], "answer": at})
    exs = check_examples(rs, "dev")
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
    # α scales the off-diagonal entries of every Gram (the paper's G̃ = α G + (1 − α) diag G), written out here
    for alpha in (0.0, 0.3):
        Gt = alpha * G + (1 - alpha) * torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
        ref = torch.linalg.solve(Gt.sum(0), sum(Wi @ Gi for Wi, Gi in zip(Ws, Gt)).T).T
        assert relerr(regmean_dense(torch.stack(Ws), G, alpha), ref) < 1e-10


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


# ----------------------------------------------------------------------------- Fisher


def plain_fisher(model, tok, dev, i, update) -> dict:
    """Task i's diagonal Fisher: each example alone, each choice its own sequence, through the model with expert
    i's ΔW added into the weights; E_c[(∇_W log p(c|x))²] under the softmax of the choices' mean token log-probs."""
    from mergetool.scoring import encode_choices

    m = dense_model(model, {k: x.delta() for k, x in update.modules.items()})
    for p in m.parameters():
        p.requires_grad_(False)
    paths = [k[len(PREFIX):] for k in update.modules]
    Ws = [m.get_submodule(p).weight.requires_grad_(True) for p in paths]
    F = [torch.zeros_like(w, dtype=torch.float64) for w in Ws]
    for j in dev.of[i]:
        e = dev.examples[j]
        (ctx, conts), = encode_choices(tok, [(e.context, e.rec["choices"])])
        scores = []
        for c in conts:
            lp = torch.log_softmax(m(input_ids=torch.tensor([ctx + c[:-1]])).logits[0].float(), -1)
            scores.append(sum(lp[len(ctx) - 1 + t, tkn] for t, tkn in enumerate(c)) / len(c))
        logp = torch.log_softmax(torch.stack(scores), 0)
        for c in range(len(conts)):
            gs = torch.autograd.grad(logp[c], Ws, retain_graph=True)
            for f, g in zip(F, gs):
                f += float(logp[c].detach().exp()) * g.double() ** 2
    return {PREFIX + p: f / len(dev.of[i]) for p, f in zip(paths, F)}


def test_fisher_equals_a_plain_per_example_loop_and_merges_as_fusion_bench(model_tok):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights

    model, tok = model_tok
    ups = experts()
    dev = dev_data(ups, examples(3, choices=4), "fisher")
    fishers = statistics("fisher", model, tok, ups, dev, Params(), DataOptions())["fisher"]
    for i, u in enumerate(ups):
        ref = plain_fisher(model, tok, dev, i, u)
        for k in u.modules:
            assert relerr(fishers[k][i].double(), ref[k]) < 1e-4, k
    merged = merge(ups, "fisher", Params(stats={"fisher": fishers}), CPU)
    params, fw = {}, [{}, {}]
    for k in ups[0].modules:
        path = k[len(PREFIX):] + ".weight"
        W0 = model.get_submodule(k[len(PREFIX):]).weight.detach().double()
        params[path] = [W0 + u.modules[k].delta().double() for u in ups]
        for i in range(2):
            fw[i][path] = fishers[k][i].double()
    ref = merging_with_fisher_weights(params, fw, torch.ones(2, dtype=torch.float64) / 2,
                                      normalize_fisher_weight=True, minimal_fisher_weight=1e-6)
    for k, d in merged.modules.items():
        path = k[len(PREFIX):] + ".weight"
        W0 = model.get_submodule(k[len(PREFIX):]).weight.detach().double()
        assert relerr(d.delta().double(), ref[path] - W0) < 1e-5, k


# ----------------------------------------------------------------------------- AdaMerging


def test_adamerging_follows_fusion_bench_layer_wise_merged_model(model_tok):
    """The same entropy loss, the same gradients and so the same Adam steps as fusion-bench's LayerWiseMergedModel
    (the task vectors added into dense weights through torch.func.functional_call), one coefficient per task and
    module; and task-wise, one per task."""
    pytest.importorskip("fusion_bench")
    import copy

    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel

    from mergetool.scoring import encode_choices

    model, tok = model_tok
    ups = experts()
    dev = dev_data(ups, examples(2, choices=3), "adamerging", ("mc",))
    steps, lr = 2, 0.05
    for granularity in ("layer", "task"):
        got = statistics("adamerging", model, tok, ups, dev, Params(),
                         DataOptions(steps=steps, lr=lr, granularity=granularity))
        order = [PREFIX + p for p, _ in model.named_modules() if PREFIX + p in ups[0].modules]
        pre = copy.deepcopy(model)
        for p in pre.parameters():
            p.requires_grad_(False)
        for k in order:
            pre.get_submodule(k[len(PREFIX):]).weight.requires_grad_(True)
        fts = [dense_model(model, {k: u.modules[k].delta() for k in order}) for u in ups]
        lw = torch.full((2, len(order)), 0.3)
        wrapped = LayerWiseMergedModel(lw, pre, fts, clamp_weights=False, strict=False)
        if granularity == "task":  # one shared coefficient per task: tie the columns
            free = torch.nn.Parameter(torch.full((2, 1), 0.3))
            params = [free]
        else:
            params = [wrapped.merge_weight]
        opt = torch.optim.Adam(params, lr=lr)
        items = encode_choices(tok, [(e.context, e.rec["choices"]) for e in dev.examples])
        losses = []
        for step in range(steps + 1):
            if granularity == "task":
                wrapped.merge_weight.data = free.detach().expand(2, len(order)).clone()
                wrapped.merge_weight.requires_grad_(True)
            wrapped.merge_weights()
            loss = 0.0
            for idx in dev.of:
                for j in idx:
                    ctx, conts = items[j]
                    sc = []
                    for c in conts:
                        lp = torch.log_softmax(wrapped(input_ids=torch.tensor([ctx + c[:-1]])).logits[0].float(), -1)
                        sc.append(sum(lp[len(ctx) - 1 + t, tkn] for t, tkn in enumerate(c)) / len(c))
                    p = torch.log_softmax(torch.stack(sc), 0)
                    loss = loss - (p.exp() * p).sum() / len(idx)
            losses.append(float(loss.detach()))
            if step < steps:
                opt.zero_grad()
                wrapped.merge_weight.grad = None
                loss.backward()
                if granularity == "task":
                    free.grad = wrapped.merge_weight.grad.sum(1, keepdim=True)
                opt.step()
        lam = (free.detach().expand(2, len(order)) if granularity == "task" else wrapped.merge_weight.detach())
        for m, k in enumerate(order):
            assert torch.allclose(torch.tensor(got["coefficients"][k]), lam[:, m], atol=1e-5), (granularity, k)
        assert abs(got["info"]["entropy_before"] - losses[0]) < 1e-5 * abs(losses[0])
        assert abs(got["info"]["entropy_after"] - losses[-1]) < 1e-4 * abs(losses[-1])
        assert not torch.allclose(lam, torch.full_like(lam, 0.3))  # the steps moved the coefficients


# ----------------------------------------------------------------------------- LoraHub


@pytest.mark.parametrize("method", ["adamerging", "fisher"])
def test_the_head_is_decided_before_the_frozen_prefix_is_fed(tiny_lm, method):
    """The data-aware merges run the model themselves on packed batches whose layers below the adapted ones are fed
    from a cache; whether the model's head can run on the gathered hidden states alone is decided before that
    feeding starts. Before, AdaMerging's and the Fisher's probe ran inside it, failed on the fed states' shape,
    and every step computed the logits of the whole vocabulary at every position (exact, and measured side by
    side only slightly slower: BENCHMARKS.md)."""
    model, tok = load_model(resolve_base(str(tiny_lm)), CPU)
    ups = experts(layers=(1,))  # layer 0 is the frozen prefix
    dev = dev_data(ups, examples(2, choices=3), method, ("mc",))
    statistics(method, model, tok, ups, dev, Params(), DataOptions(steps=1, lr=0.01))
    assert getattr(model, "_mergetool_head", None) is True


def test_lorahub_loss_is_the_answer_cross_entropy_of_the_weighted_sum(model_tok):
    """Judge.answer_losses of Σ w_i ΔW_i: the mean cross-entropy over every answer token of the dev examples, as
    a causal LM's loss on one batch of them (LoraHub's default_get_loss before its division by n)."""
    from mergetool.merging.candidates import Judge
    from mergetool.merging.data import answer_items

    model, tok = model_tok
    ups = experts()
    dev = dev_data(ups, examples(3), "lorahub")
    ws = [[0.0, 0.0], [0.7, -0.4], [1.5, 1.2]]
    got = Judge(model, tok, dev).answer_losses([merge(ups, "linear", Params(weights=w), CPU) for w in ws])
    for w, g in zip(ws, got):
        m = dense_model(model, {k: w[0] * ups[0].modules[k].delta() + w[1] * ups[1].modules[k].delta()
                                for k in ups[0].modules})
        total, n = 0.0, 0
        with torch.no_grad():
            for ctx, (cont,) in answer_items(tok, dev.examples):
                lp = torch.log_softmax(m(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].double(), -1)
                total -= float(sum(lp[len(ctx) - 1 + t, tkn] for t, tkn in enumerate(cont)))
                n += len(cont)
        assert abs(g - total / n) < 1e-5 * total / n


def test_lorahub_judges_each_generation_in_one_pass_and_stays_in_bounds(model_tok, monkeypatch):
    from mergetool.merging import candidates

    model, tok = model_tok
    ups = experts()
    dev = dev_data(ups, examples(3), "lorahub")
    calls = []
    real = candidates.Judge.answer_losses
    monkeypatch.setattr(candidates.Judge, "answer_losses", lambda self, us: calls.append(len(us)) or real(self, us))
    merged = merge_with_data(ups, "lorahub", Params(), dev, model, tok, DataOptions(budget="12", population=4), CPU)
    assert calls == [4, 4, 4]
    w = merged.meta["params"]["coefficients"]
    assert len(w) == 2 and all(-1.5 <= x <= 1.5 for x in w)
    assert merged.meta["data"]["evaluated"] == 12 and merged.meta["data"]["optimizer"] == "CMA-ES"
    ref = merge(ups, "linear", Params(weights=w), CPU)
    assert all(relerr(merged.modules[k].delta(), ref.modules[k].delta()) < 1e-6 for k in ref.modules)


@pytest.mark.parametrize("method", ["regmean", "regmean++", "fisher", "adamerging", "lorahub"])
def test_a_dora_is_merged_on_data_as_its_effective_update(model_tok, tiny_lm, method):
    """A DoRA expert is what it does to the model: each data-aware method on a DoRA and a LoRA (statistics
    gathered with the DoRA applied as peft applies it) equals the same method on the DoRA's effective update
    W' − W, given as a dense delta, and the same LoRA."""
    from mergetool.inputs import BaseWeights
    from mergetool.updates import Dense, Dora, Update, dora_norms

    model, tok = model_tok
    first, second = experts()
    bw = BaseWeights(resolve_base(str(tiny_lm)))
    g = torch.Generator().manual_seed(3)
    mods = {}
    for mod, m in first.modules.items():
        param = mod[len(PREFIX):] + ".weight"
        W = bw.read(param, CPU)
        mag = dora_norms(W, m) * (1 + 0.5 * torch.rand(m.shape[0], generator=g))  # far from a plain LoRA's
        mods[mod] = Dora(param=param, base=bw, source=first.name, lora=m, magnitude=mag)
    dora = Update(first.name, mods, dict(first.meta))
    dense = Update(first.name, {k: Dense(d.delta(CPU)) for k, d in mods.items()}, dict(first.meta))
    # the DoRA is not its LoRA: the check below could not pass by ignoring the magnitude
    assert relerr(mods[next(iter(mods))].delta(CPU), first.modules[next(iter(mods))].delta()) > 0.1
    opts = DataOptions(steps=3, budget="8", population=4)
    exs = examples()
    got, want = (merge_with_data(us, method, Params(), dev_data(us, exs, method), model, tok, opts, CPU)
                 for us in ([dora, second], [dense, second]))
    assert set(got.modules) == set(want.modules)
    for k in want.modules:
        assert relerr(got.modules[k].delta(), want.modules[k].delta()) < 1e-4, (method, k)
