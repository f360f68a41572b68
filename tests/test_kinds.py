"""Every kind of PEFT LoRA adapter people train, against peft: DoRA, rsLoRA, rank/alpha patterns with
layers_to_transform, all-linear, modules_to_save, LoRA on embeddings, trained biases (bias='all', 'lora_only',
lora_bias). For each: eval's log-probs equal peft's forward (one adapter per batch row), merges equal the
base plus the weighted sum of peft's merge_and_unload deltas (peft#3761: peft's own add_weighted_adapter is
wrong for DoRA, rsLoRA and lora_bias), --save-peft loads in peft with the logits of --save-model, DoRA trains
as peft trains it, and what stays unsupported is refused in one line that names the adapter's kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from typer.testing import CliRunner

from mergetool import evaluate as ev
from mergetool import scoring as sc
from mergetool import train as tr
from mergetool.adapters import RowAdapters
from mergetool.examples import check_examples
from mergetool.inputs import load_inputs
from mergetool.methods import Params, all_methods, get, merge_stream
from mergetool.model import load_model, resolve_base
from mergetool.updates import PREFIX, Dense, LowRank, Update

ROOT = Path(__file__).resolve().parents[1]

# The adapter kinds: peft LoraConfig arguments (lora_dropout 0), each trained (here: randomised) on the base.
KINDS = {
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True),
    "dora-rslora": dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], use_dora=True,
                        use_rslora=True),
    "rslora": dict(r=16, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"q_proj|up_proj": 32}, layers_to_transform=[1]),
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "modules-to-save": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "bias-all": dict(r=4, lora_alpha=8, target_modules=["q_proj"], bias="all"),
    "bias-lora-only": dict(r=4, lora_alpha=8, target_modules=["v_proj"], bias="lora_only"),
    "lora-bias": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_bias=True),
}


@pytest.fixture(scope="module")
def base(tiny_lm, tmp_path_factory) -> Path:
    """A tiny random Llama with attention biases (so biases train), untied embeddings, SmolLM2's tokenizer."""
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_lm)
    cfg.attention_bias, cfg.tie_word_embeddings = True, False
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("kinds_base")
    LlamaForCausalLM(cfg).save_pretrained(d)
    for f in tiny_lm.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, d / f.name)
    return d


def peft_model(base: Path, d: Path | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return (PeftModel.from_pretrained(m, d) if d is not None else m).eval()


def make_adapter(base: Path, d: Path, seed: int, **cfg) -> Path:
    """A peft adapter of the kind ``cfg``, its trainable weights set at random as training would (B, magnitudes,
    biases and the saved modules all moved away from their initial values), saved with save_pretrained."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(peft_model(base), LoraConfig(lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if not p.requires_grad:
                continue
            if "lora_B" in n or "lora_embedding" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "magnitude" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "bias" in n or "modules_to_save" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def kinds(base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {k: make_adapter(base, root / k, i + 1, **cfg) for i, (k, cfg) in enumerate(KINDS.items())}


def capitals(n: int) -> list[dict]:
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    return [r for r in rows if r["task"] == "country-capital"][:n]


def reference_logprobs(model, tok, rows) -> list[list[float]]:
    """Each choice's log-likelihood under ``model`` (lm-eval's split of context and choice): one forward pass per
    example, its choices as the rows of a right-padded batch."""
    out = []
    for ctx, conts in sc.encode_choices(tok, [(r["prompt"], r["choices"]) for r in rows]):
        seqs = [ctx + c for c in conts]
        ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, q in enumerate(seqs):
            ids[i, :len(q)], mask[i, :len(q)] = torch.tensor(q), 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        out.append([float(logits[i, len(ctx) - 1:len(ctx) - 1 + len(c)].float().log_softmax(-1)
                          .gather(1, torch.tensor(c)[:, None]).sum()) for i, c in enumerate(conts)])
    return out


def largest_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_every_kind_evaluates_as_peft_one_adapter_per_batch_row(base, kinds):
    """All the kinds in one batched evaluation (rows of different adapters share forward passes): every
    adapter's log-probs equal peft's forward of it to 1e-4 (fp32), and each adapter does move them."""
    model, tok = load_model(resolve_base(str(base)), torch.device("cpu"))
    rows = capitals(4)
    exs = check_examples(rows, "x")
    for e in exs:
        e.context = e.rec["prompt"]
    ups = load_inputs([str(d) for d in kinds.values()])
    with RowAdapters(model, ups) as ad:
        calls = []
        set_rows = ad.set_rows
        ad.set_rows = lambda r: (calls.append(list(r)), set_rows(r))[1]
        got = ev.evaluate(model, tok, exs, "none", adapters=ad, jobs=[(i, range(len(exs))) for i in range(len(ups))])
    assert any(len(set(r)) > 3 for r in calls)  # several kinds shared one forward pass
    plain = reference_logprobs(peft_model(base), tok, rows)
    for (kind, d), recs in zip(kinds.items(), got):
        want = reference_logprobs(peft_model(base, d), tok, rows)
        assert largest_gap([r["logprobs"] for r in recs], want) < 1e-4, kind
        assert largest_gap(want, plain) > 0.05, kind


def test_eval_of_a_dora_adapter_through_the_cli(base, kinds, tmp_path):
    rows = capitals(3)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(app(), ["eval", "--base", str(base), "--adapter", str(kinds["dora"]), "--norm", "none",
                                   str(data)])
    assert r.exit_code == 0, r.output
    got = [json.loads(x)["logprobs"] for x in r.stdout.splitlines()]
    tok = load_model(resolve_base(str(base)), torch.device("cpu"))[1]
    assert largest_gap(got, reference_logprobs(peft_model(base, kinds["dora"]), tok, rows)) < 1e-4


def app():
    from mergetool.cli.main import app

    return app


def merge_and_unload_sum(base: Path, dirs: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """The dense reference: θ_base + Σ w_i (θ_i − θ_base), θ_i peft's merge_and_unload of adapter i."""
    b = peft_model(base).state_dict()
    out = {k: v.clone() for k, v in b.items()}
    for d, w in zip(dirs, weights):
        merged = peft_model(base, d).merge_and_unload().state_dict()
        for k in out:
            out[k] += w * (merged[k] - b[k])
    return out


