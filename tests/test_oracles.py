"""Agreement with the peers on the same tensors: mergekit's functions and peft's add_weighted_adapter.

Random methods (DARE, DELLA) are compared on the same random draw: mergekit/peft get our masks
through a patched ``torch.bernoulli``, so what is compared is everything but the draw.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora

from mergetool.methods import Params, get, merge_stream
from mergetool.methods.primitives import della_keep_probs, drop_mask
from mergetool.updates import LowRank

mk = pytest.importorskip("mergekit")
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import PerInputValues, TensorEntry, TensorGroup  # noqa: E402

CPU = torch.device("cpu")
TOL = 1e-5


def ours(updates, method, **kw):
    return {m: (r.delta() if isinstance(r, LowRank) else r)
            for m, r in merge_stream(updates, get(method), Params(**kw), CPU)}


def deltas(u):
    return {m: x.delta() for m, x in u.modules.items()}


def relerr(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def group(ds, base=True):
    entries = tuple(TensorEntry(i, d) for i, d in enumerate(ds))
    if base:
        entries = (TensorEntry("base", torch.zeros_like(ds[0]), is_base=True),) + entries
    return TensorGroup(entries)


def per(values):
    return PerInputValues(list(enumerate(values)))


def mk_gta(name, ds, weights, density=1.0, rescale=False, normalize=False, **extra):
    params = {"weight": per(weights), "density": per([density] * len(ds)), "rescale": rescale,
              "normalize": normalize, "lambda": 1.0, "int8_mask": False}
    params.update({k: per([v] * len(ds)) for k, v in extra.items()})
    return registry.get(name).merge_group(group(ds), **params)


class MaskFeed:
    """Hands out pre-drawn masks to a peer's torch.bernoulli calls, in the order the peer asks."""

    def __init__(self, masks):
        self.masks = list(masks)

    def __call__(self, probs, *a, **k):
        m = self.masks.pop(0)
        assert m.shape == probs.shape
        return m.to(probs.dtype)


@pytest.fixture
def loras():
    return [random_lora(s, rank=2 + s) for s in range(3)]


W = [0.7, 1.3, 0.4]


def test_linear_and_task_arithmetic_match_mergekit(loras):
    for method, mname in (("linear", "task_arithmetic"), ("task-arithmetic", "task_arithmetic")):
        got = ours(loras, method, weights=W)
        for mod in got:
            ref = mk_gta(mname, [deltas(u)[mod] for u in loras], W)
            assert relerr(got[mod], ref) < TOL
    from mergekit.merge_methods.base import TensorBatch

    got = ours(loras, "linear", weights=W)
    for mod in got:
        ds = [deltas(u)[mod].unsqueeze(0) for u in loras]  # a batch of one output row-block
        ref = registry.get("linear").merge_batch(TensorBatch(tuple(ds)), weight=torch.tensor([W]), normalize=False)
        assert relerr(got[mod], ref[0]) < TOL


@pytest.mark.parametrize("density", [0.2, 0.7])
def test_ties_matches_mergekit_tensor_scope(loras, density):
    got = ours(loras, "ties", weights=W, density=density, trim_scope="tensor")
    for mod in got:
        ref = mk_gta("ties", [deltas(u)[mod] for u in loras], W, density=density, normalize=True)
        assert relerr(got[mod], ref) < TOL, mod


def test_magnitude_and_breadcrumbs_match_mergekit(loras):
    got = ours(loras, "breadcrumbs", weights=W, density=0.6, gamma=0.05, trim_scope="tensor")
    for mod in got:
        ref = mk_gta("breadcrumbs", [deltas(u)[mod] for u in loras], W, density=0.6, gamma=0.05)
        assert relerr(got[mod], ref) < TOL


def _dare_masks(loras, got_modules, density, seed):
    masks = []
    for mod in got_modules:
        shape = tuple(deltas(loras[0])[mod].shape)
        masks += [drop_mask(shape, density, seed, i, mod, CPU) for i in range(len(loras))]
    return masks


@pytest.mark.parametrize("method,mname,normalize", [("dare-linear", "dare_linear", False),
                                                    ("dare-ties", "dare_ties", True)])
def test_dare_matches_mergekit_with_l1_rescale(loras, method, mname, normalize, monkeypatch):
    got = ours(loras, method, weights=W, density=0.4, rescale="l1", seed=7)
    feed = MaskFeed(_dare_masks(loras, got, 0.4, 7))
    monkeypatch.setattr(torch, "bernoulli", feed)
    for mod in got:
        ref = mk_gta(mname, [deltas(u)[mod] for u in loras], W, density=0.4, rescale=True, normalize=normalize)
        assert relerr(got[mod], ref) < TOL


def della_masks(loras, modules, density, epsilon, seed):
    """Our DELLA keep-masks of every module and task, in the order a peer draws them."""
    masks = []
    for mod in modules:
        for i, u in enumerate(loras):
            d = deltas(u)[mod]
            masks.append(drop_mask(tuple(d.shape), della_keep_probs(d, density, epsilon), seed, i, mod, CPU))
    return masks


