"""Every causal LM class of the installed transformers: does mergetool's output head give the model's logits?

For each model type in transformers' causal-LM mapping, a tiny random model is built from its default config
with small widths (the fields it has among those below; models that stay above 3M parameters are skipped),
its weights drawn wide, and the log-probabilities mergetool computes at gathered positions
(``scoring.token_logprobs``: the model's own forward with its decoder replaced by the gathered hidden
states) are compared with ``log_softmax(model(...).logits)``. One line per model type: the route taken
(``own head`` or ``full logits``, as ``scoring.own_head`` decides) and the largest difference, or why the
tiny model could not be built or run (a config these generic widths do not fit; not a mergetool failure).

    python scripts/head_survey.py [MODEL_TYPE ...] > survey.txt     # all of them: about 10 minutes on 2 cores
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergetool import scoring  # noqa: E402

WIDTHS = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, n_embd=32, n_layer=2, n_head=4,
              d_model=32, ffn_dim=48, num_layers=2, moe_intermediate_size=16, num_experts=4, num_local_experts=4,
              n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=16, logits_scaling=4.0,
              logit_scale=0.25, final_logit_softcapping=3.0, tie_word_embeddings=False)


def survey(model_type: str) -> str:
    import dataclasses

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    known = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map) if dataclasses.is_dataclass(cls) \
        else set(WIDTHS)
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in WIDTHS.items() if k in known})
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    if n > 3e6:
        return f"skipped: {n / 1e6:.0f}M parameters with these widths"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        ids = torch.randint(0, 96, (2, 10))
        mask = torch.ones_like(ids)
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
        rows, pos, tgt = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([3, 9, 0, 4, 9]), torch.tensor([1, 2, 3, 4, 5])
        try:
            got = scoring.token_logprobs(model, rows, pos, tgt, input_ids=ids, attention_mask=mask)
        except Exception as e:  # the model runs, mergetool does not: a finding
            return f"MERGETOOL FAILED: {type(e).__name__}: {str(e)[:120]}"
    route = "own head" if scoring.own_head(model) else "full logits"
    return f"{route:12} max |Δ log p| {float((got.double() - full[rows, pos, tgt]).abs().max()):.1e}  {type(model).__name__}"


def main(types: list[str]) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    for t in types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        t0 = time.time()
        try:
            line = survey(t)
        except Exception as e:  # a config the generic widths do not fit, a missing optional package, ...
            line = f"not built: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        print(f"{t:28} {line}  ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
