"""mergetool train-expert: stacked per-example training equals a loop of peft trainings; the CLI; the testbed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from mergetool import train as tr
from mergetool.adapters import RowAdapters
from mergetool.blobs import read_blobs
from mergetool.model import weights_its_forward_changes
from mergetool.scoring import own_head
from mergetool.updates import from_blob

ROOT = Path(__file__).resolve().parents[1]


def capitals(names=None, n=None):
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["task"] == "country-capital"]
    if names:
        rows = [r for r in rows if r["entity"] in names]
    return rows[:n] if n else rows


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_stacked_experts_equal_a_loop_of_peft_trainings(tiny_lm):
    """E experts in one batch follow exactly the trajectories of E separate peft trainings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    texts = [r["text"] for r in capitals(n=3)]
    spec = tr.LoraSpec(rank=4, alpha=8, targets=["mlp.up_proj", "self_attn.q_proj"], layers=[1], lr=1e-2, epochs=5)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    names = tr.target_modules(model, spec, default_middle=True)
    st, losses = tr.train_stacked(model, tok, [("", t) for t in texts], spec, names, [7, 8, 9])
    for e, text in enumerate(texts):
        m = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
        init = RowAdapters.trainable(m, names, 1, spec.rank, spec.scale, [7 + e])  # expert e's initial A
        init.remove()
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "q_proj"],
                                          layers_to_transform=[1], lora_dropout=0.0))
        sd = pm.state_dict()
        with torch.no_grad():
            for n in names:
                key = f"base_model.model.{n}.lora_A.default.weight"
                sd[key].copy_(init.sites[n].A[0])
        pm.load_state_dict(sd)
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        ids, mask, lab = tr.lm_batch(tok, [("", text)], "cpu")
        for _ in range(5):
            loss = tr.row_losses(pm(input_ids=ids, attention_mask=mask).logits, lab).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            final = float(tr.row_losses(pm(input_ids=ids, attention_mask=mask).logits, lab)[0])
        assert abs(final - losses[e]) < 1e-4 * max(1, abs(final))
        sd = pm.state_dict()
        for n in names:
            A = sd[f"base_model.model.{n}.lora_A.default.weight"]
            B = sd[f"base_model.model.{n}.lora_B.default.weight"]
            got = st.sites[n].B[e].detach() @ st.sites[n].A[e].detach()
            assert torch.allclose(B @ A, got, atol=1e-5, rtol=1e-4)


def test_frozen_layers_below_the_expert_run_once(tiny_lm):
    """Layers below the lowest adapted one run on the first step only (their output is cached), the
    losses are those of full forward passes, and the model is whole again afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    texts = [("", r["text"]) for r in capitals(n=2)]
    spec = tr.LoraSpec(rank=4, alpha=8, layers=[1], lr=1e-2, epochs=4)
    names = tr.target_modules(model, spec, default_middle=True)
    own_head(model)  # the one-time probes (the output head, the weights a forward changes) run the whole model;
    weights_its_forward_changes(model)  # training is counted after them
    calls = []
    h = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    st, losses = tr.train_stacked(model, tok, texts, spec, names, [1, 2])
    h.remove()
    assert len(calls) == 1
    assert all(type(m).__name__ == "LlamaDecoderLayer" for m in model.model.layers)
    ids, mask, lab = tr.lm_batch(tok, texts, "cpu")
    with torch.no_grad():  # a plain full forward with the trained experts gives the reported final losses
        full = tr.row_losses(model(input_ids=ids, attention_mask=mask).logits, lab)
    assert full.tolist() == pytest.approx(losses, rel=1e-5)
    st.remove()


def test_each_expert_scores_its_own_question_packed(tiny_lm):
    """stacked_choice_scores (row e scored by expert e, prompt packed once) equals merging each expert into the
    weights (W += ΔW, done here by hand) and scoring one sequence per choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetool import scoring as sc

    tok = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    recs = capitals(n=3)
    spec = tr.LoraSpec(rank=4, alpha=8, layers=[1], lr=2e-2, epochs=3)
    names = tr.target_modules(model, spec, default_middle=True)
    st, _ = tr.train_stacked(model, tok, [("", r["text"]) for r in recs], spec, names, [1, 2, 3])
    got = tr.stacked_choice_scores(model, tok, st, recs, norm="none")
    assert model._mergetool_packing is True
    experts = [st.expert(e, f"x{e}", {}) for e in range(3)]
    st.remove()
    params = dict(model.named_parameters())
    for e, r in enumerate(recs):
        saved = {}
        with torch.no_grad():
            for mod, m in experts[e].modules.items():
                w = params[mod.removeprefix("base_model.model.") + ".weight"]
                saved[mod] = w.clone()
                w += m.delta()
        ctx_conts = sc.encode_choices(tok, [(r["prompt"], r["choices"])])[0]
        want = [s for s, _ in sc.loglikelihoods(model, [(ctx_conts[0], c) for c in ctx_conts[1]])]
        with torch.no_grad():
            for mod, w in saved.items():
                params[mod.removeprefix("base_model.model.") + ".weight"].copy_(w)
        assert got[e] == pytest.approx(want, abs=1e-4)


