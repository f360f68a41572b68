"""The support matrix (``mergetool.zoo``): every architecture and adapter kind, every command, against
transformers and peft.

Each row is a tiny random model built from its transformers config (2 layers, hidden 32, weights drawn
wide enough that a wrong scale or layout moves the numbers) with a character tokenizer, saved as a model
directory; its adapters are made and saved by peft. Each check runs the command in-process (Typer's
runner) and compares what it writes with what transformers or peft compute on their own. A row's
outcome per check is ``mergetool.zoo.OUTCOMES``'s: ``ok``, or a one-line refusal with nothing written.
The README's table is written from the same definitions; ``test_readme_table_is_current`` keeps it so.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mergetool import zoo

ARCH = {a.name: a for a in zoo.ARCHS}
CONTEXTS = [("The capital of Peru is", [" Lima", " Quito", " La Paz"], 0),
            ("2 + 2 =", [" 4", " five", " 22"], 0),
            ("Colours: red, green and", [" blue.", " seven", " yes, indeed"], 0)]
TEXTS = ["Lima is the capital of Peru.", "Quito is high in the Andes!", "Two and two make four.",
         "Red, green, blue: three colours."]


@dataclasses.dataclass
class Ran:
    code: int
    out: str
    err: str


def cli(capsys, *args) -> Ran:
    """The command in-process, as its entry point runs it (exit code, one error line)."""
    from mergetool.cli.main import run

    capsys.readouterr()
    code = run([str(a) for a in args])
    got = capsys.readouterr()
    return Ran(code, got.out, got.err)


def char_tokenizer(d: Path):
    """A tokenizer of one token per printable ASCII character (ids 4-98) and <unk> <s> </s> <pad> (0-3)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + [chr(c) for c in range(32, 127)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.save_pretrained(d)
    return tok


def tiny_config(arch: zoo.Arch):
    from transformers import AutoConfig, CONFIG_MAPPING

    cls = CONFIG_MAPPING[arch.model_type]
    known = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map)
    kw = {k: v for k, v in zoo.TINY.items() if k in known}
    return AutoConfig.for_model(arch.model_type, **{**kw, **arch.config})


def widen(model, seed: int) -> None:
    """Redraw every weight wide (matrices N(0, 0.2²), vectors 1 + N(0, 0.1²)): transformers' init (std 0.02)
    leaves the logits of a tiny model nearly flat, where a wrong scale would hardly show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.2 if p.dim() > 1 else 1 + noise * 0.1)


@dataclasses.dataclass
class Built:
    base: Path
    adapters: list[Path]
    data: Path
    lora: dict


_BUILT: dict[str, Built] = {}


def build(arch: zoo.Arch, root: Path, lora: dict | None = None, key: str | None = None) -> Built:
    """The row's base model directory, two peft LoRA directories (random A and B, different seeds) and a
    multiple-choice data file; built once per row."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    key = key or arch.name
    if key in _BUILT:
        return _BUILT[key]
    d = root / key.replace(" ", "_").replace("/", "_")
    d.mkdir(parents=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    widen(model, 0)
    model.save_pretrained(d / "base")
    char_tokenizer(d / "base")
    lora = lora or dict(target_modules=list(arch.targets) or "all-linear")
    adapters = []
    for seed in (1, 2):
        m = load_base(Built(d / "base", [], d, lora))
        torch.manual_seed(seed)
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **lora))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.mul_(2.0)  # peft's random init is small; a wrong layout must show in the numbers
                elif p.requires_grad:  # modules_to_save and trained biases: moved as training would
                    p.add_(torch.randn(p.shape) * 0.1)
        pm.save_pretrained(d / f"lora{seed}")
        adapters.append(d / f"lora{seed}")
    data = d / "mc.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "task": "t", "prompt": c, "choices": ch, "answer": a}) + "\n"
                            for i, (c, ch, a) in enumerate(CONTEXTS)))
    _BUILT[key] = Built(d / "base", adapters, data, lora)
    return _BUILT[key]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation (on a busy machine, 30x the time of a matmul)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_LOADED: dict[Path, torch.nn.Module] = {}


def load_base(b: Built):
    """A fresh copy of the row's base model as transformers loads it (loaded once, then copied)."""
    import copy

    from transformers import AutoModelForCausalLM

    if b.base not in _LOADED:
        _LOADED[b.base] = AutoModelForCausalLM.from_pretrained(b.base, dtype=torch.float32).eval()
    return copy.deepcopy(_LOADED[b.base])