def merged_outputs(base: Path, dirs: list[Path], tmp: Path, *args: str) -> tuple[Path, Path, Path]:
    """``merge ARGS --base --save-model --save-peft -o`` of ``dirs``: (model dir, PEFT dir, adapter file)."""
    out = (tmp / "model", tmp / "peft", tmp / "merged.safetensors")
    r = CliRunner().invoke(app(), ["merge", *args, "--base", str(base), "--save-model", str(out[0]),
                                   "--save-peft", str(out[1]), "-o", str(out[2]), *map(str, dirs)])
    assert r.exit_code == 0, r.output
    return out


def check_outputs_agree(base: Path, outs: tuple[Path, Path, Path], tmp: Path) -> None:
    """The three outputs of one merge give one model: peft's PeftModel of --save-peft has the logits of the
    --save-model directory, and mergetool eval of the adapter file the log-probs of that directory."""
    model_dir, peft_dir, blob = outs
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = peft_model(base, peft_dir)(input_ids=ids).logits
        b = peft_model(model_dir)(input_ids=ids).logits
    assert float((a - b).abs().max()) < 1e-4
    data = tmp / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in capitals(3)))
    runs = [CliRunner().invoke(app(), ["eval", "--base", str(b_), *extra, "--norm", "none", str(data)])
            for b_, extra in ((base, ["--adapter", str(blob)]), (model_dir, []))]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    x, y = ([json.loads(line)["logprobs"] for line in r.stdout.splitlines()] for r in runs)
    assert largest_gap(x, y) < 1e-4


def test_weighted_merge_of_dora_rslora_and_lora_bias_equals_peft_merge_and_unload(base, kinds, tmp_path):
    """peft#3761: peft's add_weighted_adapter is silently wrong for DoRA, rsLoRA and lora_bias. mergetool's
    linear merge equals θ_base + Σ w_i (merge_and_unload_i − θ_base) to 1e-5 (relative), and stays an exact
    DoRA (use_dora in the PEFT directory) that peft loads with the same logits."""
    names = ["dora", "dora-rslora", "rslora", "lora-bias", "patterns"]
    weights = [0.7, -0.4, 1.3, 0.5, 0.9]
    wfile = tmp_path / "w.jsonl"
    wfile.write_text("".join(json.dumps({"adapter": n, "weight": w}) + "\n" for n, w in zip(names, weights)))
    outs = merged_outputs(base, [kinds[n] for n in names], tmp_path, "-m", "linear", "--weights", str(wfile))
    want = merge_and_unload_sum(base, [kinds[n] for n in names], weights)
    got = peft_model(outs[0]).state_dict()
    for k, v in want.items():
        assert float((got[k] - v).abs().max()) <= 1e-5 * float(v.abs().max()), k
    assert json.loads((outs[1] / "adapter_config.json").read_text())["use_dora"] is True
    check_outputs_agree(base, outs, tmp_path)


