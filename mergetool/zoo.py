"""The support matrix: the architectures and adapter kinds mergetool is checked on, and the checks.

Each row is a tiny random model built from its transformers config (2 layers, hidden size 32) with a LoRA
of peft's making; each column a check of a command against transformers/peft as the reference, run by
``tests/test_zoo.py`` on every row. ``OUTCOMES`` says what each check must show: ``ok`` (the numbers agree
within the tolerances below) or a refusal (the command fails with one line naming what is refused, and
writes nothing); the test fails when a check does not show what its row says, so the README's table,
written from these definitions (``python -m mergetool.zoo``, checked current by the test), says what the
suite has checked.

To add a row: an :class:`Arch` (its model type and the config fields that make it tiny) to ``ARCHS``, or a
:class:`Kind` (the peft ``LoraConfig`` fields of the adapter kind, and the architecture it is checked on) to
``KINDS``; give it the outcome of any check that is not ``ok`` in ``OUTCOMES``, and a check of its own to
``tests/test_zoo.py`` where a column does not apply as it is. A new column is a :class:`Check` in ``CHECKS``
and its test.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Check:
    name: str  # the column's title
    what: str  # what is compared with what


CHECKS = [
    Check("eval base", "`eval --norm none` of the base: every choice's summed log-probability against the "
          "model's own logits in transformers (≤ 1e-4)"),
    Check("eval LoRA", "`eval --adapter` of a peft LoRA directory against peft's `PeftModel` (≤ 1e-4)"),
    Check("merge --save-model", "`merge -m task-arithmetic` of two peft LoRAs: the merged model's tensors "
          "against the base + the sum of peft's `merge_and_unload` deltas (≤ 1e-5 relative)"),
    Check("merge --save-peft", "the PEFT directory of the same merge, loaded by peft: its logits against those "
          "of the merged model (≤ 1e-4)"),
    Check("train-expert", "one training step on a batch: the loss and every gradient (LoRA factors, DoRA "
          "magnitudes) against peft's on the same factors and batch (≤ 1e-4 relative), and the expert written "
          "after the step against peft's"),
]

# The config fields every row shares: a vocabulary the tests' character tokenizer fills, 2 layers, hidden 32.
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=128)


@dataclass(frozen=True)
class Arch:
    name: str  # as the README names it
    model_type: str  # transformers' config model_type
    config: dict = field(default_factory=dict)  # fields over TINY (names this config uses)
    targets: tuple[str, ...] = ()  # the test LoRA's target modules; () = peft's "all-linear"
    note: str = ""  # what is particular to it (the README's last column)


ARCHS = [
    Arch("Llama", "llama"),
    Arch("Mistral", "mistral"),
    Arch("Qwen2", "qwen2"),
    Arch("Qwen3", "qwen3"),
    Arch("Gemma", "gemma", note="tied output layer"),
    Arch("Gemma-2", "gemma2", dict(final_logit_softcapping=3.0, attn_logit_softcapping=5.0),
         note="soft-capped logits (`final_logit_softcapping`)"),
    Arch("Gemma-3 (text)", "gemma3_text", dict(final_logit_softcapping=3.0), note="soft-capped logits"),
    Arch("Phi", "phi", dict(partial_rotary_factor=0.5), note="biases, partial rotary"),
    Arch("Phi-3", "phi3", dict(pad_token_id=3), note="fused `qkv_proj`, `gate_up_proj`"),
    Arch("StarCoder2", "starcoder2", note="biases"),
    Arch("OLMo-2", "olmo2"),
    Arch("StableLM", "stablelm"),
    Arch("OPT", "opt", dict(ffn_dim=64, word_embed_proj_dim=32, pad_token_id=3), note="biases"),
    Arch("Mixtral", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2), ("q_proj", "k_proj", "v_proj", "o_proj"),
         note="MoE: the attention (the router and the experts are parameters to peft: see the adapter kinds)"),
    Arch("Qwen2-MoE", "qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=32),
         ("q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
          "shared_expert.down_proj"),
         note="MoE: the attention and the shared expert"),
    Arch("Granite", "granite", dict(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                     attention_multiplier=0.3),
         note="scaled logits (`logits_scaling`)"),
    Arch("Cohere", "cohere", dict(logit_scale=0.25), note="scaled logits (`logit_scale`), tied output layer"),
    Arch("GPT-2", "gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, n_inner=64), ("c_attn",),
         note="`Conv1D` layers (weights stored [in, out], peft's `fan_in_fan_out`): peft's default target"),
    Arch("GPT-NeoX", "gpt_neox", dict(rotary_pct=0.5), note="fused `query_key_value`"),
    Arch("Falcon", "falcon", note="fused `query_key_value`, multi-query"),
    Arch("BLOOM", "bloom", dict(n_layer=2, n_head=4), note="fused `query_key_value`, ALiBi"),
    Arch("GPT-J", "gptj", dict(rotary_dim=4, n_inner=64)),
    Arch("GPT-Neo", "gpt_neo", dict(num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                    window_size=4)),
    Arch("GPT-BigCode", "gpt_bigcode", dict(n_inner=64)),
    Arch("MPT", "mpt", dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=128)),
    Arch("CodeGen", "codegen", dict(rotary_dim=4, n_inner=64, n_ctx=128)),
    Arch("BART (decoder)", "bart", dict(d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                                        encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64)),
    Arch("BERT (decoder)", "bert", dict(is_decoder=True)),
    Arch("RoBERTa (decoder)", "roberta", dict(is_decoder=True, pad_token_id=3)),
    Arch("XLM-RoBERTa (decoder)", "xlm-roberta", dict(is_decoder=True, pad_token_id=3)),
    Arch("ELECTRA (decoder)", "electra", dict(is_decoder=True, embedding_size=16)),
    Arch("Llama-4 (text)", "llama4_text", dict(num_local_experts=2, intermediate_size_mlp=64),
         ("q_proj", "k_proj", "v_proj", "o_proj", "shared_expert.gate_proj", "shared_expert.up_proj",
          "shared_expert.down_proj"),
         note="MoE: the attention and the shared expert (the router routes in its forward: refused as a target)"),
    Arch("Gemma-4 (text)", "gemma4_text", dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
                                              global_head_dim=16),
         note="per-layer input embeddings; its full-attention layer has another head size"),
    Arch("Nemotron-H", "nemotron_h", dict(mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
                                          chunk_size=8, n_routed_experts=4, moe_intermediate_size=16,
                                          moe_shared_expert_intermediate_size=16),
         targets=("q_proj", "k_proj", "v_proj", "o_proj"),
         note="hybrid Mamba-attention: the attention (peft refuses LoRA on the Mamba mixers)"),
    Arch("RWKV", "rwkv", dict(rescale_every=1), note="refused where an update runs beside its weights: in eval "
         "mode its forward divides block i's `attention.output` and `feed_forward.value` weights in place by "
         "2^(i // `rescale_every`) (1 here: the second block's are halved), which a LoRA beside them does not "
         "follow (peft's own forward neither: the merge's PEFT directory is checked through peft's "
         "`merge_and_unload`); merged into the weights (`--save-model`) it is exact"),
]


@dataclass(frozen=True)
class Kind:
    """An adapter kind beyond a plain LoRA (the architectures' rows are plain LoRAs on every linear layer but
    the output layer, peft's ``all-linear``, unless ``Arch.targets`` says otherwise)."""

    name: str  # as the README names it
    arch: str  # the Arch.name it is checked on
    lora: dict  # peft LoraConfig fields
    note: str = ""
    train: tuple[str, ...] | None = None  # the train-expert options that train this kind (None: not one it trains)


KINDS = [
    Kind("LoRA on every `Conv1D`", "GPT-2", dict(target_modules="all-linear"),
         "square and non-square; ΔW held [out, in], transposed where it meets the weight",
         ("--target-modules", "c_attn,c_proj,c_fc")),
    Kind("DoRA (`use_dora`)", "Llama", dict(target_modules="all-linear", use_dora=True),
         "magnitude m per output row: (m / ‖W + s·BA‖)(W + s·BA); merged through W' − W (needs `--base`); "
         "`train-expert --dora`", ("--dora",)),
    Kind("DoRA on every `Conv1D`", "GPT-2", dict(target_modules="all-linear", use_dora=True),
         "the norm per output row of the [out, in] weight", ("--dora", "--target-modules", "c_attn,c_proj,c_fc")),
    Kind("rsLoRA (`use_rslora`)", "Llama", dict(target_modules="all-linear", use_rslora=True), "scale alpha/√r"),
    Kind("rank and alpha patterns, `layers_to_transform`", "Llama",
         dict(target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={"v_proj": 2},
              alpha_pattern={"q_proj|up_proj": 32}, layers_to_transform=[1]),
         "patterns matched as peft matches them (a whole alternation at the name's end)"),
    Kind("LoRA on embeddings (`embed_tokens`)", "Llama", dict(target_modules=["embed_tokens", "q_proj"]),
         "`lora_embedding_A/B`; peft's `base_layer` copy checked equal to the base's"),
    Kind("`modules_to_save` (`lm_head`)", "Llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
         "full tensors: task vectors against the base (needs `--base` to merge)"),
    Kind("trained biases (`bias='all'`)", "Qwen2", dict(target_modules=["q_proj"], bias="all"),
         "full biases: task vectors against the base"),
    Kind("trained biases (`bias='lora_only'`)", "Qwen2", dict(target_modules=["q_proj", "v_proj"], bias="lora_only"),
         "under `base_layer`"),
    Kind("`lora_bias`", "Qwen2", dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
         "the bias changes by scale·`lora_B.bias`"),
    Kind("`modules_to_save` of a `Conv1D` module", "GPT-2",
         dict(target_modules=["c_attn"], modules_to_save=["c_proj"]), "refused: its weight is saved [in, out]"),
    Kind("MoE expert parameters (`target_parameters`)", "Mixtral",
         dict(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
         "refused when read: LoRA on the experts' stacked 3-D weights"),
]

# (row, check) -> what the check must show when it is not "ok": "refused: <words of the one-line refusal>", or
# "n/a" (not run)
MOE = "MoE expert parameters (`target_parameters`)"
SELF_CHANGING = "refused: of its weights in place"  # a model whose forward changes its weights (model.check_updatable)
CONV_SAVED = "`modules_to_save` of a `Conv1D` module"
OUTCOMES: dict[tuple[str, str], str] = {
    (MOE, "eval LoRA"): "refused: target_parameters", (MOE, "merge --save-model"): "refused: target_parameters",
    (MOE, "merge --save-peft"): "refused: target_parameters",
    # train-expert trains LoRAs (on the targets of --target-modules) and DoRAs (--dora), not the other kinds
    **{(k.name, "train-expert"): "n/a" for k in KINDS if k.train is None},
    ("RWKV", "eval LoRA"): SELF_CHANGING, ("RWKV", "train-expert"): SELF_CHANGING,
    **{(CONV_SAVED, c): "refused: of a Conv1D module is not supported"
       for c in ("eval LoRA", "merge --save-model", "merge --save-peft")},
}


def outcome(row: str, check: str) -> str:
    """What ``check`` must show on ``row``; an adapter kind's "eval base" is its architecture's."""
    if check == "eval base" and row in {k.name for k in KINDS}:
        return "n/a"
    return OUTCOMES.get((row, check), "ok")


def _cell(o: str) -> str:
    return "✓" if o == "ok" else "·" if o == "n/a" else "refused"


def table() -> str:
    """The README's support tables, from the definitions above."""
    head = "| " + " | ".join(c.name for c in CHECKS) + " |"
    rule = "|---" * (len(CHECKS) + 2) + "|"
    out = ["| architecture (model type) " + head + " notes |", rule]
    for a in ARCHS:
        out.append(f"| {a.name} (`{a.model_type}`) | " + " | ".join(_cell(outcome(a.name, c.name)) for c in CHECKS)
                   + f" | {a.note} |")
    out += ["", "| adapter kind (on) " + head + " notes |", rule]
    for k in KINDS:
        out.append(f"| {k.name} ({k.arch}) | " + " | ".join(_cell(outcome(k.name, c.name)) for c in CHECKS)
                   + f" | {k.note} |")
    out += ["", "Columns (· : not applicable: an adapter kind's base is its architecture's, and train-expert trains "
            "LoRAs and DoRAs, not the other kinds):", ""]
    out += [f"- **{c.name}**: {c.what}." for c in CHECKS]
    return "\n".join(out) + "\n"


BEGIN = "<!-- support table: written by `python -m mergetool.zoo` from mergetool/zoo.py; do not edit -->"
END = "<!-- end of support table -->"


def with_table(readme: str) -> str:
    """``readme`` with the text between the markers replaced by ``table()``."""
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise ValueError("the README has no support-table markers")
    return pattern.sub(lambda _: f"{BEGIN}\n{table()}{END}", readme)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "README.md"
    path.write_text(with_table(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