def reference_logprobs(model, tok) -> list[list[float]]:
    """Each choice's summed log-probability from the model's own full logits, one sequence per choice."""
    out = []
    for context, choices, _ in CONTEXTS:
        ctx = tok(context, add_special_tokens=False).input_ids
        row = []
        for c in choices:
            cont = tok(c, add_special_tokens=False).input_ids
            ids = torch.tensor([ctx + cont[:-1]])
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            row.append(float(sum(lp[len(ctx) - 1 + t, x] for t, x in enumerate(cont))))
        out.append(row)
    return out


def refused(r: Ran, words: str) -> None:
    """A refusal: exit 1 or 2, one error line naming it, and nothing written."""
    lines = [x for x in r.err.splitlines() if "error:" in x]
    assert r.code in (1, 2) and len(lines) == 1 and not r.out.strip(), r.err
    assert words.lower() in lines[0].lower(), lines[0]


def expected(row: str, check: str) -> str:
    return zoo.outcome(row, check)


ROWS = [(a.name, a, None) for a in zoo.ARCHS] + [(k.name, ARCH[k.arch], k.lora) for k in zoo.KINDS]


def row_params(check: str):
    """The rows a check runs on: all but those where it does not apply."""
    return [pytest.param(r, a, lora, id=r) for r, a, lora in ROWS if expected(r, check) != "n/a"]


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("row,arch,lora", row_params("eval base"))
def test_eval_base(row, arch, lora, root, capsys):
    b = build(arch, root, lora, row)
    from transformers import AutoTokenizer

    r = cli(capsys, "eval", "--base", b.base, "--norm", "none", b.data)
    assert r.code == 0, r.err
    got = [json.loads(x)["logprobs"] for x in r.out.splitlines()]
    want = reference_logprobs(load_base(b), AutoTokenizer.from_pretrained(b.base))
    assert max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w)) <= 1e-4, (got, want)


@pytest.mark.parametrize("row,arch,lora", row_params("eval LoRA"))
def test_eval_lora(row, arch, lora, root, capsys):
    b = build(arch, root, lora, row)
    from peft import PeftModel
    from transformers import AutoTokenizer

    r = cli(capsys, "eval", "--base", b.base, "--norm", "none", "--adapter", b.adapters[0], b.data)
    if expected(row, "eval LoRA") != "ok":
        return refused(r, expected(row, "eval LoRA").removeprefix("refused: "))
    assert r.code == 0, r.err
    got = [json.loads(x)["logprobs"] for x in r.out.splitlines()]
    want = reference_logprobs(PeftModel.from_pretrained(load_base(b), b.adapters[0]).eval(),
                              AutoTokenizer.from_pretrained(b.base))
    base = reference_logprobs(load_base(b), AutoTokenizer.from_pretrained(b.base))
    assert max(abs(x - y) for g, w in zip(base, want) for x, y in zip(g, w)) > 1e-2  # the adapter moves them
    assert max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w)) <= 1e-4, (got, want)


# ----------------------------------------------------------------------------- merge


def peft_delta(b: Built, adapter: Path) -> dict[str, torch.Tensor]:
    """What peft's merge_and_unload adds to the base, tensor by tensor (state-dict names)."""
    from peft import PeftModel

    base = load_base(b).state_dict()
    merged = PeftModel.from_pretrained(load_base(b), adapter).merge_and_unload().state_dict()
    return {k: merged[k].double() - base[k].double() for k in base}


def merge_params():
    """The rows where either merge output is checked."""
    return [pytest.param(r, a, lora, id=r) for r, a, lora in ROWS
            if {expected(r, "merge --save-model"), expected(r, "merge --save-peft")} != {"n/a"}]


# rows whose model rescales weights in place in eval mode (RWKV): peft's unmerged forward gets them wrong
PEFT_MISSES_RESCALE = {"RWKV"}


