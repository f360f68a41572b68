"""GPU tier: every method on CUDA agrees with the CPU, and the CLI runs with --device cuda."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora, run_cli

from mergetool.methods import Params, all_methods, get, merge_stream
from mergetool.updates import LowRank

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DETERMINISTIC = [m for m in sorted(all_methods()) if m not in ("dare-linear", "dare-ties", "della")]


def merged(updates, method, device, **kw):
    out = {}
    for mod, r in merge_stream([u.to(device) for u in updates], get(method), Params(**kw), torch.device(device)):
        out[mod] = (r.delta() if isinstance(r, LowRank) else r).cpu()
    return out


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_cuda_matches_cpu(method):
    us = [random_lora(s, rank=2 + s) for s in range(3 if method != "slerp" else 2)]
    kw = {"base_acc": [0.5, 0.2, 0.9]} if method == "weighted-base" else {}
    a, b = merged(us, method, "cpu", **kw), merged(us, method, "cuda", **kw)
    for k in a:
        assert float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) < 1e-4, (method, k)


def test_random_methods_are_reproducible_on_cuda():
    us = [random_lora(s) for s in range(3)]
    for m in ("dare-linear", "dare-ties", "della"):
        a = merged(us, m, "cuda", seed=5, density=0.5)
        b = merged(us, m, "cuda", seed=5, density=0.5)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_on_cuda(adapters, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run_cli("merge", "-m", "knots", "--device", "cuda", *map(str, adapters), "-o", str(out))
    assert r.returncode == 0, r.stderr


def test_packed_eval_in_bf16_on_cuda_agrees_with_fp32_on_cpu(smol):
    """On CUDA (bf16) the packed route is taken and predicts what fp32 on the CPU predicts, but near-ties."""
    import json
    from pathlib import Path

    from mergetool import evaluate as ev
    from mergetool.examples import check_examples
    from mergetool.model import load_model, resolve_base

    rows = [json.loads(x) for x in (Path(__file__).resolve().parents[1] / "examples" / "data" /
                                    "countries.jsonl").read_text().splitlines()][:64]
    got = {}
    for dev in ("cpu", "cuda"):
        model, tok = load_model(resolve_base(str(smol[1])), torch.device(dev))
        exs = check_examples(rows, "x")
        for e in exs:
            e.context = e.rec["prompt"]
        got[dev] = ev.evaluate(model, tok, exs, "none")[0]
        assert model._mergetool_packing is True
    for a, b in zip(got["cpu"], got["cuda"]):
        top = sorted(a["logprobs"], reverse=True)
        if top[0] - top[1] > 0.2:  # not a near-tie
            assert a["prediction"] == b["prediction"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 0.3


def test_stacked_training_on_cuda(smol):
    """Per-example experts train on CUDA (bf16 model, fp32 adapters): losses fall, and the frozen-prefix
    cache gives the losses of full forward passes."""
    import json
    from pathlib import Path

    from mergetool import train as tr
    from mergetool.model import load_model, resolve_base

    rows = [json.loads(x) for x in (Path(__file__).resolve().parents[1] / "examples" / "data" /
                                    "countries.jsonl").read_text().splitlines()]
    texts = [("", t) for t in list(dict.fromkeys(r["text"] for r in rows))[:8]]
    model, tok = load_model(resolve_base(str(smol[1])), torch.device("cuda"))
    spec = tr.LoraSpec(epochs=1)
    names = tr.target_modules(model, spec, default_middle=True)
    st0, first = tr.train_stacked(model, tok, texts, spec, names, list(range(8)))
    st0.remove()
    st, last = tr.train_stacked(model, tok, texts, tr.LoraSpec(), names, list(range(8)))
    assert sum(last) < 0.5 * sum(first)
    ids, mask, lab = tr.lm_batch(tok, texts, "cuda")
    with torch.no_grad():
        full = tr.row_losses(model(input_ids=ids, attention_mask=mask).logits, lab).tolist()
    assert max(abs(a - b) for a, b in zip(full, last)) < 0.05
    st.remove()