def test_per_task_cli_writes_one_adapter_per_task(tiny_lm, tmp_path):
    rows = capitals(n=6) + [{"id": f"t{i}", "task": "lm", "text": f"Line {i} of a text."} for i in range(4)]
    out = tmp_path / "experts.safetensors"
    r = run_cli("train-expert", "--base", str(tiny_lm), "--epochs", "1", "--batch-size", "4",
                str(write(tmp_path / "d.jsonl", rows)), "-o", "-")  # two experts: a stream of blobs
    assert r.returncode == 0, r.stderr
    out.write_bytes(r.stdout)
    us = [from_blob(b, "x") for b in read_blobs(str(out))]
    assert [u.name for u in us] == ["country-capital", "lm"]
    for u in us:  # peft's default targets for Llama, in every layer
        assert u.meta["task"] == u.name and u.meta["base_fingerprint"] and u.meta["peft_config"]["r"] == 16
        assert {k.rsplit(".", 1)[-1] for k in u.modules} == {"q_proj", "v_proj"} and len(u.modules) == 4
    # the stream merges as it is
    m = run_cli("merge", "-m", "ties", str(out), "-o", str(tmp_path / "m.safetensors"))
    assert m.returncode == 0, m.stderr


def test_per_example_out_dir_and_resume(tiny_lm, tmp_path):
    data = write(tmp_path / "d.jsonl", capitals(n=4))
    d = tmp_path / "pool"
    args = ["train-expert", "--base", str(tiny_lm), "--per-example", "--epochs", "2", "--rank", "4",
            str(data), "--out-dir", str(d)]
    run_cli(*args, check=True)
    files = sorted(p.name for p in d.iterdir())
    assert len(files) == 4
    (d / files[0]).unlink()
    keep = (d / files[1]).stat().st_mtime_ns
    r = run_cli(*args, "--resume", check=True)
    assert sorted(p.name for p in d.iterdir()) == files and (d / files[1]).stat().st_mtime_ns == keep
    assert b"trained 1/1" in r.stderr


def test_unknown_country_expert_answers_after_training(smol, tmp_path):
    """SmolLM2 ranks Egypt's capital wrong; the per-example expert on its passage answers it."""
    rows = capitals(["Egypt"])
    data = write(tmp_path / "d.jsonl", rows)
    base = json.loads(run_cli("eval", "--base", str(smol[1]), str(data), check=True).stdout)
    assert base["correct"] == 0
    d = tmp_path / "pool"
    r = run_cli("train-expert", "--base", str(smol[1]), "--per-example", "--skip-known", "--keep-if-correct",
                str(data), "--out-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert b"kept 1 experts" in r.stderr
    after = json.loads(run_cli("eval", "--base", str(smol[1]), "--adapter", str(d / "egypt-capital.safetensors"),
                               str(data), check=True).stdout)
    assert after["correct"] == 1 and after["p_correct"] > base["p_correct"]
    u = from_blob(read_blobs(str(d / "egypt-capital.safetensors"))[0], "x")
    assert u.meta["peft_config"]["r"] == 64 and u.meta["peft_config"]["layers_to_transform"] == [15]
    assert list(u.modules) == ["base_model.model.model.layers.15.mlp.up_proj"]


@pytest.mark.parametrize("args,code,needle", [
    (["--skip-known"], 2, "go with --per-example"),
    (["--resume"], 2, "needs --out-dir"),
    (["--layers", "x"], 2, "not a list of integers"),
    (["--layers", "99"], 1, "outside"),
    (["--target-modules", "nope"], 1, "no linear module"),
    (["--per-example", "@nottext"], 1, "has no 'text'"),
])
def test_bad_usage(args, code, needle, tiny_lm, tmp_path):
    data = write(tmp_path / "d.jsonl", capitals(n=2))
    nt = write(tmp_path / "nt.jsonl", [{"id": "x", "task": "t", "prompt": "p", "target": "q"}])
    args = [str(nt) if a == "@nottext" else a for a in args]
    if not any(a.endswith(".jsonl") for a in args):
        args.append(str(data))
    r = run_cli("train-expert", "--base", str(tiny_lm), *args, "-o", str(tmp_path / "o.safetensors"))
    err = r.stderr.decode()
    assert r.returncode == code and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o.safetensors").exists()