@pytest.mark.parametrize("args", [["-m", "task-arithmetic", "--lambda", "0.8"], ["-m", "ties", "--rank", "128"],
                                  ["-m", "knots"]])
def test_merges_of_every_kind_load_in_peft(base, kinds, tmp_path, args):
    """Every kind merged at once: task arithmetic equals the merge_and_unload reference; for every method the
    PEFT directory (modules_to_save for the full tensors, biases, embedding LoRAs, DoRA) loads in peft with the
    logits of --save-model, and the adapter file evaluates to the same log-probs."""
    dirs = list(kinds.values())
    outs = merged_outputs(base, dirs, tmp_path, *args)
    if args[1] == "task-arithmetic":
        want = merge_and_unload_sum(base, dirs, [0.8] * len(dirs))
        got = peft_model(outs[0]).state_dict()
        for k, v in want.items():
            assert float((got[k] - v).abs().max()) <= 1e-5 * float(v.abs().max()), k
    check_outputs_agree(base, outs, tmp_path)


@pytest.fixture(scope="module")
def effective(base, kinds) -> dict[str, dict[str, torch.Tensor]]:
    """Each DoRA kind's effective update W' − W per parameter, from peft's merge_and_unload."""
    b = peft_model(base).state_dict()
    out = {}
    for kind in ("dora", "dora-rslora"):
        after = peft_model(base, kinds[kind]).merge_and_unload().state_dict()
        out[kind] = {k: after[k] - v for k, v in b.items()}
    return out


@pytest.mark.parametrize("method", sorted(all_methods()))
def test_every_method_merges_dora_as_its_effective_update(base, kinds, effective, method):
    """Every method on two DoRA adapters and a LoRA equals the same method on the DoRAs' effective updates
    ΔW_i = W'_i − W (from peft's merge_and_unload, given as dense deltas) and the same LoRA: DoRA is merged as
    what it does to the model (linear methods through the exact DoRA combination, the others through the
    dense ΔW_i)."""
    names = ["dora", "dora-rslora", "rslora"][:2 if method == "slerp" else 3]
    ups = load_inputs([str(kinds[n]) for n in names], resolve_base(str(base)))
    dense = [Update(u.name, {mod: Dense(effective[n][mod.removeprefix(PREFIX) + ".weight"]) for mod in u.modules})
             if n in effective else u for n, u in zip(names, ups)]
    p = dict(density=0.5, weights=[0.8, 0.5, 1.2][:len(ups)] if "weights" in get(method).options else None,
             base_acc=[0.3, 0.7, 0.5][:len(ups)] if method == "weighted-base" else None,
             stats=statistics(method, ups) if get(method).data else None)
    got, want = (merged_deltas(us, method, Params(**p, names=[u.name for u in ups])) for us in (ups, dense))
    assert set(got) == set(want)
    for mod in want:
        assert float((got[mod] - want[mod]).norm()) <= 1e-4 * float(want[mod].norm()) + 1e-7, (method, mod)


def statistics(method: str, ups: list[Update]) -> dict:
    """What a data-aware method would have learnt from dev examples, drawn at random (the merge is a function of
    them): Grams (positive definite, [n, in, in]), Fisher diagonals ([n, out, in]), coefficients, weights."""
    g = torch.Generator().manual_seed(5)
    n, mods = len(ups), sorted({m for u in ups for m in u.modules})
    shape = {m: next(u.modules[m].shape for u in ups if m in u.modules) for m in mods}
    if method in ("regmean", "regmean++"):
        X = {m: torch.randn((n, 2 * shape[m][1], shape[m][1]), generator=g) for m in mods}
        return {"grams": {m: x.transpose(1, 2) @ x / x.shape[1] for m, x in X.items()}}
    if method == "fisher":
        return {"fisher": {m: torch.rand((n, *shape[m]), generator=g) for m in mods}}
    if method == "adamerging":
        return {"coefficients": {m: (0.2 + torch.rand(n, generator=g)).tolist() for m in mods}}
    return {"weights": (torch.rand(n, generator=g) * 2 - 0.5).tolist()}


