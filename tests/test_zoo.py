"""Every architecture mergetool supports, against transformers and peft: the output head."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


def tiny_config(model_type: str, **fields):
    """A transformers config of ``model_type`` with the TINY widths it has, and ``fields``."""
    from transformers import CONFIG_MAPPING, AutoConfig

    cls = CONFIG_MAPPING[model_type]
    known = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map)
    return AutoConfig.for_model(model_type, **{**{k: v for k, v in TINY.items() if k in known}, **fields})


def widen(model, seed: int) -> None:
    """Redraw every weight wide (matrices N(0, 0.2²), vectors 1 + N(0, 0.1²)): transformers' init (std 0.02)
    leaves the logits of a tiny model nearly flat, where a wrong scale would hardly show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.2 if p.dim() > 1 else 1 + noise * 0.1)


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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread only adds synchronisation (on a busy machine, 30x the time of a matmul)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **POST_PROJECTION[model_type])).eval()
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


# ----------------------------------------------------------------------------- Conv1D (GPT-2)


def gpt2_base(d):
    """A tiny GPT-2 (Conv1D layers, weights stored [in, out]) saved to ``d``, and the model as loaded."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2", n_inner=64))
    widen(model, 0)
    model.save_pretrained(d)
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


ITEMS = [([5, 17, 40, 41, 9], [[60, 33], [70, 12, 8], [3]]), ([22, 23, 24], [[90, 91], [44]])]


def peft_choice_logprobs(model, items) -> list[list[float]]:
    out = []
    for ctx, conts in items:
        row = []
        for cont in conts:
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].double(), -1)
            row.append(float(sum(lp[len(ctx) - 1 + t, x] for t, x in enumerate(cont))))
        out.append(row)
    return out


def test_conv1d_lora_against_peft(tmp_path):
    """A peft LoRA on every Conv1D of GPT-2 (square attn.c_proj, non-square c_attn, c_fc, mlp.c_proj): applied
    beside the frozen weights it gives peft's log-probabilities, and save_model gives peft's merge_and_unload."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from mergetool.adapters import RowAdapters
    from mergetool.inputs import load_inputs
    from mergetool.model import resolve_base, save_model
    from mergetool.scoring import choice_loglikelihoods

    base = gpt2_base(tmp_path / "base")
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                        target_modules="all-linear"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(2.0)
    pm.save_pretrained(tmp_path / "lora")
    u = load_inputs([str(tmp_path / "lora")])[0]
    assert u.modules["base_model.model.transformer.h.0.attn.c_attn"].shape == (96, 32)
    with RowAdapters(base, [u]) as ad:
        got = choice_loglikelihoods(base, ITEMS, [(0, [0, 1])], ad)[0]
    want = peft_choice_logprobs(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval(), ITEMS)
    assert max(abs(g[0] - w) for gs, ws in zip(got, want) for g, w in zip(gs, ws)) <= 1e-4
    save_model(resolve_base(str(tmp_path / "base")), tmp_path, iter(u.modules.items()), torch.device("cpu"))
    merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").merge_and_unload().state_dict()
    saved = load_file(tmp_path / "model.safetensors")
    for k, t in saved.items():
        assert float((t - merged[k]).abs().max()) <= 1e-5 * max(1.0, float(merged[k].abs().max())), k
    assert AutoModelForCausalLM.from_pretrained(tmp_path) is not None


def test_gpt2_full_fine_tune_is_a_transposed_task_vector(tmp_path):
    """A full fine-tune of GPT-2 as a task vector: its Conv1D deltas are held [out, in] (as a LoRA's), applied
    beside the weights they give the fine-tune's log-probabilities, and save_model writes base + delta in the
    base's [in, out] layout (a reshape instead of a transpose would scramble every non-square c_attn)."""
    from safetensors.torch import load_file

    from mergetool.adapters import RowAdapters
    from mergetool.model import resolve_base, save_model, task_vector
    from mergetool.scoring import choice_loglikelihoods

    base = gpt2_base(tmp_path / "base")
    ft = gpt2_base(tmp_path / "ft")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ft.save_pretrained(tmp_path / "ft")
    u = task_vector(tmp_path / "ft", resolve_base(str(tmp_path / "base")))
    assert u.modules["base_model.model.transformer.h.0.attn.c_attn"].shape == (96, 32)
    with RowAdapters(base, [u]) as ad:
        got = choice_loglikelihoods(base, ITEMS, [(0, [0, 1])], ad)[0]
    want = peft_choice_logprobs(ft, ITEMS)
    assert max(abs(g[0] - w) for gs, ws in zip(got, want) for g, w in zip(gs, ws)) <= 1e-4
    (tmp_path / "out").mkdir()
    save_model(resolve_base(str(tmp_path / "base")), tmp_path / "out", iter(u.modules.items()), torch.device("cpu"))
    saved, fts = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    for k, t in saved.items():
        assert float((t - fts[k]).abs().max()) <= 1e-5 * max(1.0, float(fts[k].abs().max())), k


# ----------------------------------------------------------------------------- bases


def test_a_base_missing_or_adding_a_tensor_is_refused(tmp_path):
    """transformers fills a missing tensor with random values (eval would change from run to run): a base whose
    files lack one of the model's tensors, or hold one it has not (a LoRA written over model.safetensors), is
    refused, naming it; a tied output layer (GPT-2's) is not missing."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from mergetool.errors import MergetoolError
    from mergetool.model import load_model, resolve_base

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=False)).save_pretrained(tmp_path / "ok")
    files = load_file(tmp_path / "ok" / "model.safetensors")
    lora = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)}
    for case, tensors, word in (("missing", {k: v for k, v in files.items() if k != "lm_head.weight"}, "lm_head.weight"),
                                ("unexpected", {**files, "model.extra.weight": torch.zeros(2)}, "model.extra.weight"),
                                ("adapter", lora, "lack")):
        d = tmp_path / case
        AutoModelForCausalLM.from_config(tiny_config("llama", tie_word_embeddings=False)).config.save_pretrained(d)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        char_tokenizer(d)
        with pytest.raises(MergetoolError) as e:
            load_model(resolve_base(str(d)), torch.device("cpu"))
        assert word in str(e.value)
    gpt2_base(tmp_path / "gpt2")
    char_tokenizer(tmp_path / "gpt2")
    assert "lm_head.weight" not in load_file(tmp_path / "gpt2" / "model.safetensors")
    load_model(resolve_base(str(tmp_path / "gpt2")), torch.device("cpu"))  # tied: not missing