@pytest.mark.parametrize("row,arch,lora", merge_params())
def test_merge_save_model_and_peft(row, arch, lora, root, capsys):
    """One task-arithmetic merge of the row's two peft LoRAs, written as a full model and as a PEFT directory;
    the reference is the base plus the sum of what peft's merge_and_unload adds for each."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    b = build(arch, root, lora, row)
    out = root / f"{row}-merged".replace(" ", "_").replace("/", "_")
    flags = {"merge --save-model": ("--save-model", out / "model"), "merge --save-peft": ("--save-peft", out / "peft")}
    for check, (flag, where) in flags.items():  # a refusal: one line, nothing written
        if expected(row, check).startswith("refused"):
            refused(cli(capsys, "merge", "-m", "task-arithmetic", "--base", b.base, flag, where, *b.adapters),
                    expected(row, check).removeprefix("refused: "))
            assert not where.exists()
    wanted = [c for c in flags if expected(row, c) == "ok"]
    if not wanted:
        return
    r = cli(capsys, "merge", "-m", "task-arithmetic", "--base", b.base, *[x for c in wanted for x in flags[c]],
            *b.adapters)
    assert r.code == 0, r.err
    base = load_base(b).state_dict()
    deltas = [peft_delta(b, a) for a in b.adapters]
    want = {k: base[k].double() + sum(d[k] for d in deltas) for k in base}
    assert sum(bool(sum(d[k] for d in deltas).abs().max() > 1e-3) for k in base) >= 2  # the merge changes tensors
    reference = load_base(b)
    reference.load_state_dict({k: v.float() for k, v in want.items()})
    ids = torch.tensor([[5, 17, 40, 41, 9, 60, 33, 70]])
    with torch.no_grad():
        ref_logits = reference(input_ids=ids).logits
    if "merge --save-model" in wanted:
        # the files keep the base's own names and layout; transformers loads them with nothing missing
        assert set(load_file(out / "model" / "model.safetensors")) == set(load_file(b.base / "model.safetensors"))
        full, info = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        for k, t in full.state_dict().items():
            err = float((t.double() - want[k]).abs().max())
            assert err <= 1e-5 * max(1.0, float(want[k].abs().max())), (k, err)
    if "merge --save-peft" in wanted:  # peft loads it, and it gives the merged weights' logits
        lora_model = PeftModel.from_pretrained(load_base(b), out / "peft").eval()
        if row in PEFT_MISSES_RESCALE:  # peft's forward adds the LoRA beside the rescaled weight: merged, it is not
            lora_model = lora_model.merge_and_unload().eval()
        with torch.no_grad():
            got = lora_model(input_ids=ids).logits
        assert float((got - ref_logits).abs().max()) <= 1e-4 * max(1.0, float(ref_logits.abs().max()))


# ----------------------------------------------------------------------------- train-expert


def peft_step(b: Built, names: list[str], A: dict, B: dict, ids, mask, lab, lr: float, M: dict | None = None):
    """peft's loss (each row's mean next-token cross-entropy, averaged over rows), its gradients, and its factors
    after one AdamW step, from the factors A, B (module name -> tensor) and, for DoRA, the magnitudes M; per module
    the tuple (A, B) or (A, B, m)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(load_base(b), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=names,
                                                  use_dora=M is not None))
    mods = dict(pm.base_model.model.named_modules())
    own = {n: [mods[n].lora_A["default"].weight, mods[n].lora_B["default"].weight]
           + ([mods[n].lora_magnitude_vector["default"].weight] if M is not None else []) for n in names}
    with torch.no_grad():
        for n in names:
            for w, v in zip(own[n], (A[n], B[n], *([M[n]] if M is not None else []))):
                w.copy_(v)
    params = [p for p in pm.parameters() if p.requires_grad]
    logits = pm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), lab[:, 1:], ignore_index=-100, reduction="none")
    loss = (ce.sum(1) / (lab[:, 1:] != -100).sum(1)).mean()
    loss.backward()
    # a module the forward never calls (BART's cross-attention) has no gradient
    grads = {n: tuple(torch.zeros_like(w) if w.grad is None else w.grad.clone() for w in own[n]) for n in names}
    torch.optim.AdamW(params, lr=lr, weight_decay=0.0).step()
    return float(loss), grads, {n: tuple(w.detach() for w in own[n]) for n in names}


TRAIN = {k.name: k.train for k in zoo.KINDS}