def merged_deltas(updates, method: str, p) -> dict[str, torch.Tensor]:
    return {mod: (r.delta() if isinstance(r, (LowRank, Dense)) else r)
            for mod, r in merge_stream(updates, get(method), p, torch.device("cpu"))}


def test_dora_trains_as_peft_trains_it(base):
    """Two DoRA experts trained at once (one per batch row), two AdamW steps: their factors and magnitudes
    equal peft's DoRA training of each on its own text, from the same initialisation."""
    from peft import LoraConfig, get_peft_model

    tok = load_model(resolve_base(str(base)), torch.device("cpu"))[1]
    texts = [r["text"] for r in capitals(2)]
    spec = tr.LoraSpec(rank=4, alpha=8, targets=["self_attn.q_proj", "mlp.up_proj"], layers=[0, 1], lr=1e-2,
                       epochs=2, dora=True)
    model = peft_model(base)
    names = tr.target_modules(model, spec, default_middle=False)
    st, losses = tr.train_stacked(model, tok, [("", t) for t in texts], spec, names, [7, 8])
    for e, text in enumerate(texts):
        pm = get_peft_model(peft_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                          lora_dropout=0.0, use_dora=True))
        init = RowAdapters.trainable(peft_model(base), names, 1, 4, 2.0, [7 + e])  # expert e's initial A
        init.remove()
        with torch.no_grad():
            for n in names:
                pm.get_parameter(f"base_model.model.{n}.lora_A.default.weight").copy_(init.sites[n].A[0])
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        ids, mask, lab = tr.lm_batch(tok, [("", text)], "cpu")
        for _ in range(2):
            tr.row_losses(pm(input_ids=ids, attention_mask=mask).logits, lab).sum().backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            final = float(tr.row_losses(pm(input_ids=ids, attention_mask=mask).logits, lab)[0])
        assert abs(final - losses[e]) < 1e-4 * max(1, abs(final))
        for n in names:
            site = st.sites[n]
            for mine, theirs in ((site.M[e], "lora_magnitude_vector"), (site.B[e], "lora_B"), (site.A[e], "lora_A")):
                want = pm.get_parameter(f"base_model.model.{n}.{theirs}.default.weight")
                assert torch.allclose(mine.detach(), want.detach(), atol=1e-5, rtol=1e-4), (n, theirs)
            start = model.get_parameter(n + ".weight").detach().norm(dim=1)  # ‖W‖: the magnitudes did train
            assert float((site.M[e].detach() - start).abs().max()) > 1e-3
    st.remove()


def test_train_expert_dora_writes_dora_experts_that_load_in_peft(base, tmp_path):
    """train-expert --dora (per task): the expert holds DoRA magnitudes, says use_dora, and evaluates in
    mergetool as in peft (written as a PEFT directory by a one-input merge)."""
    rows = capitals(4)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "experts"
    r = run_cli("train-expert", "--base", str(base), "--dora", "--epochs", "2", "--lr", "1e-2", str(data),
                "--out-dir", str(out))
    assert r.returncode == 0, r.stderr
    (f,) = out.iterdir()
    (u,) = load_inputs([str(f)])
    assert u.meta["peft_config"]["use_dora"] is True
    assert all(type(m).__name__ == "Dora" for m in u.modules.values())
    outs = merged_outputs(base, [f], tmp_path, "-m", "mean")
    check_outputs_agree(base, outs, tmp_path)


def peft_dir(tmp: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from mergetool.blobs import blob_bytes

    d = tmp / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg}))
    (d / "adapter_model.safetensors").write_bytes(blob_bytes(tensors, {"format": "pt"}))
    return d


Q = "base_model.model.model.layers.0.self_attn.q_proj"
LORA = {f"{Q}.lora_A.weight": torch.randn(2, 64), f"{Q}.lora_B.weight": torch.randn(64, 2)}


