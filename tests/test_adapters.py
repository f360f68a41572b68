"""Per-row adapters: many different updates evaluated in one batched call equal separate `eval --adapter`
runs and peft's PeftModel; the frozen lower layers run once per example and change no number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import module_name, random_lora
from typer.testing import CliRunner

from mergetool import evaluate as ev
from mergetool import scoring as sc
from mergetool.adapters import RowAdapters
from mergetool.examples import check_examples
from mergetool.blobs import blob_bytes
from mergetool.methods import Params, merge
from mergetool.model import load_model, resolve_base
from mergetool.updates import PREFIX, Dense, Update, metadata_for, to_tensors

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def capitals(n: int) -> list[dict]:
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == "country-capital"][:n]


def lora(seed, rank, alpha, projs, layers=(0, 1), rslora=False, gain=6.0):
    u = random_lora(seed, rank=rank, alpha=alpha, targets={p: SHAPES[p] for p in projs}, layers=layers,
                    name=f"u{seed}")
    for m in u.modules.values():
        m.B *= gain  # large enough to change predictions
    if rslora:
        u.meta["peft_config"]["use_rslora"] = True
        for m in u.modules.values():
            m.scale = alpha / rank ** 0.5
    return u


def twelve() -> list[Update | None]:
    """LoRA r4/r16/r64 with different alphas, one rslora, one on other modules, one dense, a KnOTS and a TIES
    merge of them, and the base."""
    a = lora(1, 4, 8, ["q_proj", "v_proj", "up_proj"])
    b = lora(2, 16, 16, ["q_proj", "k_proj"])
    c = lora(3, 64, 32, ["up_proj"])  # r=64 on a 128x64 matrix: its factors outweigh it, so it runs dense
    d = lora(4, 8, 16, ["q_proj", "up_proj"], rslora=True)
    e = lora(5, 4, 4, ["o_proj", "gate_proj", "down_proj"])
    g = torch.Generator().manual_seed(6)
    f = Update("dense6", {module_name(i, "q_proj"): Dense(torch.randn(64, 64, generator=g) * 0.05)
                          for i in (0, 1)}, {"name": "dense6", "kind": "dense"})
    h = lora(7, 4, 8, ["v_proj"], layers=(1,))
    k = merge([a, b, d], "knots", Params(), torch.device("cpu"), name="knots-abd")
    t = merge([a, c, e], "ties", Params(density=0.5), torch.device("cpu"), name="ties-ace")
    m = lora(8, 2, 4, ["k_proj", "down_proj"], layers=(0,))
    n = lora(9, 32, 64, ["gate_proj"])
    return [a, b, c, d, e, f, h, k, t, m, n, None]


def save(u: Update, path: Path) -> Path:
    path.write_bytes(blob_bytes(to_tensors(u), metadata_for(u)))
    return path


@pytest.fixture(scope="module")
def setup(tiny_lm):
    model, tok = load_model(resolve_base(str(tiny_lm)), torch.device("cpu"))
    rows = capitals(10)
    exs = check_examples(rows, "x")
    for e in exs:
        e.context = e.rec["prompt"]
    return model, tok, rows, exs


def test_twelve_updates_in_one_batched_call_equal_twelve_eval_runs(tiny_lm, setup, tmp_path):
    from mergetool.cli.main import app

    model, tok, rows, exs = setup
    ups = twelve()
    with RowAdapters(model, ups) as ad:
        calls = []  # the rows each batch is given: several different updates share one forward pass
        set_rows = ad.set_rows
        ad.set_rows = lambda rows: (calls.append(list(rows)), set_rows(rows))[1]
        batched = ev.evaluate(model, tok, exs, "tokens", adapters=ad, jobs=[(i, range(len(exs))) for i in range(len(ups))])
    assert any(len(set(r)) > 3 for r in calls)  # several different updates shared one forward pass
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    for i, u in enumerate(ups):
        args = ["eval", "--base", str(tiny_lm), str(data)]
        if u is not None:
            args += ["--adapter", str(save(u, tmp_path / f"{u.name}.safetensors"))]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        separate = [json.loads(x) for x in r.stdout.splitlines()]
        assert [s["adapter"] for s in separate] == [None if u is None else u.name] * len(rows)
        for s, b in zip(separate, batched[i]):
            assert s["prediction"] == b["prediction"] and s["rank"] == b["rank"]
            assert max(abs(x - y) for x, y in zip(s["logprobs"], b["logprobs"])) < 1e-5
            assert abs(s["p_correct"] - b["p_correct"]) < 1e-5
    base = batched[-1]
    assert sum(any(abs(x - y) > 1e-3 for x, y in zip(b["logprobs"], c["logprobs"]))
               for col in batched[:-1] for b, c in zip(col, base)) > len(rows)  # the updates do change scores


def test_hidden_states_equal_peft(tiny_lm, setup, tmp_path):
    """The LoRA rows' last-layer hidden states equal those of peft's PeftModel loading the same adapter (its
    own r, lora_alpha and use_rslora)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergetool.inputs import load_inputs

    model, tok, rows, _ = setup
    loras = [u for u in twelve()[:5] + twelve()[9:11]]
    dirs = []
    for u in loras:
        d = tmp_path / u.name
        d.mkdir()
        cfg = u.meta["peft_config"]
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
            "use_rslora": cfg.get("use_rslora", False), "target_modules": cfg["target_modules"],
            "lora_dropout": 0.0, "bias": "none"}))
        tensors = {}
        for mod, m in u.modules.items():
            tensors[f"{mod}.lora_A.weight"] = m.A.contiguous()
            tensors[f"{mod}.lora_B.weight"] = m.B.contiguous()
        (d / "adapter_model.safetensors").write_bytes(blob_bytes(tensors, {"format": "pt"}))
        dirs.append(d)
    ups = load_inputs([str(d) for d in dirs])
    seqs = [tok(r["prompt"] + r["choices"][0], add_special_tokens=False).input_ids for r in rows]
    with RowAdapters(model, ups) as ad:
        got = sc.final_hidden(model, seqs, [(i, range(len(seqs))) for i in range(len(ups))], ad, batch_tokens=64)
    for i, d in enumerate(dirs):
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32), d).eval()
        for s, h in zip(seqs, got[i]):
            with torch.no_grad():
                want = pm(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0]
            assert torch.allclose(h, want, atol=1e-5), (loras[i].name, float((h - want).abs().max()))


