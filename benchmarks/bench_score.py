"""mergetool score's trials against the plain loop, side by side in one run, and their cost at the paper's scale.

The setting of "Will it Merge?" section 3.1: a pool of P rank-64 LoRA experts on mlp.up_proj of the middle
layer, one per multiple-choice question (the capitals and currencies of examples/data/countries.jsonl,
8 choices), KnOTS with TIES inside, M partners, N trials. Random factors (timing does not depend on them).

- shared: the trial plan of ``score`` (N partitions into groups of M+1), groups merged --merge-chunk at a
  time (one batched factorisation), each merge evaluated on its members' questions, all merges of a chunk
  in one batched pass with the lower layers computed once per question for the whole run.
- plain: the paper's loop with the same model resident: for each (adapter, trial), merge the adapter with
  its partners (the same partners the shared plan gave it, so the merges coincide and S must agree) and
  evaluate its question. Timed on --plain-pairs of the N·P pairs (each pair costs the same) and carried to
  all N·P; the S of those pairs is compared with the shared run's.

Then the measured cost per merge and per evaluated question is carried to the paper's scale (639 experts,
a Llama-3.2-3B-shaped model, 8 options with 4 shots, M=50, N=5) by FLOP counts, as an estimate.

The control (issue 18), side by side in the same run: the score's work without it (what explains S, then the
shared trials) against the same with the control (each adapter's question also evaluated under one merge
without it per trial: the same merges, twice the evaluations) and the off-target sample (each adapter alone on
--off-target other questions). The run with the control must give the same S; its time over the run without
is the figure (target: at most 1.5x). ``--repeat`` alternates the two runs to even out a shared machine.

    python benchmarks/bench_score.py [--model DIR] [--pool 200] [--partners 50] [--trials 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_updates import experts  # noqa: E402
from common import country_questions, machine, pick, sync, testbed_dir  # noqa: E402

from mergetool import evaluate as ev  # noqa: E402
from mergetool.adapters import RowAdapters  # noqa: E402
from mergetool.methods import Params, get, merge  # noqa: E402
from mergetool.model import load_model, resolve_base  # noqa: E402
from mergetool.score import Scorer, plan  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model directory (default: the testbed model, cached)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".cache")
    ap.add_argument("--pool", type=int, default=200)
    ap.add_argument("--partners", type=int, default=50)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--plain-pairs", type=int, default=40, help="0: skip the plain loop")
    ap.add_argument("--off-target", type=int, default=None, help="score's --off-target K (default: N, as score)")
    ap.add_argument("--repeat", type=int, default=1, help="runs without and with the control, alternated")
    ap.add_argument("--control-only", action="store_true", help="only the control's cost (not the plain loop)")
    ap.add_argument("--merge-chunk", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: mergetool's for the device")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paper-scale", action="store_true",
                    help="the paper's run itself (GPU): 639 experts, a random Llama-3.2-3B-shaped model (bf16), "
                         "8-option questions with 4 shots, M=50, N=5; the shared trials only")
    ap.add_argument("--paper-groups", type=int, default=None,
                    help="with --paper-scale: time the first K of the 65 groups and carry the rate to all of them "
                         "(every group is one merge of 51 and 51 evaluations: the same cost)")
    ap.add_argument("--small", action="store_true",
                    help="with --paper-scale: a tiny Llama shape, 24 experts, M=3, N=2 (a dry run of the code)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = pick(args.device)
    model_dir = testbed_dir(args.model, args.workdir)
    if args.paper_scale:
        return paper_run(args, dev, model_dir)
    model, tok = load_model(resolve_base(str(model_dir)), dev)
    exs = country_questions(args.pool)
    pool = experts(model, args.pool)
    for u, e in zip(pool, exs):
        u.name = u.meta["name"] = e.id
    P, M, N = args.pool, args.partners, args.trials
    args.off_target = N if args.off_target is None else args.off_target
    groups = plan(P, M, N, seed=0)
    method, p = get("knots"), Params()
    info = {"machine": machine(dev), "model": model_dir.name, "device": str(dev), "pool": P, "partners": M,
            "trials": N, "method": "knots (ties inside, density 0.2)", "merges_shared": len(groups),
            "merges_plain": P * N}
    print(f"machine: {json.dumps(info['machine'])}", flush=True)
    ev.evaluate(model, tok, exs[:4], batch_tokens=args.batch_tokens)  # warm-up (and the packing check)

    if args.control_only:
        info.update(control(model, tok, pool, exs, P, M, N, method, p, dev, args))
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2))
        return

    # shared: the score trials
    scorer = Scorer(model, tok, pool, exs, [[i] for i in range(P)], method, p, dev, batch_tokens=args.batch_tokens,
                    merge_chunk=args.merge_chunk)
    per = {}
    sync(dev)
    t = time.perf_counter()
    scorer.run_groups(groups, list(range(len(groups))),
                      lambda g, res: per.update({(a, groups[g].trial): v for a, v in res.items()}))
    sync(dev)
    t_shared = time.perf_counter() - t
    t_merge = scorer.seconds["merge"]
    S = {a: sum(per[(a, k)] for k in range(N)) / N for a in range(P)}
    info.update({"shared_s": t_shared, "shared_merge_s": t_merge, "shared_eval_s": t_shared - t_merge,
                 "mean_S": sum(S.values()) / P})
    if args.plain_pairs:
        info.update(plain(model, tok, pool, exs, groups, per, method, p, dev, P, N, t_shared, args))
    per_merge = t_merge / len(groups)
    per_question = (t_shared - t_merge) / (P * N)
    info.update({"s_per_merge": per_merge, "s_per_evaluated_question": per_question})
    info["paper_scale_estimate"] = paper_scale(model, per_merge, per_question, M, args)
    info.update(control(model, tok, pool, exs, P, M, N, method, p, dev, args))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


def plain(model, tok, pool, exs, groups, per, method, p, dev, P, N, t_shared, args) -> dict:
    """The paper's loop: one merge and one evaluation per (adapter, trial), the same partners as the shared plan,
    timed on --plain-pairs pairs and carried to all N·P."""
    pairs = [(a, g) for g in groups for a in g.counted][:: max(1, (P * N) // args.plain_pairs)][:args.plain_pairs]
    same = 0
    t_plain_merge = 0.0
    sync(dev)
    t = time.perf_counter()
    for a, g in pairs:
        tm = time.perf_counter()
        m = merge([pool[i] for i in g.members], method, p, dev)
        sync(dev)
        t_plain_merge += time.perf_counter() - tm
        with RowAdapters(model, [m]) as ad:
            r = ev.evaluate(model, tok, exs, batch_tokens=args.batch_tokens, adapters=ad, jobs=[(0, [a])])[0][0]
        same += int(r["correct"] == per[(a, g.trial)])
    sync(dev)
    t_pair = (time.perf_counter() - t) / len(pairs)
    t_plain = t_pair * P * N
    print(f"P={P} N={N}: shared {t_shared:.1f} s vs plain {t_pair:.2f} s/pair x {P * N} = {t_plain:.0f} s (timed on "
          f"{len(pairs)} pairs) = {t_plain / t_shared:.1f}x; same outcome on {same}/{len(pairs)} timed pairs",
          flush=True)
    return {"plain_pairs_timed": len(pairs), "plain_s_per_pair": t_pair,
            "plain_merge_s_per_pair": t_plain_merge / len(pairs), "plain_s_estimated": t_plain,
            "speedup": t_plain / t_shared, "same_outcome_on_timed_pairs": same}


def control(model, tok, pool, exs, P, M, N, method, p, dev, args) -> dict:
    """The score's work (explain, then the shared trials) without the control and with it, alternated
    --repeat times on the same resident model; the S of both must agree."""
    runs = {"without": [], "with": []}
    cpu = {"without": [], "with": []}  # the process's CPU seconds (all threads): less swayed by other jobs
    parts = {"without": [], "with": []}
    scores = {}
    for _ in range(args.repeat):
        for kind in ("without", "with"):
            on = kind == "with"
            groups = plan(P, M, N, seed=0, control=on)
            scorer = Scorer(model, tok, pool, exs, [[i] for i in range(P)], method, p, dev,
                            batch_tokens=args.batch_tokens, merge_chunk=args.merge_chunk,
                            off_target=args.off_target if on else 0)
            per = {}
            sync(dev)
            t, c = time.perf_counter(), time.process_time()
            explained = scorer.explain(list(range(P)), [None] * P)
            t_explain = time.perf_counter() - t
            scorer.run_groups(groups, list(range(len(groups))),
                              lambda g, res: per.update({(a, g): v for a, v in res.items() if a in groups[g].counted}))
            sync(dev)
            total = time.perf_counter() - t
            runs[kind].append(total)
            cpu[kind].append(time.process_time() - c)
            parts[kind].append({"explain_s": t_explain, "merge_s": scorer.seconds["merge"],
                                "evaluate_s": scorer.seconds["evaluate"]})
            scores[kind] = {a: sum(v for (b, _), v in per.items() if b == a) / N for a in range(P)}
            if on:
                ot = [e["off_target"] for e in explained.values() if e["off_target"] is not None]
                print(f"  off_target measured on {explained[0]['off_target_n']} questions each; mean "
                      f"{sum(ot) / max(1, len(ot)):.3f}", flush=True)
            print(f"  {kind} the control: {total:.1f} s, {cpu[kind][-1]:.0f} CPU s (explain {t_explain:.1f} s, "
                  f"merges {scorer.seconds['merge']:.1f} s, evaluations {scorer.seconds['evaluate']:.1f} s)",
                  flush=True)
    same = scores["without"] == scores["with"]
    best = {k: min(v) for k, v in runs.items()}
    ratio = best["with"] / best["without"]
    cpu_ratio = min(cpu["with"]) / min(cpu["without"])
    print(f"control: {best['with']:.1f} s with it vs {best['without']:.1f} s without = {ratio:.2f}x (fastest of "
          f"{args.repeat}; CPU time {cpu_ratio:.2f}x); the same S: {same}", flush=True)
    return {"control": {"off_target": args.off_target, "repeat": args.repeat, "runs_s": runs, "cpu_s": cpu,
                        "parts": parts, "ratio": ratio, "cpu_ratio": cpu_ratio, "same_S": same}}


def paper_run(args, dev, tok_dir: Path) -> None:
    """The paper's scale measured: 639 rank-64 experts on a random Llama-3.2-3B-shaped model, 4-shot questions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mergetool.examples import add_contexts
    from mergetool.model import load_tokenizer

    tok = load_tokenizer(resolve_base(str(tok_dir)))
    if args.small:
        P, M, N = 24, 3, 2
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    else:
        P, M, N = 639, 50, 5
        cfg = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                          num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                          max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    exs = country_questions(P)
    while len(exs) < P:  # 639 questions: the 482 of countries.jsonl, then copies under other ids
        extra = country_questions(P - len(exs))
        for e in extra:
            e.id = e.rec["id"] = f"{e.id}-{len(exs)}"
        exs += extra
    add_contexts(exs, list(exs), 4, seed=0)
    pool = experts(model, P)
    for u, e in zip(pool, exs):
        u.name = u.meta["name"] = e.id
    groups = plan(P, M, N, seed=0)
    timed = list(range(len(groups)))[:args.paper_groups]
    scorer = Scorer(model, tok, pool, exs, [[i] for i in range(P)], get("knots"), Params(), dev,
                    batch_tokens=args.batch_tokens, merge_chunk=args.merge_chunk)
    sync(dev)
    t = time.perf_counter()
    scorer.run_groups(groups, timed, lambda g, res: None)
    sync(dev)
    took = time.perf_counter() - t
    total = took * len(groups) / len(timed)  # every group costs the same: a merge of M+1, M+1 evaluations
    info = {"machine": machine(dev), "paper_scale": not args.small, "experts": P, "partners": M, "trials": N,
            "merges": len(groups), "merges_timed": len(timed), "evaluations": P * N, "seconds_timed": took,
            "seconds": total, "merge_s": scorer.seconds["merge"], "evaluate_s": scorer.seconds["evaluate"]}
    print(f"paper scale on {dev}: {len(timed)} of {len(groups)} merges in {took:.1f} s (merges "
          f"{scorer.seconds['merge']:.0f} s, evaluations {scorer.seconds['evaluate']:.0f} s): the {len(groups)} "
          f"merges and {P * N} 4-shot evaluations take {total / 60:.1f} min", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))


