"""Eval and train-expert benchmarks, side by side in one run; prints ratios and writes JSON.

(a) Multiple-choice eval vs lm-evaluation-harness (HFLM.loglikelihood) on the same model and items:
    examples per second, and accuracy (acc: argmax of summed log-likelihoods) compared item by item.
(b) --per-example training of E experts at once vs a loop of peft trainings with the same steps:
    wall time, and final losses compared.

    python benchmarks/bench_eval_train.py --tokenizer DIR [--small] [--device cuda] [--json out.json]
    python benchmarks/bench_eval_train.py --model DIR --experts 16 [--json out.json]   # a real model (CPU)

The model is randomly initialised (speed does not depend on the weights): Llama-3.2-1B's shapes with the
tokenizer's vocabulary (SmolLM2's tokenizer, the one that works offline), or a small Llama with --small.
Items are the capital and currency questions of examples/data/countries.jsonl (8 choices each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mergetool import evaluate as ev  # noqa: E402
from mergetool.adapters import layer_of  # noqa: E402
from mergetool.examples import add_contexts, check_examples  # noqa: E402
from mergetool import train as tr  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_model(tok_dir: Path, small: bool, dev, dtype, model_dir: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir or tok_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model_dir:  # a real model with its weights (the testbed's SmolLM2 on CPU)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(dev).eval(), tok
    if small:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, tok


def bench_eval(model, tok, dev, n_items: int, batch_tokens: int, shots: int = 0) -> dict:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    every = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    rows = every[:n_items]
    exs = check_examples(rows, "countries")
    if shots:  # k demonstrations of the same task (never the item itself), the same strings for both tools
        add_contexts(exs, check_examples(every, "countries"), shots, seed=0)
    else:
        for e in exs:
            e.context = e.rec["prompt"]
    ev.evaluate(model, tok, exs[:8], "none", batch_tokens=batch_tokens)  # warm-up
    sync(dev)
    t = time.perf_counter()
    ours = ev.evaluate(model, tok, exs, "none", batch_tokens=batch_tokens)[0]
    sync(dev)
    t_ours = time.perf_counter() - t
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=64)
    reqs = [Instance("loglikelihood", {}, (e.context, c), i) for e in exs for i, c in enumerate(e.rec["choices"])]
    lm.loglikelihood(reqs[:64], disable_tqdm=True)  # warm-up
    sync(dev)
    t = time.perf_counter()
    lls = [x[0] for x in lm.loglikelihood(reqs, disable_tqdm=True)]
    sync(dev)
    t_lm = time.perf_counter() - t
    preds, k = [], 0
    for r in rows:
        ll = lls[k:k + len(r["choices"])]
        k += len(r["choices"])
        preds.append(max(range(len(ll)), key=ll.__getitem__))
    same = sum(int(p == o["prediction"]) for p, o in zip(preds, ours))
    acc_lm = sum(int(p == r["answer"]) for p, r in zip(preds, rows)) / len(rows)
    acc_ours = sum(o["correct"] for o in ours) / len(rows)
    res = {"items": len(rows), "shots": shots, "choices": len(reqs), "ours_s": t_ours, "lm_eval_s": t_lm,
           "ours_items_per_s": len(rows) / t_ours, "lm_eval_items_per_s": len(rows) / t_lm,
           "speedup": t_lm / t_ours, "same_prediction": same, "acc_ours": acc_ours, "acc_lm_eval": acc_lm}
    print(f"(a) MC eval, {len(rows)} items x 8 choices, {shots}-shot: mergetool {res['ours_items_per_s']:.1f} items/s, lm-eval "
          f"{res['lm_eval_items_per_s']:.1f} items/s = {res['speedup']:.2f}x; same prediction on {same}/{len(rows)}; "
          f"acc {acc_ours:.4f} vs {acc_lm:.4f}", flush=True)
    return res


def bench_train(model, tok, dev, n: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model

    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    texts = list(dict.fromkeys(r["text"] for r in rows))[:n]
    spec = tr.LoraSpec(epochs=steps)  # the paper's recipe: r=64, alpha=128, up_proj of the middle layer
    names = tr.target_modules(model, spec, default_middle=True)
    layer = layer_of(names[0])
    warm, _ = tr.train_stacked(model, tok, [("", x) for x in texts[:2]], tr.LoraSpec(epochs=1), names, [0, 1])
    warm.remove()  # kernels and handles of the backward pass, outside the timing
    sync(dev)
    t = time.perf_counter()
    st, losses = tr.train_stacked(model, tok, [("", x) for x in texts], spec, names, list(range(n)))
    sync(dev)
    t_ours = time.perf_counter() - t
    st.remove()
    for p in model.parameters():
        p.requires_grad_(False)
    peft_losses = []

    def one_peft(i, text, model):
        torch.manual_seed(i)
        pm = get_peft_model(model, LoraConfig(r=64, lora_alpha=128, target_modules=["up_proj"],
                                              layers_to_transform=[layer], lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=4e-3, weight_decay=0.0)
        ids, mask, lab = tr.lm_batch(tok, [("", text)], dev)
        for _ in range(steps):
            loss = tr.row_losses(pm(input_ids=ids, attention_mask=mask).logits, lab).sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            final = float(tr.row_losses(pm(input_ids=ids, attention_mask=mask).logits, lab)[0])
        return pm.unload(), final

    model, _ = one_peft(0, texts[0], model)  # warm-up, outside the timing
    sync(dev)
    t = time.perf_counter()
    for i, text in enumerate(texts):  # the plain way: one peft training after another
        model, final = one_peft(i, text, model)
        peft_losses.append(final)
    sync(dev)
    t_loop = time.perf_counter() - t
    res = {"experts": n, "steps": steps, "ours_s": t_ours, "peft_loop_s": t_loop, "speedup": t_loop / t_ours,
           "mean_final_loss_ours": sum(losses) / n, "mean_final_loss_peft": sum(peft_losses) / n}
    print(f"(b) {n} per-example experts x {steps} steps (r=64, up_proj of layer {layer}): stacked {t_ours:.2f} s vs "
          f"peft loop {t_loop:.2f} s = {res['speedup']:.1f}x; mean final loss {res['mean_final_loss_ours']:.4f} vs "
          f"{res['mean_final_loss_peft']:.4f}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer directory of the random-weight models")
    ap.add_argument("--model", type=Path, help="a model directory to run instead of random weights")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--items", type=int, default=388)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--shots", type=int, default=0, help="k-shot prompts (the same for both tools)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    from importlib.metadata import version

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(), "cpu": cpu,
               "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               **{p: version(p) for p in ("transformers", "peft", "lm_eval")}}
    print(f"machine: {json.dumps(machine)}", flush=True)
    if not (args.model or args.tokenizer):
        ap.error("give --tokenizer DIR (random weights) or --model DIR")
    model, tok = make_model(args.tokenizer, args.small, dev, dtype, args.model)
    machine["model"] = str(args.model.name if args.model else ("small" if args.small else "llama-3.2-1b-shape"))
    res = {"machine": machine, "device": str(dev), "dtype": str(dtype)}
    res["eval"] = bench_eval(model, tok, dev, args.items, args.batch_tokens, args.shots)
    if not args.skip_train:
        res["train"] = bench_train(model, tok, dev, args.experts, args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
