"""Many updates evaluated in one batched call vs a loop of apply/evaluate/restore, side by side in one run.

The setting of "Will it Merge?"'s per-example experts: U rank-64 LoRAs on ``mlp.up_proj`` of the middle
layer, each evaluated on the same multiple-choice questions (capitals and currencies of
examples/data/countries.jsonl, 8 choices), prompted as the paper evaluates (k = 4 shots by default; --shots 0
for bare questions). The batched call is ``evaluate`` with per-row adapters: the
layers below the middle one run once per question for all U updates, the rest once per update. The loop is
what a script would do with one resident model: for each update, write W + ΔW into the weights, evaluate,
restore. Predictions must be identical; scores equal to rounding.

What bounds the speed-up: the batched call saves the lower half of the layers, not the output layer, which
runs at every scored position in both (logsumexp over the whole vocabulary). With 0 shots a SmolLM2 question
is ~26 tokens of which ~19 are scored, so the output layer is ~17% of the loop and the bound is ~1.7x; with
4 shots the contexts are ~5x longer for the same scored positions and the bound approaches 2x.

    python benchmarks/bench_updates.py [--model DIR] [--updates 64] [--items 100] [--shots 4] [--json out.json]
    python benchmarks/bench_updates.py --model TINY --updates 4 --items 12   # CI: a tiny model

Without --model (and without --small) the testbed model (SmolLM2-135M-Instruct, real weights) is cached
from its GGUF into --workdir and used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, pick, sync, testbed_dir  # noqa: E402

from mergetool import evaluate as ev  # noqa: E402
from mergetool.adapters import RowAdapters, decoder_layers  # noqa: E402
from mergetool.examples import add_contexts, check_examples  # noqa: E402
from mergetool.model import load_model, resolve_base  # noqa: E402
from mergetool.scoring import batch_tokens_for  # noqa: E402
from mergetool.updates import PREFIX, LowRank, Update  # noqa: E402


def experts(model, n: int, rank: int = 64, alpha: float = 128.0, seed: int = 0, shape: str = "paper") -> list[Update]:
    """n random LoRAs: ``paper``, rank-``rank`` on mlp.up_proj of the middle layer (the paper's per-example
    recipe); ``experiment``, rank 16 (alpha 32) on the attention's q, k, v and o of the upper half of the
    layers (the task experts of ``experiments/``: 60 adapted modules on SmolLM2)."""
    path, layers = decoder_layers(model)
    mid = len(layers) // 2
    if shape == "paper":
        sites = [(f"{path}.{mid}.mlp.up_proj", layers[mid].mlp.up_proj)]
    else:
        rank, alpha = 16, 32.0
        sites = [(f"{path}.{i}.self_attn.{p}", getattr(layers[i].self_attn, p))
                 for i in range(mid, len(layers)) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    g = torch.Generator().manual_seed(seed)
    out = []
    for e in range(n):
        mods = {}
        for name, lin in sites:
            A = torch.randn(rank, lin.in_features, generator=g) / lin.in_features ** 0.5
            B = torch.randn(lin.out_features, rank, generator=g) * (0.01 if shape == "paper" else 0.002)
            mods[PREFIX + name] = LowRank(A, B, alpha / rank)
        out.append(Update(f"x{e}", mods, {"name": f"x{e}"}))
    return out


@torch.no_grad()
def loop(model, tok, exs, updates, batch_tokens):
    """Apply W += ΔW, evaluate, restore: one update at a time."""
    params = dict(model.named_parameters())
    out = []
    for u in updates:
        saved = {}
        for mod, m in u.modules.items():
            w = params[mod[len(PREFIX):] + ".weight"]
            saved[mod] = w.detach().clone()
            w.copy_((w.float() + m.delta(w.device)).to(w.dtype))
        out.append(ev.evaluate(model, tok, exs, "tokens", batch_tokens=batch_tokens)[0])
        for mod, w in saved.items():
            params[mod[len(PREFIX):] + ".weight"].copy_(w)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the testbed model, cached)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache")
    ap.add_argument("--updates", type=int, default=64)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--shots", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: mergetool's for the device")
    ap.add_argument("--shape", choices=("paper", "experiment"), default="paper",
                    help="the updates: the paper's per-example experts, or the task experts of experiments/")
    ap.add_argument("--no-loop", action="store_true", help="skip the loop (compare the batched routes only)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = pick(args.device)
    model_dir = testbed_dir(args.model, args.workdir)
    model, tok = load_model(resolve_base(str(model_dir)), dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    rows = [json.loads(x) for x in (ROOT / "examples" / "data" / "countries.jsonl").read_text().splitlines()]
    exs = check_examples(rows, "countries")
    pool = list(exs)
    exs = exs[:args.items]
    if args.shots:
        add_contexts(exs, pool, args.shots, seed=0)
    else:
        for e in exs:
            e.context = e.rec["prompt"]
    ups = experts(model, args.updates, shape=args.shape)
    info = {"machine": machine(dev), "model": model_dir.name, "device": str(dev), "updates": len(ups), "shape": args.shape,
            "batch_tokens": batch_tokens_for(dev, args.batch_tokens),
            "items": len(exs), "shots": args.shots, "item_ids": f"the first {len(exs)} records of countries.jsonl"}
    print(f"machine: {json.dumps(info['machine'])}", flush=True)
    ev.evaluate(model, tok, exs[:4], batch_tokens=args.batch_tokens)  # warm-up (and the packing check)

    sync(dev)
    t, c = time.perf_counter(), time.process_time()
    with RowAdapters(model, ups) as ad:
        batched = ev.evaluate(model, tok, exs, "tokens", batch_tokens=args.batch_tokens, adapters=ad,
                              jobs=[(i, range(len(exs))) for i in range(len(ups))])
    sync(dev)
    t_batched, c_batched = time.perf_counter() - t, time.process_time() - c

    if args.no_loop:
        if args.json:
            Path(args.json).write_text(json.dumps({**info, "batched_s": t_batched}, indent=2))
        return
    t, c = time.perf_counter(), time.process_time()
    looped = loop(model, tok, exs, ups, args.batch_tokens)
    sync(dev)
    t_loop, c_loop = time.perf_counter() - t, time.process_time() - c

    same = sum(a["prediction"] == b["prediction"] for x, y in zip(batched, looped) for a, b in zip(x, y))
    diff = max(abs(p - q) for x, y in zip(batched, looped) for a, b in zip(x, y)
               for p, q in zip(a["logprobs"], b["logprobs"]))
    n = len(ups) * len(exs)
    info.update({"batched_s": t_batched, "loop_s": t_loop, "speedup": t_loop / t_batched,
                 "batched_cpu_s": c_batched, "loop_cpu_s": c_loop,  # CPU time of the process: less moved by a busy machine
                 "evaluations": n, "same_prediction": same, "max_logprob_diff": diff,
                 "changed_by_updates": sum(a["prediction"] != b["prediction"] for x in batched
                                           for a, b in zip(x, looped[0]))})
    print(f"{len(ups)} updates x {len(exs)} questions ({args.shots}-shot) on {model_dir.name}: batched {t_batched:.1f} s "
          f"vs loop {t_loop:.1f} s = {info['speedup']:.2f}x (CPU {c_batched:.1f} s vs {c_loop:.1f} s); same prediction "
          f"{same}/{n}; "
          f"max |Δ logprob| {diff:.2e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