@pytest.mark.parametrize("cfg,tensors,needle", [
    ({"peft_type": "VERA"}, LORA, "VERA adapters are not supported"),
    ({"use_bdlora": {"nblocks": 2}}, LORA, "BD-LoRA adapters are not supported"),
    ({"alora_invocation_tokens": [1, 2]}, LORA, "aLoRA adapters are not supported"),
    ({"trainable_token_indices": [3]}, LORA, "Trainable-token adapters are not supported"),
    ({"init_lora_weights": "pissa_niter_4"}, LORA, "PiSSA adapters are not supported"),
    ({"use_dora": True}, LORA, "use_dora, but module"),
    ({}, {**LORA, f"{Q}.lora_magnitude_vector": torch.ones(64), f"{Q}.lora_B.bias": torch.ones(64)},
     "DoRA with lora_bias"),
    ({}, {f"{Q}.lora_magnitude_vector": torch.ones(64)}, "lora_magnitude_vector but no LoRA"),
    ({}, {**LORA, f"{Q}.lora_magnitude_vector": torch.ones(32)}, "does not fit"),
    ({}, {f"{Q}.lora_embedding_A": torch.ones(2, 128)}, "lora_embedding_A without its pair"),
])
def test_unsupported_kinds_are_refused_naming_the_kind(tmp_path, cfg, tensors, needle):
    from mergetool.errors import MergetoolError

    with pytest.raises(MergetoolError, match=needle):
        load_inputs([str(peft_dir(tmp_path, cfg, tensors))])


def test_an_overflowing_scale_is_refused_at_read_time(base, tmp_path):
    """Issue 22: lora_alpha 1e300 makes scale·B Inf; eval used to write "logprobs": [NaN, ...] with exit 0."""
    d = peft_dir(tmp_path, {"lora_alpha": 1e300}, LORA)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(capitals(1)[0]) + "\n")
    r = run_cli("eval", "--base", str(base), "--adapter", str(d), str(data))
    err = r.stderr.decode()
    assert r.returncode == 1 and "overflow" in err and r.stdout == b"", err
    assert len(err.strip().splitlines()) == 1


def test_dora_and_full_tensors_need_the_base_to_merge(kinds, tmp_path):
    """DoRA and full tensors are task vectors against the base: without --base, merge refuses them in one line
    before any work; a lora_bias adapter merges without it (its bias change is scale·b), but its PEFT directory
    holds the bias's full value, so --save-peft needs the base; nothing is written."""
    peft = ("--save-peft", str(tmp_path / "p"))
    for kind, needle, extra in (("dora", "DoRA adapters rescale", ()),
                                ("modules-to-save", "full tensors (modules_to_save", ()),
                                ("lora-bias", "which PEFT stores as a full value", peft)):
        out = tmp_path / f"{kind}.safetensors"
        r = run_cli("merge", "-m", "mean", str(kinds[kind]), "-o", str(out), *extra)
        err = r.stderr.decode()
        assert r.returncode == 1 and needle in err and "pass --base MODEL" in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists() and not (tmp_path / "p").exists()


def test_a_lora_with_trained_biases_merges_without_the_base(kinds, tmp_path):
    """lora_bias changes a bias by scale·b, a delta: a nonlinear merge of such adapters needs no --base and writes
    their LoRA modules and bias deltas (it once took the full-model streaming route and failed on the LoRAs)."""
    from mergetool.methods import merge

    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app(), ["merge", "-m", "tsv", str(kinds["lora-bias"]), str(kinds["lora-bias"]),
                                   "-o", str(out)])
    assert r.exit_code == 0, r.output
    (got,) = load_inputs([str(out)])
    want = merge(load_inputs([str(kinds["lora-bias"])] * 2), "tsv", Params(), torch.device("cpu"))
    assert set(got.modules) == set(want.modules) and any(k.endswith(".bias") for k in got.modules)
    for k, m in want.modules.items():
        assert torch.allclose(got.modules[k].delta(), m.delta(), atol=1e-6), k


def test_the_base_copy_of_an_embedding_must_be_the_base(base, kinds, tmp_path):
    """peft saves the targeted embedding's base weights beside its LoRA; an adapter whose copy differs from the
    base (another base of the same shapes) is refused."""
    d = tmp_path / "other"
    shutil.copytree(kinds["embedding"], d)
    from safetensors.torch import load_file, save_file

    t = load_file(d / "adapter_model.safetensors")
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in t
    t[key] = t[key] + 1
    save_file(t, d / "adapter_model.safetensors")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(capitals(1)[0]) + "\n")
    r = run_cli("eval", "--base", str(base), "--adapter", str(d), str(data))
    assert r.returncode == 1 and "differs from the base's" in r.stderr.decode(), r.stderr
