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
             batch_tokens: int = 8192, progress=None, adapters: RowAdapters | None = None,
             which: Sequence[int] = (-1,)) -> list[list[dict]]:
    """Results (dicts without id/task/adapter) of every example under every update in ``which`` (indices into
    ``adapters``; -1 is the base model): per update, in example order. Multiple-choice examples of all the
    updates are scored together, several updates per batch, their shared lower layers computed once;
    ``progress(n)`` is called as each batch of n examples is done."""
    which = list(which)
    out: list[list[dict | None]] = [[None] * len(examples) for _ in which]
    mc = [i for i, e in enumerate(examples) if e.kind == "mc"]
    if mc:
        items = scoring.encode_choices(tok, [(examples[i].context, examples[i].rec["choices"]) for i in mc])
        lls = scoring.choice_loglikelihoods(model, items, [(u, range(len(mc))) for u in which], adapters,
                                            batch_tokens, progress)
        for w in range(len(which)):
            for k, i in enumerate(mc):
                out[w][i] = mc_record(examples[i], lls[w][k], norm)
    gens = [i for i, e in enumerate(examples) if e.kind == "gen"]
    ppl = [i for i, e in enumerate(examples) if e.kind == "ppl"]
    pairs = ([([scoring.prefix_token(tok)], list(ids)) for ids in
              tok([examples[i].rec["text"] for i in ppl], add_special_tokens=False).input_ids] if ppl else [])
    for w, u in enumerate(which):
        if adapters is not None and (gens or ppl):
            adapters.use(u)
        if gens:
            texts = scoring.generate(model, tok, [examples[i].context for i in gens], max_new_tokens, progress=progress)
            for i, p in zip(gens, texts):
                refs = examples[i].rec.get("targets") or [examples[i].rec["target"]]
                out[w][i] = {"correct": int(any(normalise(p) == normalise(t) for t in refs)), "prediction": p,
                             "rouge_l": max(rouge_l(p, t) for t in refs)}
        if ppl:
            for i, (s, n) in zip(ppl, scoring.loglikelihoods(model, pairs, batch_tokens, progress)):
                out[w][i] = {"perplexity": math.exp(-s / max(n, 1)), "nll": -s, "tokens": n}
    return out


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
