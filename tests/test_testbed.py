"""Real-model tier: SmolLM2-135M from the testbed (GGUF from PyPI) with LoRA experts on country facts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experts(smol, tmp_path_factory):
    from demo import records, train_expert

    from mergetool.io import blob_bytes
    from mergetool.updates import metadata_for, to_tensors

    _, base = smol
    out = tmp_path_factory.mktemp("experts")
    paths = []
    for r in records(["Bulgaria", "Colombia"]):
        u, loss = train_expert(base, r, steps=15)
        assert loss < 0.5, loss
        p = out / f"{u.name}.safetensors"
        p.write_bytes(blob_bytes(to_tensors(u), metadata_for(u)))
        paths.append((p, r))
    return paths


def test_gguf_and_cached_dir_share_a_fingerprint(smol):
    from mergetool.model import fingerprint, resolve_base

    gguf, d = smol
    assert fingerprint(resolve_base(str(gguf))) == fingerprint(resolve_base(str(d)))


def test_experts_learn_their_fact_and_knots_keeps_them(smol, experts, tmp_path):
    from demo import choice_scores
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, base = smol
    mdir, pdir = tmp_path / "model", tmp_path / "peft"
    # the GGUF file itself is a valid --base: fingerprints match the experts trained on the cached copy
    r = run_cli("merge", "-m", "knots", "--inner", "linear", "--base", str(gguf),
                *[str(p) for p, _ in experts], "--save-peft", str(pdir))
    assert r.returncode == 0, r.stderr
    r = run_cli("merge", "-m", "knots", "--inner", "linear", "--base", str(base), "--dtype", "float32",
                *[str(p) for p, _ in experts], "--save-model", str(mdir))
    assert r.returncode == 0, r.stderr
    tok = AutoTokenizer.from_pretrained(base)
    merged = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    from peft import PeftModel

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), pdir).eval()
    for _, rec in experts:
        s = choice_scores(merged, tok, rec)
        assert max(range(8), key=lambda i: s[i]) == rec["answer"], (rec["entity"], s)
        ids = tok(rec["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.allclose(peft(ids).logits, merged(ids).logits, atol=1e-3)
    cfg = json.loads((pdir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