def test_frozen_prefix_runs_once_per_example_and_changes_nothing(setup):
    """Updates that touch only layer 1: layer 0 runs once per example however many updates are scored, and
    every score equals the one computed without the shared prefix."""
    model, tok, rows, _ = setup
    ups = [lora(20 + i, 4, 8, ["q_proj", "up_proj"], layers=(1,)) for i in range(6)]
    items = sc.encode_choices(tok, [(r["prompt"], r["choices"]) for r in rows])
    seen = []
    h = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0] * a[0].shape[1]))
    try:
        with RowAdapters(model, ups) as ad:
            jobs = [(i, range(len(items))) for i in range(len(ups))] + [(-1, range(len(items)))]
            shared = sc.choice_loglikelihoods(model, items, jobs, ad, batch_tokens=512)
            once = sum(seen)
            seen.clear()
            plain = sc.choice_loglikelihoods(model, items, jobs, ad, batch_tokens=512, share_prefix=False)
            every = sum(seen)
    finally:
        h.remove()
    tokens = sum(sc._packed_len(x) for x in items)
    assert tokens <= sc.ROW  # all ten examples fit one packed row (padded to a multiple of 8)
    assert once == -(-tokens // 8) * 8  # layer 0 saw each example's tokens once, for all 7 jobs
    assert every == len(jobs) * once
    for a, b in zip(shared, plain):
        for x, y in zip(a, b):
            assert [n for _, n in x] == [n for _, n in y]
            assert max(abs(p - q) for (p, _), (q, _) in zip(x, y)) < 1e-5
    assert type(model.model.layers[0]).__name__ == "LlamaDecoderLayer"  # the model is whole again


def test_the_boundary_layer_runs_its_frozen_parts_once_per_distinct_row(setup):
    """Updates on up_proj of layer 1 (and one also on down_proj): in layer 1 the attention, the gate and
    up_proj's frozen product see the same rows under every update, so they run once per distinct row of a
    batch; down_proj, after the updates, runs on every row. The scores equal those computed without any
    sharing, and the model's forwards are its own again afterwards."""
    model, tok, rows, _ = setup
    ups = [lora(40 + i, 4, 8, ["up_proj"], layers=(1,)) for i in range(5)] + \
        [lora(50, 4, 8, ["up_proj", "down_proj"], layers=(1,))]
    items = sc.encode_choices(tok, [(r["prompt"], r["choices"]) for r in rows])
    layer = model.model.layers[1]
    parts = {"attn": layer.self_attn, "gate": layer.mlp.gate_proj, "up": layer.mlp.up_proj,
             "down": layer.mlp.down_proj, "q": layer.self_attn.q_proj}
    seen = {k: 0 for k in parts}
    assert sc.packing_works(model, items)  # its probe runs before the counting

    def count(k):
        def hook(m, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen[k] += x.shape[0]
        return hook

    hs = [m.register_forward_pre_hook(count(k), with_kwargs=True) for k, m in parts.items()]
    for k in ("gate", "up"):  # what the module's own forward computes (hooks see what it was called with)
        m = parts[k]
        m.forward = lambda x, m=m, k=k: (seen.__setitem__(k + "-product", seen.get(k + "-product", 0) + x.shape[0]),
                                         type(m).forward(m, x))[1]
    try:
        with RowAdapters(model, ups) as ad:
            jobs = [(i, range(len(items))) for i in range(len(ups))] + [(-1, range(len(items)))]
            shared = sc.choice_loglikelihoods(model, items, jobs, ad, batch_tokens=4096)
            got = dict(seen)
            plain = sc.choice_loglikelihoods(model, items, jobs, ad, batch_tokens=4096, share_prefix=False)
    finally:
        for h in hs:
            h.remove()
        for k in ("gate", "up"):
            del parts[k].forward
    # one packed row holds the ten examples; all 7 jobs' copies of it share one batch
    assert got["up"] == got["down"] == got["attn"] == got["gate"] == len(jobs)  # called with every row
    assert got["q"] == got["gate-product"] == got["up-product"] == 1  # the frozen work runs once
    for a, b in zip(shared, plain):
        for x, y in zip(a, b):
            assert max(abs(p - q) for (p, _), (q, _) in zip(x, y)) < 1e-5
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_an_update_on_norm_weights_runs_alone_but_not_beside_others(setup):
    """A full model's task vector also changes norm weights, which hooks cannot reach: it is patched in when
    every row uses it (and restored after), and refused as one row among others."""
    from mergetool.errors import MergetoolError

    model, tok, rows, _ = setup
    norm = "model.layers.0.input_layernorm"
    u = Update("ft", {PREFIX + norm: Dense(torch.full((64,), 0.5)), module_name(0, "q_proj"): Dense(torch.zeros(64, 64))},
               {"name": "ft"})
    w = model.get_submodule(norm).weight.detach().clone()
    with RowAdapters(model, [u, lora(1, 4, 8, ["q_proj"])]) as ad:
        ad.use(0)
        assert torch.allclose(model.get_submodule(norm).weight, w + 0.5)
        with pytest.raises(MergetoolError, match="cannot differ between rows"):
            ad.set_rows([0, 1])
        ad.use(1)
        assert torch.equal(model.get_submodule(norm).weight, w)
    assert torch.equal(model.get_submodule(norm).weight, w)


def test_adapters_too_large_for_the_device_stream_through_in_groups(tiny_lm, tmp_path, monkeypatch, capsys):
    """A set of adapters larger than the device's budget is applied group by group: the records are those of
    one group holding them all."""
    import mergetool.adapters as adapters_mod
    from mergetool.cli.main import run

    ups = [u for u in twelve() if u is not None][:5]
    files = [str(save(u, tmp_path / f"{u.name}.safetensors")) for u in ups]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in capitals(4)))
    flags = [x for f in files for x in ("--adapter", f)]
    assert run(["eval", "--base", str(tiny_lm), *flags, str(data)]) == 0
    whole = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    sizes = [adapters_mod.device_bytes(u) for u in ups]
    real = adapters_mod.fitting_groups
    monkeypatch.setattr(adapters_mod, "fitting_groups", lambda us, dev, budget=None: real(us, dev, max(sizes)))
    assert len(real(ups, "cpu", max(sizes))) > 1
    assert run(["eval", "--base", str(tiny_lm), *flags, str(data)]) == 0
    parts = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["adapter"], r["id"]) for r in parts] == [(r["adapter"], r["id"]) for r in whole]
    for a, b in zip(parts, whole):
        assert a["prediction"] == b["prediction"] and a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)