def paper_scale(model, per_merge: float, per_question: float, M: int, args) -> dict:
    """The measured costs carried by FLOP counts to 639 rank-64 experts on a Llama-3.2-3B shape (hidden
    3072, MLP 8192, 28 layers, vocabulary 128256), 8 options with 4 shots, M=50, N=5, on this device."""
    cfg = model.config
    h, f, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    H, F, LL, VV, KV = 3072, 8192, 28, 128256, 1024
    # KnOTS of M+1 rank-64 experts on up_proj [F, H]: QRs of B_c [F, 64(M+1)] and of each Aᵀ, the SVD of the
    # core: ~ F·R² + R³ with R = min(64(M+1), F)
    R_here, R_there = min(64 * (M + 1), f), min(64 * 51, F)
    merge_ratio = (F * R_there ** 2 + R_there ** 3) / (f * R_here ** 2 + R_here ** 3)
    # a question: 0-shot here (about 18 packed tokens), 5x the tokens with 4 shots; the upper half of the layers
    # runs per merge (the lower half once), plus the output layer at about 13 positions
    layer = lambda hd, ff, k: 2 * hd * hd + 2 * hd * k + 3 * hd * ff  # noqa: E731
    here = 18 * (L / 2) * layer(h, f, kv) + 13 * h * V
    there = 90 * (LL / 2) * layer(H, F, KV) + 13 * H * VV
    q_ratio = there / here
    merges, questions = 5 * math.ceil(639 / 51), 5 * 639
    est = merges * per_merge * merge_ratio + questions * per_question * q_ratio
    out = {"merges": merges, "evaluated_questions": questions, "merge_flop_ratio": merge_ratio,
           "question_flop_ratio": q_ratio, "estimated_s_on_this_device": est}
    print(f"paper scale (639 experts, Llama-3.2-3B shape, 4-shot, M=50, N=5) estimated on this device: "
          f"{merges} merges x {per_merge * merge_ratio:.1f} s + {questions} questions x {per_question * q_ratio:.2f} s "
          f"= {est / 60:.0f} min", flush=True)
    return out


if __name__ == "__main__":
    main()