def test_della_matches_mergekit(loras, monkeypatch):
    got = ours(loras, "della", weights=W, density=0.5, epsilon=0.2, rescale="l1", seed=1)
    monkeypatch.setattr(torch, "bernoulli", MaskFeed(della_masks(loras, got, 0.5, 0.2, 1)))
    for mod in got:
        ref = mk_gta("della", [deltas(u)[mod] for u in loras], W, density=0.5, rescale=True, normalize=True,
                     epsilon=0.2)
        assert relerr(got[mod], ref) < TOL


def test_slerp_matches_mergekit(loras):
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    for t in (0.0, 0.3, 0.5, 1.0):
        got = ours(loras[:2], "slerp", t=t)
        for mod in got:
            a, b = deltas(loras[0])[mod], deltas(loras[1])[mod]
            ref = mk_slerp(torch.tensor(t), a.reshape(1, -1), b.reshape(1, -1)).reshape(a.shape)
            assert relerr(got[mod], ref) < TOL


def test_multislerp_karcher_model_stock_match_mergekit(loras):
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    got = ours(loras, "multislerp", weights=W)
    for mod in got:
        ref = registry.get("multislerp").merge_group(group([deltas(u)[mod] for u in loras], base=False),
                                                     weight=per(W), normalize_weights=True, eps=1e-8)
        assert relerr(got[mod], ref) < TOL
    got = ours(loras, "karcher")
    for mod in got:
        ref = karcher_merge_tensors([deltas(u)[mod] for u in loras], [1 / 3] * 3)
        assert relerr(got[mod], ref) < TOL
    got = ours(loras, "model-stock")
    for mod in got:
        ref = registry.get("model_stock").merge_group(group([deltas(u)[mod] for u in loras]), filter_wise=False)
        assert relerr(got[mod], ref) < TOL


# ----------------------------------------------------------------------------- peft


def _peft_model(loras):
    """A tiny Llama with our adapters loaded into peft, by name."""
    from conftest import tiny_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    pm = None
    for u in loras:
        r = next(iter(u.modules.values())).rank
        alpha = u.meta["peft_config"]["lora_alpha"]
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=u.name)
        else:
            pm.add_adapter(u.name, cfg)
        sd = {}
        for mod, m in u.modules.items():
            sd[f"{mod}.lora_A.{u.name}.weight"] = m.A
            sd[f"{mod}.lora_B.{u.name}.weight"] = m.B
        missing = pm.load_state_dict(sd, strict=False)
        assert not missing.unexpected_keys
    return pm


def _peft_deltas(pm, name, modules):
    out = {}
    for mod in modules:
        target = pm.get_submodule(mod)
        out[mod] = target.get_delta_weight(name).float()
    return out


def test_linear_matches_peft_cat(loras):
    pm = _peft_model(loras)
    names = [u.name for u in loras]
    pm.add_weighted_adapter(names, W, "cat", combination_type="cat")
    got = ours(loras, "linear", weights=W)
    ref = _peft_deltas(pm, "cat", got)
    for mod in got:
        assert relerr(got[mod], ref[mod]) < TOL


@pytest.mark.parametrize("method,ctype", [("linear", "svd"), ("ties", "ties_svd"), ("magnitude", "magnitude_prune_svd")])
def test_svd_combinations_match_peft(loras, method, ctype):
    pm = _peft_model(loras)
    names = [u.name for u in loras]
    w = [1.0, 1.0, 1.0] if method == "ties" else W  # peft's TIES elects on unweighted signs
    pm.add_weighted_adapter(names, w, "m", combination_type=ctype, svd_rank=8, density=0.3,
                            svd_full_matrices=False)
    kw = dict(weights=w, density=0.3, trim_scope="tensor")
    got = {m: r.delta() for m, r in _rank(merge_stream(loras, get(method), Params(**kw), CPU), 8)}
    ref = _peft_deltas(pm, "m", got)
    for mod in got:
        assert relerr(got[mod], ref[mod]) < 1e-4, mod


def test_dare_matches_peft(loras, monkeypatch):
    pm = _peft_model(loras)
    names = [u.name for u in loras]
    got = {m: r.delta() for m, r in _rank(merge_stream(loras, get("dare-linear"),
                                                       Params(weights=W, density=0.5, seed=2), CPU), 8)}
    # peft walks its modules in model order and the tasks in order: the same order as ours
    masks = _dare_masks(loras, got, 0.5, 2)
    monkeypatch.setattr(torch, "bernoulli", MaskFeed(masks))
    pm.add_weighted_adapter(names, W, "d", combination_type="dare_linear_svd", svd_rank=8, density=0.5,
                            svd_full_matrices=False)
    ref = _peft_deltas(pm, "d", got)
    for mod in got:
        assert relerr(got[mod], ref[mod]) < 1e-4


def _rank(stream, r):
    from mergetool.methods import to_rank

    return to_rank(stream, r)
