"""Evaluation: examples scored under the base model and any number of updates, turned into records and
summaries.

Multiple choice: the log-likelihood of each choice (``scoring``), then ``norm`` picks what the prediction
maximises: ``tokens`` (mean token log-prob, eq. 4 of "Will it Merge?", the default), ``chars`` (sum /
characters: lm-eval's ``acc_norm``) or ``none`` (sum: ``acc``). A record carries the normalised scores
(``logprobs``), ``p_correct`` and ``p_max`` (the scores' softmax over the choices), the ``rank`` of the
right answer (0 = best) and ``gap`` = p_max − p_correct. Generation: exact match of the normalised greedy
answer, and rouge-L. Passages: perplexity.
"""

from __future__ import annotations

import math
import re
import string
from typing import Iterable, Sequence

from . import scoring
from .adapters import RowAdapters
from .examples import Example

NORMS = ("tokens", "chars", "none")


def choose(lls: list[tuple[float, int]], choices: list[str], norm: str) -> list[float]:
    if norm == "tokens":
        return [s / max(n, 1) for s, n in lls]
    if norm == "chars":
        return [s / max(len(c), 1) for (s, _), c in zip(lls, choices)]
    return [s for s, _ in lls]


def mc_record(e: Example, lls: list[tuple[float, int]], norm: str) -> dict:
    scores = choose(lls, e.rec["choices"], norm)
    top = max(scores)
    ex = [math.exp(x - top) for x in scores]  # softmax renormalised over the choices
    z = sum(ex)
    probs = [x / z for x in ex]
    pred = scores.index(top)
    a = e.rec["answer"]
    rank = sum(1 for i, x in enumerate(scores) if x > scores[a] or (x == scores[a] and i < a))
    return {"correct": int(pred == a), "prediction": pred, "logprobs": scores,
            "p_correct": probs[a], "p_max": max(probs), "rank": rank, "gap": max(probs) - probs[a]}


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(s: str) -> str:
    return " ".join(_PUNCT.sub(" ", s.lower()).split())


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 over whitespace tokens of the normalised strings (longest common subsequence)."""
    a, b = normalise(pred).split(), normalise(ref).split()
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def evaluate(model, tok, examples: list[Example], norm: str = "tokens", max_new_tokens: int = 32,
             batch_tokens: int | None = None, progress=None, adapters: RowAdapters | None = None,
             jobs: Sequence[tuple[int, Sequence[int]]] | None = None, cache: dict | None = None) -> list[list[dict]]:
    """Results (dicts without id/task/adapter) of examples under updates: each job is (update index into
    ``adapters``, -1 for the base model; indices of the examples it evaluates), default the base on every
    example. Returns per job, in the job's example order. Multiple-choice examples of all jobs are scored
    together, several updates per batch, the lower layers they share computed once per example (and kept in
    ``cache`` across calls on the same ``examples``); ``progress(n)`` is called as batches of n are done."""
    jobs = [(u, list(idx)) for u, idx in (jobs if jobs is not None else [(-1, range(len(examples)))])]
    out: list[list[dict | None]] = [[None] * len(idx) for _, idx in jobs]
    mc = [i for i, e in enumerate(examples) if e.kind == "mc"]
    at = {i: k for k, i in enumerate(mc)}
    mc_jobs = [(u, [at[i] for i in idx if i in at]) for u, idx in jobs]
    if any(idx for _, idx in mc_jobs):
        items = scoring.encode_choices(tok, [(examples[i].context, examples[i].rec["choices"]) for i in mc])
        lls = scoring.choice_loglikelihoods(model, items, mc_jobs, adapters, batch_tokens, progress, cache=cache)
        for j, (_, idx) in enumerate(jobs):
            got = iter(lls[j])
            for k, i in enumerate(idx):
                if i in at:
                    out[j][k] = mc_record(examples[i], next(got), norm)
    for j, (u, idx) in enumerate(jobs):
        gens = [k for k, i in enumerate(idx) if examples[i].kind == "gen"]
        ppl = [k for k, i in enumerate(idx) if examples[i].kind == "ppl"]
        if adapters is not None and (gens or ppl):
            adapters.use(u)
        if gens:
            texts = scoring.generate(model, tok, [examples[idx[k]].context for k in gens], max_new_tokens,
                                     progress=progress)
            for k, p in zip(gens, texts):
                rec = examples[idx[k]].rec
                refs = rec.get("targets") or [rec["target"]]
                out[j][k] = {"correct": int(any(normalise(p) == normalise(t) for t in refs)), "prediction": p,
                             "rouge_l": max(rouge_l(p, t) for t in refs)}
        if ppl:
            pairs = passages(tok, [examples[idx[k]].rec["text"] for k in ppl])
            for k, (s, n) in zip(ppl, scoring.loglikelihoods(model, pairs, batch_tokens, progress)):
                out[j][k] = {"perplexity": math.exp(-s / max(n, 1)), "nll": -s, "tokens": n}
    return out


def passages(tok, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that score a passage's every token: conditioned on the prefix token."""
    ids = tok(texts, add_special_tokens=False).input_ids if texts else []
    return [([scoring.prefix_token(tok)], list(x)) for x in ids]


def summarise(records: Iterable[dict]) -> list[dict]:
    """Per (task, adapter): n, accuracy, and rouge_l / perplexity where present."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r.get("adapter")), []).append(r)
    out = []
    for (task, adapter), rs in groups.items():
        s = {"task": task, "adapter": adapter, "n": len(rs)}
        acc = [r["correct"] for r in rs if "correct" in r]
        if acc:
            s["accuracy"] = sum(acc) / len(acc)
        rl = [r["rouge_l"] for r in rs if "rouge_l" in r]
        if rl:
            s["rouge_l"] = sum(rl) / len(rl)
        nl = [(r["nll"], r["tokens"]) for r in rs if "nll" in r]
        if nl:
            s["perplexity"] = math.exp(sum(a for a, _ in nl) / max(1, sum(b for _, b in nl)))
        out.append(s)
    return out
