"""Real-model tier: SmolLM2-135M from the testbed (GGUF from PyPI): experts on country facts through
train-expert, merged, saved as a PEFT directory and a full model, evaluated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experts(smol, tmp_path_factory):
    _, base = smol
    out = tmp_path_factory.mktemp("experts")
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["entity"] in ("Bulgaria", "Colombia") and r["task"] == "country-capital"]
    data = out / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("train-expert", "--base", str(base), "--per-example", "--rank", "16", "--alpha", "32",
                "--target-modules", "self_attn.q_proj,self_attn.v_proj,mlp.up_proj", "--layers", "10,14,18",
                str(data), "--out-dir", str(out / "pool"))
    assert r.returncode == 0, r.stderr
    return sorted((out / "pool").glob("*.safetensors")), data


def test_gguf_and_cached_dir_share_a_fingerprint(smol):
    from mergetool.model import fingerprint, resolve_base

    gguf, d = smol
    assert fingerprint(resolve_base(str(gguf))) == fingerprint(resolve_base(str(d)))


def test_merge_save_peft_and_save_model_agree_on_the_real_model(smol, experts, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, base = smol
    pool, data = experts
    assert len(pool) == 2
    mdir, pdir = tmp_path / "model", tmp_path / "peft"
    # the GGUF file itself is a valid --base: its fingerprint matches experts trained on the cached copy
    r = run_cli("merge", "-m", "knots", "--base", str(gguf), *map(str, pool), "--save-peft", str(pdir))
    assert r.returncode == 0, r.stderr
    r = run_cli("merge", "-m", "knots", "--base", str(base), "--dtype", "float32", *map(str, pool),
                "--save-model", str(mdir), "-o", str(tmp_path / "k.safetensors"))
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(base)
    merged = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), pdir).eval()
    ids = tok("The capital of Bulgaria is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(peft(ids).logits, merged(ids).logits, atol=1e-3)
    # eval with the adapter applied in place equals eval of the saved merged model
    for f in base.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            (mdir / f.name).write_bytes(f.read_bytes())
    a = [json.loads(x) for x in run_cli("eval", "--base", str(base), "--adapter", str(tmp_path / "k.safetensors"),
                                        str(data), check=True).stdout.splitlines()]
    b = [json.loads(x) for x in run_cli("eval", "--base", str(mdir), str(data), check=True).stdout.splitlines()]
    for x, y in zip(a, b):
        assert x["prediction"] == y["prediction"]
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) < 1e-3