@pytest.mark.parametrize("row,arch,lora", row_params("train-expert"))
def test_train_expert_step(row, arch, lora, root, capsys):
    """train-expert on a batch of texts (per task), a plain LoRA on the model's default targets or the kind's (its
    train-expert options: --dora, --target-modules): its gradients on one batch against peft's, and the expert it
    writes (a standard safetensors file) against peft's first step from the same start."""
    from transformers import AutoTokenizer

    from mergetool import train as tr
    from mergetool.adapters import RowAdapters
    from mergetool.inputs import load_inputs
    from mergetool.updates import PREFIX, Dora

    b = build(arch, root, lora, row)
    tok = AutoTokenizer.from_pretrained(b.base)
    data = b.base.parent / "texts.jsonl"
    data.write_text("".join(json.dumps({"id": f"x{i}", "task": "t", "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    lr = 1e-2
    out = b.base.parent / "expert.safetensors"
    extra = list(TRAIN.get(row) or ())
    dora = "--dora" in extra
    r = cli(capsys, "train-expert", "--base", b.base, "--rank", 4, "--alpha", 8, "--lr", lr, "--epochs", 1,
            "--batch-size", len(TEXTS), "-o", out, *extra, data)
    if expected(row, "train-expert") != "ok":
        refused(r, expected(row, "train-expert").removeprefix("refused: "))
        assert not out.exists()
        return
    assert r.code == 0, r.err
    model = load_base(b)
    targets = extra[extra.index("--target-modules") + 1].split(",") if "--target-modules" in extra else None
    names = tr.target_modules(model, tr.LoraSpec(rank=4, alpha=8, targets=targets), default_middle=False)
    ids, mask, lab = tr.lm_batch(tok, [("", t) for t in TEXTS], "cpu")
    # the gradients: mergetool's trainable experts with random factors against peft's, on one batch
    ad = RowAdapters.trainable(model, names, 1, 4, 2.0, [7], dora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for s in ad.sites.values():
            s.B.copy_(torch.randn(s.B.shape, generator=g) * 0.3)
            if dora:  # magnitudes away from ‖W‖, where the norm's gradient matters
                s.M.mul_(1 + 0.2 * torch.randn(s.M.shape, generator=g))
    ad.use(0)
    loss = tr.model_row_losses(model, ids, mask, tr.Targets(lab)).mean()
    loss.backward()
    mine = {n: [ad.sites[n].A, ad.sites[n].B] + ([ad.sites[n].M] if dora else []) for n in names}
    start = {n: [w[0].detach().clone() for w in ws] for n, ws in mine.items()}
    ref_loss, ref_grads, _ = peft_step(b, names, *({n: v[i] for n, v in start.items()} for i in range(2)), ids, mask,
                                       lab, lr, {n: v[2] for n, v in start.items()} if dora else None)
    assert abs(float(loss) - ref_loss) <= 1e-5 * max(1.0, ref_loss), (float(loss), ref_loss)
    for n in names:
        for w, want in zip(mine[n], ref_grads[n]):
            got = torch.zeros_like(w[0]) if w.grad is None else w.grad[0]  # BART's cross-attention: never called
            assert float((got - want).abs().max()) <= 1e-4 * max(1e-3, float(want.abs().max())), n
    ad.remove()
    # the step: train-expert's file against peft's step from the same start (A as initialised, B zero, m = ‖W‖)
    init = RowAdapters.trainable(load_base(b), names, 1, 4, 2.0, [0], dora)
    A0 = {n: init.sites[n].A[0].detach().clone() for n in names}
    B0 = {n: torch.zeros_like(init.sites[n].B[0]) for n in names}
    M0 = {n: init.sites[n].M[0].detach().clone() for n in names} if dora else None
    _, _, after = peft_step(b, names, A0, B0, ids, mask, lab, lr, M0)
    (u,) = load_inputs([str(out)])
    assert u.meta["peft_config"]["fan_in_fan_out"] == (arch.model_type == "gpt2")
    assert sorted(u.modules) == sorted(PREFIX + n for n in names)
    assert all(isinstance(m, Dora) == dora for m in u.modules.values())
    for n in names:
        m = u.modules[PREFIX + n]
        lo = m.lora if dora else m
        assert torch.allclose(lo.A, after[n][0], atol=1e-6)
        # (Adam's first step is lr·g/(|g| + ε): where |g| nears ε, rounding in g moves it by up to lr·1e-2)
        assert torch.allclose(lo.B * lo.scale / 2.0, after[n][1], atol=lr * 1e-2), n  # peft's scale: 8 / 4
        if dora:
            assert torch.allclose(m.magnitude.view(-1), after[n][2].view(-1), atol=lr * 1e-2), n


# ----------------------------------------------------------------------------- the README


def test_readme_table_is_current():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    assert zoo.with_table(text) == text, "the support table is stale: run python -m mergetool.zoo"


# ----------------------------------------------------------------------------- the output head

# Every causal LM class of transformers whose forward does something to the logits after (or before) its output
# projection, as found by reading each class's forward (scripts/head_survey.py runs the same comparison on every
# causal LM class): soft-capping, scaled logits, a head of several layers.
POST_PROJECTION = {
    "gemma2": dict(final_logit_softcapping=3.0), "gemma3_text": dict(final_logit_softcapping=3.0),
    "vaultgemma": dict(final_logit_softcapping=3.0), "nanochat": dict(final_logit_softcapping=3.0),
    "beam": dict(final_logit_softcapping=3.0), "granite": dict(logits_scaling=4.0),
    "granite_swa": dict(logits_scaling=4.0), "granitemoe": dict(logits_scaling=4.0, num_local_experts=4),
    "granitemoeshared": dict(logits_scaling=4.0, num_local_experts=4), "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25), "cohere2_moe": dict(logit_scale=0.25, num_experts=4),
    "hyperclovax": dict(logits_scaling=4.0), "electra": dict(embedding_size=16, is_decoder=True),
    "minicpm3": dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=8, dim_model_base=16),  # its hidden states are divided by hidden / dim_model_base
}


@pytest.mark.parametrize("model_type", sorted(POST_PROJECTION))
def test_output_head_is_the_models_own(model_type):
    """Log-probabilities at gathered positions (the fast route: the model's own forward on the gathered hidden
    states) equal the model's full logits'; the output embedding alone (the rule before) would not."""
    from transformers import AutoModelForCausalLM

    from mergetool import scoring

    arch = zoo.Arch(model_type, model_type, POST_PROJECTION[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    widen(model, 0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 99, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    rows, pos = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([2, 11, 0, 5, 11])
    tgt = torch.randint(4, 99, (5,), generator=g)
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)[rows, pos, tgt]
        got = scoring.token_logprobs(model, rows, pos, tgt, input_ids=ids, attention_mask=mask)
        h = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[rows, pos]
        try:  # the output embedding alone; a head of several layers (Electra's) does not even take h
            naive = torch.log_softmax(model.get_output_embeddings()(h).double(), -1)[torch.arange(5), tgt]
        except RuntimeError:
            naive = torch.full_like(full, float("inf"))
    assert scoring.own_head(model)
    assert float((got.double() - full).abs().max()) <= 1e-5
    assert float((naive - full).abs().max()) > 1e-2  # the step after the projection matters here


# ----------------------------------------------------------------------------- target modules


PEFT_DEFAULTS = {"Llama": ["q_proj", "v_proj"], "GPT-2": ["c_attn"], "GPT-NeoX": ["query_key_value"],
                 "Falcon": ["query_key_value"], "BLOOM": ["query_key_value"], "Phi": ["q_proj", "v_proj", "fc1", "fc2"]}
ATTENTION = {"Phi-3": ["self_attn.o_proj", "self_attn.qkv_proj"], "Granite": ["self_attn.k_proj", "self_attn.o_proj",
             "self_attn.q_proj", "self_attn.v_proj"]}
UP = {"Llama": ["mlp.up_proj"], "GPT-2": ["mlp.c_fc"], "OPT": ["fc1"], "Phi-3": ["mlp.gate_up_proj"],
      "GPT-NeoX": ["mlp.dense_h_to_4h"], "Falcon": ["mlp.dense_h_to_4h"], "Phi": ["mlp.fc1"]}


@pytest.mark.parametrize("name", sorted(set(PEFT_DEFAULTS) | set(ATTENTION) | set(UP)))
def test_default_targets_come_from_the_model(name):
    """Per task: peft's default for the model type, else the attention's linear maps (fused ones included); per
    example: the MLP's up projection, whatever the model calls it."""
    from transformers import AutoModelForCausalLM

    from mergetool import train as tr
    from mergetool.adapters import decoder_layers

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(ARCH[name]))
    lpath = decoder_layers(model)[0]
    rel = lambda names: sorted({n.split(".", len(lpath.split(".")) + 1)[-1] for n in names})  # noqa: E731
    per_task = tr.target_modules(model, tr.LoraSpec(), default_middle=False)
    if name in PEFT_DEFAULTS:
        assert sorted({n.rsplit(".", 1)[-1] for n in per_task}) == sorted(PEFT_DEFAULTS[name])
    if name in ATTENTION:
        assert rel(per_task) == ATTENTION[name]
    assert len({tr.layer_of(n, lpath) for n in per_task}) == 2  # every layer
    if name in UP:
        per_example = tr.target_modules(model, tr.LoraSpec(), default_middle=True)
        assert rel(per_example) == UP[name] and {tr.layer_of(n, lpath) for n in per_example} == {1}


def test_a_model_without_an_up_projection_names_its_modules(tmp_path, capsys):
    """Mixtral's MLP is experts (3-D parameters) and a router: no linear map widens the hidden size, so the
    per-example default finds nothing, and the refusal lists the modules there are."""
    from transformers import AutoModelForCausalLM

    from mergetool import train as tr
    from mergetool.errors import MergetoolError

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(ARCH["Mixtral"]))
    with pytest.raises(MergetoolError) as e:
        tr.target_modules(model, tr.LoraSpec(), default_middle=True)
    assert "self_attn.q_proj" in str(e.value) and "--target-modules" in str(e.value)
    with pytest.raises(MergetoolError) as e:
        tr.target_modules(model, tr.LoraSpec(targets=["up_proj"]), default_middle=True)
    assert "no linear module matches up_proj" in str(e.value) and "self_attn.o_proj" in str(e.value)


# ----------------------------------------------------------------------------- outputs of train-expert


def test_train_expert_o_file_holds_one_expert(root, capsys):
    """-o FILE is a standard safetensors file (test_train_expert_step opens one with safetensors): a run of
    several experts is refused before any training, pointing to --out-dir and to the stream (-o -)."""
    b = build(ARCH["Llama"], root)
    data = b.base.parent / "two-tasks.jsonl"
    data.write_text("".join(json.dumps({"id": f"x{i}", "task": f"t{i % 2}", "text": t}) + "\n"
                            for i, t in enumerate(TEXTS)))
    out = b.base.parent / "two.safetensors"
    r = cli(capsys, "train-expert", "--base", b.base, "--epochs", 1, "-o", out, data)
    refused(r, "would hold 2 experts")
    assert "--out-dir" in r.err and "-o -" in r.err and not out.exists()


# ----------------------------------------------------------------------------- bases


def test_a_base_missing_or_adding_a_tensor_is_refused(root, capsys):
    """transformers fills a missing tensor with random values (eval would change from run to run): a base whose
    files lack one of the model's tensors, or hold one it has not, is refused, naming it; tied weights (the
    output layer of Gemma, of GPT-2) are not missing."""
    import shutil

    from safetensors.torch import load_file, save_file

    b = build(ARCH["Llama"], root)
    files = load_file(b.base / "model.safetensors")
    for case, tensors, word in (("missing", {k: v for k, v in files.items() if k != "lm_head.weight"}, "lm_head.weight"),
                                ("unexpected", {**files, "model.extra.weight": torch.zeros(2)}, "model.extra.weight"),
                                ("adapter", load_file(b.adapters[0] / "adapter_model.safetensors"), "lack")):
        d = root / f"broken-{case}"
        shutil.copytree(b.base, d)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        r = cli(capsys, "eval", "--base", d, b.data)
        refused(r, word)
    for name in ("Gemma", "GPT-2"):  # tied: the output layer is not in the files, and that is right
        r = cli(capsys, "eval", "--base", build(ARCH[name], root).base, b.data)
        assert r.code == 0, r.err


def test_gpt2_full_fine_tunes_apply_transposed(root, capsys):
    """A full fine-tune of GPT-2 is a task vector whose Conv1D deltas are held [out, in] (as a LoRA's): eval of it
    gives the fine-tuned model's log-probabilities, and merge --save-model of two gives base + both deltas in the
    base's [in, out] layout (a reshape instead of a transpose would scramble every non-square c_attn)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetool.inputs import load_inputs
    from mergetool.model import resolve_base

    b = build(ARCH["GPT-2"], root)
    fts = []
    for seed in (5, 6):
        m = load_base(b)
        widen(m, seed)  # every weight moved: a fine-tune far from the base
        with torch.no_grad():
            for p, q in zip(m.parameters(), load_base(b).parameters()):
                p.copy_(q + (p - q) * 0.05)
        m.save_pretrained(root / f"gpt2-ft{seed}")
        fts.append(root / f"gpt2-ft{seed}")
    u = load_inputs([str(fts[0])], resolve_base(str(b.base)))[0]
    c_attn = u.modules["base_model.model.transformer.h.0.attn.c_attn"]
    assert c_attn.shape == (96, 32)  # [out, in]; the weight is stored [32, 96]
    r = cli(capsys, "eval", "--base", b.base, "--norm", "none", "--adapter", fts[0], b.data)
    assert r.code == 0, r.err
    got = [json.loads(x)["logprobs"] for x in r.out.splitlines()]
    want = reference_logprobs(AutoModelForCausalLM.from_pretrained(fts[0]).eval(), AutoTokenizer.from_pretrained(b.base))
    assert max(abs(x - y) for g, w in zip(got, want) for x, y in zip(g, w)) <= 1e-4, (got, want)
    out = root / "gpt2-ft-merged"
    r = cli(capsys, "merge", "-m", "task-arithmetic", "--base", b.base, "--save-model", out, *fts)
    assert r.code == 0, r.err
    saved, base = load_file(out / "model.safetensors"), load_file(b.base / "model.safetensors")
    ft = [load_file(f / "model.safetensors") for f in fts]
    for k, t in saved.items():
        want = base[k].double() + sum(f[k].double() - base[k].double() for f in ft)
        assert float((t.double() - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max())), k


# ----------------------------------------------------------------------------- statistics of the data-aware merges


def as_linear(model):
    """The same model with every ``Conv1D`` replaced by the ``nn.Linear`` of the same map (its weight transposed)."""
    from mergetool.model import is_conv1d

    for name, m in list(model.named_modules()):
        if is_conv1d(m):
            lin = torch.nn.Linear(m.nx, m.nf)
            with torch.no_grad():
                lin.weight.copy_(m.weight.T)
                lin.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, lin)
    return model


def test_data_aware_statistics_read_conv1d_as_linear_maps(root):
    """On GPT-2 (every adapted module a Conv1D) the statistics of the data-aware merges (RegMean's and RegMean++'s
    Grams, Fisher diagonals [out, in], AdaMerging's coefficients) and diagnose's gradient metrics equal those of
    the same model with nn.Linear modules, the route tests/test_datamerge.py checks against plain loops and
    fusion-bench; they once skipped Conv1D modules (RegMean and Fisher fell back to the mean, exit 0) or refused
    them as "another kind of module"."""
    from transformers import AutoTokenizer

    from mergetool.diagnose.gradients import mean_gradients, pair_gradient_metrics
    from mergetool.examples import check_examples
    from mergetool.inputs import load_inputs
    from mergetool.merging import DataOptions, dev_data, statistics
    from mergetool.methods import Params
    from mergetool.model import resolve_base

    b = build(ARCH["GPT-2"], root, dict(target_modules="all-linear"), "GPT-2 Conv1D statistics")
    tok = AutoTokenizer.from_pretrained(b.base)
    ups = load_inputs([str(a) for a in b.adapters], resolve_base(str(b.base)))
    for u, t in zip(ups, ("a", "b")):
        u.meta["task"] = t
    exs = check_examples([{"id": f"{t}{i}", "task": t, "prompt": c, "choices": ch, "answer": a}
                          for t in "ab" for i, (c, ch, a) in enumerate(CONTEXTS)], "dev")
    for e in exs:
        e.context = e.rec["prompt"]
    models = (load_base(b), as_linear(load_base(b)))
    assert sum(isinstance(m, torch.nn.Linear) for m in models[1].modules()) >= 8
    for method, opts in (("regmean", DataOptions()), ("regmean++", DataOptions()), ("fisher", DataOptions()),
                         ("adamerging", DataOptions(steps=3, lr=0.05))):
        dev = dev_data(ups, exs, method)
        conv, lin = (statistics(method, m, tok, ups, dev, Params(alpha=0.9), opts) for m in models)
        (key,) = set(lin) - {"info"}
        assert set(conv[key]) == set(lin[key]) == set(ups[0].modules), method
        for k, want in lin[key].items():
            got, want = torch.as_tensor(conv[key][k]).double(), torch.as_tensor(want).double()
            assert got.shape == want.shape and float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()), \
                (method, k)
    data = [[e for e in exs if e.task == t] for t in "ab"]
    conv, lin = (pair_gradient_metrics(mean_gradients(m, tok, ups, data)[0]) for m in models)
    for k in lin:
        assert torch.allclose(torch.as_tensor(conv[k]).double(), torch.as_tensor(lin[k]).double(), rtol=1e-4), k


def test_a_lora_on_a_module_that_is_not_a_linear_map_is_refused(root, capsys):
    """peft's all-linear takes Llama-4's router, an nn.Linear whose forward also routes (top-k, sigmoid) and returns
    a tuple: peft's own forward fails on it, and eval failed with an internal error; it is refused in one
    line naming the module's class."""
    b = build(ARCH["Llama-4 (text)"], root, dict(target_modules="all-linear"), "Llama-4 all-linear")
    refused(cli(capsys, "eval", "--base", b.base, "--adapter", b.adapters[0], b.data),
            "router: is a Llama4Router, whose forward returns a tuple")


# ----------------------------------------------------------------------------- models that change their own weights


def test_the_probe_finds_the_weights_a_forward_changes(root):
    """RWKV's eval mode divides block i's attention.output and feed_forward.value weights in place by
    2**(i // rescale_every) (its training mode multiplies them back): the probe finds exactly those, whatever
    mode the model ran in before, and nothing on a model that leaves its weights alone."""
    from mergetool.model import weights_its_forward_changes

    b = build(ARCH["RWKV"], root)
    want = sorted(f"rwkv.blocks.{i}.{m}.weight" for i in range(2) for m in ("attention.output", "feed_forward.value"))
    for ran in (None, "eval", "train"):
        model = load_base(b)
        if ran:
            with torch.no_grad():
                model.train(ran == "train")(input_ids=torch.tensor([[5, 6]]))
        assert sorted(weights_its_forward_changes(model)) == want, ran
    for name in ("Llama", "GPT-2"):
        assert weights_its_forward_changes(load_base(build(ARCH[name], root))) == []


def test_an_update_beside_rescaled_weights_gives_other_numbers(root):
    """Why RWKV is refused where an update runs beside its weights: in eval mode the merged model (W + ΔW, rescaled
    as a whole) and the LoRA beside the rescaled weight (peft's forward, and mergetool's hooks before the refusal)
    give log-probabilities far apart; in training mode (no rescaling) they agree."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    b = build(ARCH["RWKV"], root)
    tok = AutoTokenizer.from_pretrained(b.base)
    for mode, apart in ((False, True), (True, False)):
        beside = reference_logprobs(PeftModel.from_pretrained(load_base(b), b.adapters[0]).train(mode), tok)
        merged = reference_logprobs(PeftModel.from_pretrained(load_base(b), b.adapters[0]).merge_and_unload()
                                    .train(mode), tok)
        gap = max(abs(x - y) for g, w in zip(beside, merged) for x, y in zip(g, w))
        assert (gap > 0.1) if apart else (gap < 1e-4), (mode, gap)


def rwkv_tasks(root) -> tuple[Built, list[Path], Path]:
    """The RWKV row's base, its two LoRAs named after tasks a and b, and multiple-choice data of both tasks."""
    import shutil

    b = build(ARCH["RWKV"], root)
    d = b.base.parent
    if not (d / "ab.jsonl").exists():
        for t, a in zip("ab", b.adapters):
            shutil.copytree(a, d / t)
        (d / "ab.jsonl").write_text("".join(
            json.dumps({"id": f"{t}{i}", "task": t, "prompt": c, "choices": ch, "answer": a}) + "\n"
            for t in "ab" for i, (c, ch, a) in enumerate(CONTEXTS)))
    return b, [d / "a", d / "b"], d / "ab.jsonl"


@pytest.mark.parametrize("command", ["eval", "score", "diagnose", "merge regmean", "merge fisher",
                                     "merge adamerging"])
def test_updates_beside_self_changing_weights_are_refused(command, root, capsys):
    """Every command that runs updates beside the weights of a model whose forward changes them (RWKV) refuses in
    one line, naming a weight, and writes nothing (eval's records, score's records and progress, the merge);
    train-expert's refusal is the matrix's (test_train_expert_step). Before, each gave numbers that were not the
    model's with exit 0."""
    b, ads, data = rwkv_tasks(root)
    out = root / f"rwkv-{command.replace(' ', '-')}"
    args = {"eval": ["eval", "--base", b.base, "--adapter", ads[0], "-o", out, data],
            "score": ["score", "--base", b.base, "--data", data, "--level", "task", "--partners", 1, "--trials", 1,
                      "-o", out, *ads],
            "diagnose": ["diagnose", "--base", b.base, "--data", data, *ads]}.get(command) or \
        ["merge", "-m", command.split()[1], "--base", b.base, "--data", data, "--save-model", out, *ads]
    refused(cli(capsys, *args), "RwkvForCausalLM: its forward changes 4 of its weights in place (such as "
            "rwkv.blocks.0.attention.output.weight)")
    assert not any(root.glob(out.name + "*"))


def test_a_model_that_keeps_a_state_in_place_trains(root, capsys):
    """RWKV with rescale_every=0 does not rescale its weights, so nothing refuses it; its forward updates its
    recurrent state in place when asked for a cache, which broke train-expert's backward pass (an internal
    error). mergetool's forwards never reuse a cache (``load_model`` turns it off): the expert trains, and
    eval reads it."""
    a = dataclasses.replace(ARCH["RWKV"], config=dict(rescale_every=0))
    b = build(a, root, key="RWKV-no-rescale")
    out = root / "rwkv0-expert.safetensors"
    r = cli(capsys, "train-expert", "--base", b.base, b.data, "--epochs", "1", "--rank", "2", "-o", out)
    assert r.code == 0, r.err
    r = cli(capsys, "eval", "--base", b.base, "--adapter", out, b.data)
    assert r.code == 0 and r.out.count("\n") == len(CONTEXTS), r.err
