"""The data-aware merges against their plain counterparts, side by side in one run.

(a) ``candidates``: auto's candidates judged many per batched pass against a loop that merges each candidate,
    writes it into the resident model's weights, evaluates it on the same dev examples and restores them. The
    candidates are those auto's refinement makes: task arithmetic of the pool with random weights (and λ); the
    pool is 8 task experts on SmolLM2-135M (real weights). The two halves alternate over --repeat quarters of
    the candidates, so that load from other jobs on the machine falls on both alike. Accuracies must agree.
(b) ``regmean``: RegMean of 8 rank-16 LoRAs on q/k/v/o of a Llama-3.2-1B-shaped model (16 layers, hidden 2048,
    k/v 512), from the factors (an exact LoRA, one Cholesky per input shared by q, k and v) against the dense
    formula ΔW* = (Σ ΔW_i G̃_i)(Σ G̃_i)⁻¹ module by module, on the same Grams (random, of 4096 tokens); the same ΔW
    to 1e-5.
(c) ``lorahub``: the lorahub search (CMA-ES, each generation's population in one batched pass, ΔW = Σ w_i ΔW_i)
    against LoraHub's own loop reproduced (lorahub 0.1.0's ``lorahub_learning`` needs a seq2seq model: here its
    code path on the causal model, peft's LoRA with A and B summed apart per candidate, set_peft_model_state_dict,
    the model's loss on one batch, NGOpt with the budget, one candidate at a time), the same pool, examples and
    budget; time, and accuracy on held-out examples of the target task.

    python benchmarks/bench_datamerge.py candidates --experts DIR --data DEV.jsonl [--json out.json]
    python benchmarks/bench_datamerge.py regmean [--layers 16] [--json out.json]
    python benchmarks/bench_datamerge.py lorahub --experts DIR --data DEV.jsonl --target TASK [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import country_questions, machine, pick, random_loras, sync, testbed_dir  # noqa: E402

TASKS8 = ["sst2", "cola", "country-capital", "country-currency", "country-region", "country-language",
          "country-continent", "city-country"]


def _dev(path: Path, tasks: list[str], per_task: int, skip: int = 0):
    from mergetool.examples import check_examples

    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    out = []
    for t in tasks:
        out += [r for r in rows if r["task"] == t and r.get("split") != "train"][skip:skip + per_task]
    exs = check_examples(out, str(path))
    for e in exs:
        e.context = e.rec["prompt"]
    return exs


def _experts(d: Path, tasks: list[str]):
    from mergetool.inputs import load_inputs

    return load_inputs([str(d / f"{t}.safetensors") for t in tasks], None, False)


# ----------------------------------------------------------------------------- (a)


def _random_experts(model, n: int, dev, rank: int = 16):
    """n random LoRAs laid out as the testbed's task experts (stages.EXPERT): rank 16 on q, k, v and o of the
    upper half of the model's decoder layers, shapes read from the model, small enough to keep its answers."""
    from mergetool.updates import PREFIX, LowRank, Update

    layers = model.config.num_hidden_layers
    want = {f"layers.{i}.self_attn.{p}" for i in range(layers // 2, layers)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    shapes = {name: m.weight.shape for name, m in model.named_modules()
              if any(name.endswith(w) for w in want) and hasattr(m, "weight")}
    g = torch.Generator(device=dev).manual_seed(0)
    return [Update(f"t{i}", {PREFIX + name: LowRank(torch.randn(rank, inp, generator=g, device=dev) / inp ** 0.5,
                                                    torch.randn(out, rank, generator=g, device=dev) * 0.01, 2.0)
                             for name, (out, inp) in shapes.items()}, {"name": f"t{i}"}) for i in range(n)]


@torch.no_grad()
def _loop(model, tok, exs, updates, recipes, batch_tokens):
    """Each candidate in turn: merge, write W + ΔW into the weights, evaluate, restore."""
    from mergetool import evaluate as ev
    from mergetool.methods import Params, merge
    from mergetool.updates import PREFIX

    params = dict(model.named_parameters())
    out = []
    for w, lam in recipes:
        m = merge(updates, "task-arithmetic", Params(weights=w, lam=lam), next(model.parameters()).device)
        saved = {}
        for mod, x in m.modules.items():
            p = params[mod[len(PREFIX):] + ".weight"]
            saved[mod] = p.detach().clone()
            p.copy_((p.float() + x.delta(p.device)).to(p.dtype))
        out.append([r["correct"] for r in ev.evaluate(model, tok, exs, "tokens", batch_tokens=batch_tokens)[0]])
        for mod, p in saved.items():
            params[mod[len(PREFIX):] + ".weight"].copy_(p)
    return out


def _batched(model, tok, exs, updates, recipes, batch_tokens, population):
    """All the candidates merged, then judged ``population`` at a time as rows of one pass (auto's Judge)."""
    from mergetool.merging.candidates import Judge
    from mergetool.merging.data import DevData
    from mergetool.methods import Params, merge

    tasks = list(dict.fromkeys(e.task for e in exs))
    dev = DevData(exs, [[i for i, e in enumerate(exs) if e.task == t] for t in tasks], tasks)
    judge = Judge(model, tok, dev, "tokens", batch_tokens)
    out = []
    for s in range(0, len(recipes), population):
        cands = [merge(updates, "task-arithmetic", Params(weights=w, lam=lam), judge.device)
                 for w, lam in recipes[s:s + population]]
        for acc in judge.accuracies(cands):
            out.append(acc)
    return out


def candidates(args) -> dict:
    from mergetool import evaluate as ev
    from mergetool.model import load_model, resolve_base
    from mergetool.scoring import batch_tokens_for

    dev = pick(args.device)
    model_dir = testbed_dir(args.model, args.workdir)
    model, tok = load_model(resolve_base(str(model_dir)), dev)
    if args.experts:
        updates, exs = _experts(args.experts, TASKS8), _dev(args.data, TASKS8, args.per_task)
    else:  # no trained experts here (a GPU box): random ones of the testbed experts' layout, the committed questions
        updates, exs = _random_experts(model, 8, dev), country_questions(8 * args.per_task)
    rng = random.Random(0)
    recipes = [([rng.lognormvariate(0, 0.3) for _ in updates], 0.5 * rng.lognormvariate(0, 0.3))
               for _ in range(args.candidates)]
    ev.evaluate(model, tok, exs[:4])  # warm-up (and the packing check)
    t_b = t_l = 0.0
    got_b, got_l = [], []
    quarter = -(-len(recipes) // args.repeat)
    for s in range(0, len(recipes), quarter):
        part = recipes[s:s + quarter]
        sync(dev)
        t = time.perf_counter()
        got_b += _batched(model, tok, exs, updates, part, args.batch_tokens, args.population)
        sync(dev)
        t_b += time.perf_counter() - t
        t = time.perf_counter()
        got_l += _loop(model, tok, exs, updates, part, args.batch_tokens)
        sync(dev)
        t_l += time.perf_counter() - t
    tasks = list(dict.fromkeys(e.task for e in exs))
    loop_acc = [{t: sum(c for c, e in zip(cs, exs) if e.task == t) / sum(e.task == t for e in exs) for t in tasks}
                for cs in got_l]
    same = sum(a == b for a, b in zip(got_b, loop_acc))
    info = {"bench": "candidates", "machine": machine(dev), "model": model_dir.name,
            "experts": str(args.experts or "random (the experts' layout)"),
            "tasks": TASKS8, "examples": len(exs), "per_task": args.per_task, "candidates": len(recipes),
            "population": args.population, "batch_tokens": batch_tokens_for(dev, args.batch_tokens),
            "batched_s": t_b, "loop_s": t_l, "batched_per_s": len(recipes) / t_b, "loop_per_s": len(recipes) / t_l,
            "speedup": t_l / t_b, "same_accuracies": same}
    print(f"(a) {len(recipes)} candidates of {len(updates)} experts on {len(exs)} dev examples: batched {t_b:.1f} s "
          f"({info['batched_per_s']:.3f}/s) vs loop {t_l:.1f} s ({info['loop_per_s']:.3f}/s) = {info['speedup']:.2f}x; "
          f"same per-task accuracies {same}/{len(recipes)}", flush=True)
    return info


# ----------------------------------------------------------------------------- (b)


def regmean(args) -> dict:
    from mergetool.methods import Params, merge
    from mergetool.methods.dataaware import regmean_dense

    dev = pick(args.device)
    ups = random_loras(8, 16, args.layers, 2048, 512, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    sites = {}
    for site in ("qkv", "o"):  # q, k and v read one input: one Gram per task, shared by the three
        X = torch.randn(8, 4096, 2048, generator=g, device=dev) * torch.rand(2048, generator=g, device=dev) * 2
        sites[site] = (X.transpose(1, 2) @ X).double() / 4096
        del X
    grams = {}  # every layer reads the same two Grams (memory); each layer's merge factors its own anyway
    for layer in range(args.layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            grams[f"base_model.model.model.layers.{layer}.self_attn.{p}"] = sites["o" if p == "o_proj" else "qkv"]
    alpha = 0.9
    from mergetool.updates import Update

    t_f = t_d = worst = 0.0
    fac = {}
    for layer in range(args.layers):  # layer by layer, the two routes in turn: load from other jobs falls on both
        keys = [k for k in grams if f".layers.{layer}." in k]
        part = [Update(u.name, {k: u.modules[k] for k in keys}, u.meta) for u in ups]
        sync(dev)
        t = time.perf_counter()
        got = merge(part, "regmean", Params(alpha=alpha, stats={"grams": grams}), dev)
        sync(dev)
        t_f += time.perf_counter() - t
        fac.update(got.modules)
        for k in keys:
            sync(dev)
            t = time.perf_counter()
            dense = regmean_dense(torch.stack([u.modules[k].delta(dev) for u in ups]), grams[k], alpha)
            sync(dev)
            t_d += time.perf_counter() - t
            worst = max(worst, float((fac[k].delta(dev).double() - dense).norm() / dense.norm()))
    from fusion_bench.method.regmean_plusplus.regmean_plusplus import regmean_params_merge

    t_p, worst_p = 0.0, 0.0
    peer_mods = list(grams)[:4 * args.peer_layers]
    for k in peer_mods:  # fusion-bench's RegMean of one module: W* = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ, on W_i = ΔW_i
        ds = [u.modules[k].delta(dev).double() for u in ups]
        sync(dev)
        t = time.perf_counter()
        ref = regmean_params_merge(ds, list(grams[k]), reduce_non_diagonal_ratio=alpha)
        sync(dev)
        t_p += time.perf_counter() - t
        worst_p = max(worst_p, float((fac[k].delta(dev).double() - ref).norm() / ref.norm()))
    t_f_peer = t_f * len(peer_mods) / len(grams)  # the factor route's time on the same modules (its per-module mean)
    info = {"bench": "regmean", "machine": machine(dev, ("fusion-bench",)), "layers": args.layers,
            "modules": len(grams), "loras": 8, "rank": 16, "hidden": 2048, "kv": 512, "tokens": 4096, "alpha": alpha,
            "factors_s": t_f, "dense_s": t_d, "speedup": t_d / t_f, "max_rel_diff": worst,
            "fusion_bench_modules": len(peer_mods), "fusion_bench_s": t_p, "speedup_fusion_bench": t_p / t_f_peer,
            "max_rel_diff_fusion_bench": worst_p}
    print(f"(b) RegMean of 8 rank-16 LoRAs on {len(grams)} Llama-3.2-1B-shaped modules: factors {t_f:.2f} s vs dense "
          f"{t_d:.2f} s = {info['speedup']:.1f}x; largest relative difference {worst:.1e}; fusion-bench on "
          f"{len(peer_mods)} of them {t_p:.2f} s = {info['speedup_fusion_bench']:.1f}x (difference {worst_p:.1e})",
          flush=True)
    return info


# ----------------------------------------------------------------------------- (c)


def _lorahub_loop(model_dir, tok, updates, exs, budget, seed, dev):
    """LoraHub's lorahub_learning, its steps on a causal LM: peft LoRA modules whose state dict is set per candidate
    to Σ w_i A_i, Σ w_i B_i (get_score), the model's mean loss on one batch of all examples divided by their number
    (default_get_loss), plus 0.05·mean|w| (default_l1_regularization); NGOpt over [−1.5, 1.5]ⁿ from 0."""
    import nevergrad as ng
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from peft.utils.save_and_load import set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from mergetool.merging.data import answer_items
    from mergetool.updates import PREFIX

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(dev).eval()
    u0 = updates[0]
    r = next(iter(u0.modules.values())).rank
    targets = sorted({k.rsplit(".", 1)[-1] for k in u0.modules})
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in u0.modules})
    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, layers_to_transform=layers, lora_dropout=0.0)
    pm = get_peft_model(base, cfg).eval()
    cache = []
    for u in updates:  # the adapters' state dicts, scale folded into B (lora_alpha = r)
        sd = {}
        for k, m in u.modules.items():
            sd[f"{k}.lora_A.weight"] = m.A.float()
            sd[f"{k}.lora_B.weight"] = m.B.float() * m.scale
        cache.append(sd)
    items = answer_items(tok, exs)
    seqs = [c + a for c, (a,) in items]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id)
    lab = torch.full((len(seqs), L), -100)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, ((c, (a,)), s) in enumerate(zip(items, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, len(c):len(s)] = torch.tensor(a)
        mask[i, :len(s)] = 1
    batch = {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": lab.to(dev)}

    def get_score(weights):
        sd = {k: sum(w * c[k] for w, c in zip(weights, cache)) for k in cache[0]}
        set_peft_model_state_dict(pm, sd)
        with torch.no_grad():
            loss = float(pm(**batch).loss)
        return loss / len(exs) + 0.05 * sum(abs(x) for x in weights) / len(weights)

    random.seed(seed)
    np.random.seed(seed)
    instrum = ng.p.Array(init=[0] * len(updates), upper=[1.5] * len(updates), lower=[-1.5] * len(updates))
    opt = ng.optimizers.NGOpt(parametrization=instrum, budget=budget)
    rec = opt.minimize(get_score)
    w = [float(x) for x in rec.value]
    composed = {}
    for k in u0.modules:  # LoraHub's composition, as one LoRA of rank r (A and B summed apart)
        from mergetool.updates import LowRank

        composed[k] = LowRank(sum(wi * c[f"{k}.lora_A.weight"] for wi, c in zip(w, cache)),
                              sum(wi * c[f"{k}.lora_B.weight"] for wi, c in zip(w, cache)), 1.0)
    assert all(k.startswith(PREFIX) for k in composed)
    return w, composed


def lorahub(args) -> dict:
    from mergetool.merging.candidates import Judge
    from mergetool.merging.data import DevData
    from mergetool.merging.lorahub import lorahub_weights
    from mergetool.methods import Params, merge
    from mergetool.model import load_model, resolve_base
    from mergetool.updates import Update

    dev = pick(args.device)
    model_dir = testbed_dir(args.model, args.workdir)
    model, tok = load_model(resolve_base(str(model_dir)), dev)
    pool = [t for t in TASKS8 if t != args.target]
    updates = _experts(args.experts, pool)
    few = _dev(args.data, [args.target], args.per_task)
    held = _dev(args.data, [args.target], args.held_out, skip=args.per_task)
    n = len(updates)
    few_dev = DevData(few, [list(range(len(few)))] * n, [args.target] * n)
    sync(dev)
    t = time.perf_counter()
    ours = lorahub_weights(model, tok, updates, few_dev, args.budget, args.population, 0.05, args.seed)
    sync(dev)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    w_loop, composed = _lorahub_loop(model_dir, tok, updates, few, args.budget, args.seed, dev)
    sync(dev)
    t_loop = time.perf_counter() - t
    judge = Judge(model, tok, DevData(held, [list(range(len(held)))], [args.target]))
    merged = merge(updates, "linear", Params(weights=ours["weights"]), dev)
    theirs = Update("lorahub-loop", composed, {"name": "lorahub-loop"})
    accs = judge.accuracies([None, merged, theirs])
    info = {"bench": "lorahub", "machine": machine(dev, ("transformers", "peft", "nevergrad")), "target": args.target,
            "pool": pool, "search_examples": len(few), "held_out": len(held), "budget": args.budget,
            "population": args.population, "ours_s": t_ours, "loop_s": t_loop, "speedup": t_loop / t_ours,
            "ours_weights": ours["weights"], "loop_weights": w_loop, "base_acc": accs[0][args.target],
            "ours_acc": accs[1][args.target], "loop_acc": accs[2][args.target]}
    print(f"(c) lorahub on {args.target} ({len(few)} examples, budget {args.budget}): ours {t_ours:.1f} s vs LoraHub's "
          f"loop {t_loop:.1f} s = {info['speedup']:.2f}x; held-out accuracy ({len(held)}) base {info['base_acc']:.3f}, "
          f"ours {info['ours_acc']:.3f}, LoraHub's {info['loop_acc']:.3f}", flush=True)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["candidates", "regmean", "lorahub"])
    ap.add_argument("--model", type=Path, help="model directory (default: the testbed model, cached)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache")
    ap.add_argument("--experts", type=Path, help="directory of the task experts (TASK.safetensors); (a) without it: "
                    "8 random experts of their layout, judged on the committed country questions")
    ap.add_argument("--data", type=Path, help="dev examples JSONL of the tasks")
    ap.add_argument("--per-task", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=64)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=4, help="(a): alternate batched and loop over this many parts")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--peer-layers", type=int, default=2, help="(b): layers also merged by fusion-bench")
    ap.add_argument("--target", default="country-language")
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    info = {"candidates": candidates, "regmean": regmean, "lorahub": lorahub}[args.what](args)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
