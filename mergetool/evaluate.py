"""Evaluation: multiple choice by length-normalised log-probability, exact match and rouge-L of greedy
generations, perplexity; batched, sorted by length; an adapter is applied by patching only the modules
it touches, and restored afterwards.

Multiple choice follows lm-evaluation-harness's HF backend token for token: context and continuation
are encoded as ``enc(context + choice)`` split after ``enc(context)`` (trailing spaces of the context move
to the choice), without special tokens, and each choice's log-likelihood is the sum over its tokens.
``norm`` picks the score the prediction maximises: ``tokens`` (mean token log-prob, eq. 4 of "Will it
Merge?", the default), ``chars`` (sum / characters: lm-eval's ``acc_norm``) or ``none`` (sum: ``acc``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import re
import string
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from .errors import MergetoolError
from .updates import PREFIX, Update

NORMS = ("tokens", "chars", "none")
log = logging.getLogger("mergetool")


# ----------------------------------------------------------------------------- examples


@dataclass
class Example:
    id: str
    task: str
    kind: str  # "mc", "gen" or "ppl"
    rec: dict
    context: str = ""  # few-shot prefix + prompt (after the chat template, if any)


def check_examples(rows: list[dict], src: str) -> list[Example]:
    """Validate examples JSONL (DESIGN.md section 2); each error names its line."""
    seen: set[str] = set()
    out = []
    for i, r in enumerate(rows, 1):
        where = f"{src}:{i}"
        rid = r.get("id")
        if not isinstance(rid, str) or not rid:
            raise MergetoolError(where, "missing field 'id' (a non-empty string)", "give every example a unique id")
        if rid in seen:
            raise MergetoolError(where, f"duplicate id {rid!r}", "ids must be unique")
        seen.add(rid)
        task = r.get("task", "default")
        if not isinstance(task, str):
            raise MergetoolError(where, "'task' must be a string", "name the task")
        if "choices" in r:
            ch, ans = r.get("choices"), r.get("answer")
            if not isinstance(r.get("prompt"), str):
                raise MergetoolError(where, "missing field 'prompt'", "multiple choice needs prompt, choices, answer")
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise MergetoolError(where, "'choices' must be a list of at least 2 non-empty strings",
                                     "fix the choices")
            if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(ch):
                raise MergetoolError(where, f"'answer' must be an index into choices (0..{len(ch) - 1})",
                                     "fix the answer")
            kind = "mc"
        elif "target" in r or "targets" in r:
            t = r.get("targets", [r.get("target")])
            if not isinstance(r.get("prompt"), str) or not isinstance(t, list) or not all(isinstance(x, str) for x in t):
                raise MergetoolError(where, "generation needs 'prompt' and 'target' (or 'targets', a list)",
                                     "fix the record")
            kind = "gen"
        elif isinstance(r.get("text"), str):
            kind = "ppl"
        else:
            raise MergetoolError(where, "no 'choices', 'target(s)' or 'text' to evaluate",
                                 "see the examples format in the README")
        out.append(Example(rid, task, kind, r))
    return out


def add_contexts(examples: list[Example], pool: list[Example], shots: int, seed: int, tok=None, chat=False) -> None:
    """Few-shot prefix from ``pool`` (same task, never the example itself), drawn deterministically per
    example; optionally the chat template around the whole prompt."""
    by_task: dict[str, list[Example]] = {}
    for p in pool:
        if p.kind in ("mc", "gen"):
            by_task.setdefault(p.task, []).append(p)
    for e in examples:
        if e.kind == "ppl":
            continue
        prefix = ""
        if shots:
            cands = [p for p in by_task.get(e.task, []) if p.id != e.id]
            if len(cands) < shots:
                raise MergetoolError(e.id, f"only {len(cands)} demonstrations for task {e.task!r}, {shots} asked",
                                     "lower --shots or give a larger --shots-from pool")
            rng = random.Random(f"{seed}:{e.id}")
            for d in rng.sample(cands, shots):
                ans = d.rec["choices"][d.rec["answer"]] if d.kind == "mc" else d.rec.get("target", d.rec.get("targets", [""])[0])
                prefix += d.rec["prompt"] + ans + "\n\n"
        text = prefix + e.rec["prompt"]
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        e.context = text


# ----------------------------------------------------------------------------- models


def load_model(base, device: torch.device, dtype: torch.dtype | None = None):
    """A base model and tokenizer on ``device`` (bf16 on CUDA, fp32 on CPU unless ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        tok = AutoTokenizer.from_pretrained(str(base.dir), trust_remote_code=False, **base.load_kwargs())
        model = AutoModelForCausalLM.from_pretrained(str(base.dir), dtype=dtype, trust_remote_code=False,
                                                     **base.load_kwargs()).to(device).eval()
    except OSError as e:
        raise MergetoolError(base.name, f"cannot load the model ({str(e)[:150]})", "pass a model directory") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


@contextlib.contextmanager
def applied(model, update: Update | None):
    """Patch W += ΔW for the modules the update touches (fp32 math), and restore them afterwards."""
    if update is None:
        yield model
        return
    params = dict(model.named_parameters())
    saved = {}
    try:
        with torch.no_grad():
            for mod, m in update.modules.items():
                name = mod[len(PREFIX):] if mod.startswith(PREFIX) else mod
                p = params.get(name + ".weight", params.get(name))
                if p is None:
                    raise MergetoolError(update.name, f"module {name} is not in the base model",
                                         "use an adapter trained on this base")
                d = m.delta(p.device)
                if tuple(d.shape) != tuple(p.shape):
                    raise MergetoolError(update.name, f"module {name}: update {tuple(d.shape)} vs weight "
                                         f"{tuple(p.shape)}", "use an adapter trained on this base")
                saved[name] = p.detach().clone()
                p.copy_((p.float() + d).to(p.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                params.get(name + ".weight", params.get(name)).copy_(w)


# ----------------------------------------------------------------------------- scoring


def _split_space(context: str) -> tuple[str, str]:
    """lm-eval moves the trailing whitespace of the context to the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:]) if n else (context, "")


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces move to the continuation; enc(ctx + cont) split
    after enc(ctx); no special tokens."""
    ctx, conts = encode_choices(tok, [(context, [continuation])])[0]
    return ctx, conts[0]


def encode_choices(tok, items: list[tuple[str, list[str]]]) -> list[tuple[list[int], list[list[int]]]]:
    """``encode_pair`` for every choice of every (context, choices) item, in two batched tokenizer calls:
    the context once per item (its tokens are the same for every choice, as in lm-eval, which conditions
    each choice on enc(context)). An empty context is conditioned on ``prefix_token``, as lm-eval does."""
    heads, wholes = [], []
    for context, choices in items:
        head, tail = _split_space(context)
        heads.append(head)
        wholes += [head + tail + c for c in choices]
    enc_h = tok(heads, add_special_tokens=False).input_ids if heads else []
    enc_w = tok(wholes, add_special_tokens=False).input_ids if wholes else []
    out, k = [], 0
    for (_, choices), ctx in zip(items, enc_h):
        whole = enc_w[k:k + len(choices)]
        k += len(choices)
        if ctx:
            out.append((list(ctx), [w[len(ctx):] for w in whole]))
        else:
            out.append(([prefix_token(tok)], [list(w) for w in whole]))
    return out


def prefix_token(tok) -> int:
    """The token an empty context is conditioned on: BOS when the tokenizer has one, else EOS (lm-eval's
    ``prefix_token_id``)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


# An item to score: the context's tokens and each choice's continuation tokens.
Item = tuple[list[int], list[list[int]]]


def _model_max_len(model) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _truncate(items: list[Item], max_len: int | None) -> list[Item]:
    """Keep each sequence within the model's length by dropping context tokens from the left, as lm-eval
    does (it keeps the last max_length tokens of context + continuation). The choices share one context, so
    it is cut for the longest choice (lm-eval would keep a few more context tokens for shorter ones)."""
    if not max_len:
        return items
    out = []
    for ctx, conts in items:
        longest = max((len(c) for c in conts), default=0)
        keep = max(1, max_len + 1 - longest)
        out.append((ctx[-keep:] if len(ctx) > keep else ctx, conts))
    return out


ROW = 256  # tokens per packed row (at least the longest item): attention costs ∝ row length, padding ∝ 1/row


def _packed_len(item: Item) -> int:
    ctx, conts = item
    return len(ctx) + sum(max(len(x) - 1, 0) for x in conts)


def _rows(lens: list[int], width: int, one_per_row: bool) -> list[list[int]]:
    """Items (longest first) laid into rows of ``width`` tokens: each row takes the longest items left, then
    fills its end with the shortest; so little is padding."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    if one_per_row:
        return [[i] for i in order]
    rows, lo, hi = [], 0, len(order) - 1
    while lo <= hi:
        row, room = [], width
        while lo <= hi and lens[order[lo]] <= room:
            row.append(order[lo])
            room -= lens[order[lo]]
            lo += 1
        while lo <= hi and lens[order[hi]] <= room:
            row.append(order[hi])
            room -= lens[order[hi]]
            hi -= 1
        rows.append(row)
    return rows


@torch.no_grad()
def choice_loglikelihoods(model, items: list[Item], batch_tokens: int = 8192, progress=None,
                          before=None) -> list[list[tuple[float, int]]]:
    """Summed log p(choice | context) and token count of every choice of every item.

    Each item is packed once: its context, then every choice's tokens (but the last) side by side, each
    choice at the positions it would have right after the context and attending only to the context and to
    itself (a 4D attention mask and explicit position ids); so the shared prompt is encoded once and all
    choices are scored in one pass. Several items share a row of ``ROW`` tokens (each sees only itself), so
    batches carry almost no padding; rows are batched ``batch_tokens`` at a time. ``before(idx)``, for
    per-row adapters, is called with the item indices of each batch before its forward pass, and then every
    row holds one item. Models whose attention does not honour a custom mask and positions (checked once per
    model, ``packing_works``) take the plain route, one sequence per choice."""
    items = _truncate(items, _model_max_len(model))
    lens = [_packed_len(x) for x in items]
    window = getattr(model.config, "sliding_window", None)  # a custom mask bypasses the window: stay within it
    if (isinstance(window, int) and lens and max(lens) > window) or not packing_works(model, items, before):
        return _plain_choice_loglikelihoods(model, items, batch_tokens, progress, before)
    dev = next(model.parameters()).device
    width = max([ROW] + lens)
    rows = _rows(lens, width, before is not None)
    out: list[list[tuple[float, int]]] = [[] for _ in items]
    i = 0
    while i < len(rows):
        L = max(sum(lens[j] for j in rows[i]), 1)
        batch = rows[i:i + max(1, batch_tokens // L)]
        if before is not None:
            before([r[0] for r in batch])
        sums = _packed_sums(model, [[items[j] for j in r] for r in batch], dev)
        for r, row in enumerate(batch):
            for k, j in enumerate(row):
                out[j] = [(x, len(c)) for x, c in zip(sums[r][k], items[j][1])]
        if progress:
            progress(sum(len(r) for r in batch))
        i += len(batch)
    return out


def _pack(rows: list[list[Item]]):
    """Tensors of a batch of rows of packed items: ids, position ids, item and segment of every token (item
    -1: padding; segment 0: context, j+1: choice j), and for every choice token the (row, position) that
    predicts it, its id and its choice's index (``owner``) in the batch."""
    B = len(rows)
    L = -(-max(sum(_packed_len(x) for x in row) for row in rows) // 8) * 8  # aligned: fused attention kernels
    flat_r, flat_c, flat_id, flat_pos, flat_item, flat_seg = [], [], [], [], [], []
    rr, pos, tgt, owner = [], [], [], []
    n_choices = 0
    for r, row in enumerate(rows):
        at = 0  # where this item starts in the row
        for k, (ctx, conts) in enumerate(row):
            C = len(ctx)
            seq, seg, ps = list(ctx), [0] * C, list(range(C))
            for j, cont in enumerate(conts):
                start = len(seq)
                body = cont[:-1]
                seq += body
                seg += [j + 1] * len(body)
                ps += range(C, C + len(body))
                for t, token in enumerate(cont):  # token t is predicted at the context's end, then at its own
                    rr.append(r)
                    pos.append(at + (C - 1 if t == 0 else start + t - 1))
                    tgt.append(token)
                    owner.append(n_choices + j)
            n_choices += len(conts)
            flat_r += [r] * len(seq)
            flat_c += range(at, at + len(seq))
            flat_id += seq
            flat_pos += ps
            flat_item += [k] * len(seq)
            flat_seg += seg
            at += len(seq)
    fr, fc = torch.tensor(flat_r, dtype=torch.long), torch.tensor(flat_c, dtype=torch.long)
    ids = torch.zeros((B, L), dtype=torch.long)
    ids[fr, fc] = torch.tensor(flat_id, dtype=torch.long)
    position = torch.zeros((B, L), dtype=torch.long)
    position[fr, fc] = torch.tensor(flat_pos, dtype=torch.long)
    item = torch.full((B, L), -1, dtype=torch.long)
    item[fr, fc] = torch.tensor(flat_item, dtype=torch.long)
    seg = torch.zeros((B, L), dtype=torch.long)
    seg[fr, fc] = torch.tensor(flat_seg, dtype=torch.long)
    return ids, position, item, seg, rr, pos, tgt, owner, n_choices


def _mask4d(item: torch.Tensor, seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: a query sees the earlier keys of its own item that are in the context or
    in its own segment; padding sees only itself, so no row of the mask is empty."""
    L = seg.shape[1]
    causal = torch.ones((L, L), dtype=torch.bool, device=seg.device).tril_()
    ok = causal & (item[:, None, :] == item[:, :, None]) & (item[:, None, :] >= 0)
    ok &= (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    ok |= torch.eye(L, dtype=torch.bool, device=seg.device)
    return torch.zeros(ok.shape, dtype=dtype, device=seg.device).masked_fill_(~ok, torch.finfo(dtype).min)[:, None]


def _packed_sums(model, rows: list[list[Item]], dev) -> list[list[list[float]]]:
    """For each row, for each of its items, each choice's summed log-likelihood."""
    dtype = next(model.parameters()).dtype
    ids, position, item, seg, rr, pos, tgt, owner, n = _pack(rows)
    mask = _mask4d(item.to(dev), seg.to(dev), dtype if dtype.is_floating_point else torch.float32)
    lp = _token_logprobs(model, torch.tensor(rr, device=dev), torch.tensor(pos, device=dev),
                         torch.tensor(tgt, device=dev), input_ids=ids.to(dev), attention_mask=mask,
                         position_ids=position.to(dev))
    sums = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, torch.tensor(owner, device=dev),
                                                                     lp.double()).tolist()
    out, k = [], 0
    for row in rows:
        out.append([])
        for _, conts in row:
            out[-1].append(sums[k:k + len(conts)])
            k += len(conts)
    return out


def packing_works(model, items: list[Item], before=None) -> bool:
    """Whether this model scores packed choices as it scores them one by one (its attention honours a custom
    4D mask and position ids). Checked once per model on a probe built from the first item with a
    multi-token choice: packed in a row after another item, with a long junk choice before a real one,
    which would change the real one's score a lot if the mask or the positions were ignored (in fp32 the
    two routes agree to rounding, 1e-4 per token; in bf16 to 5e-2). ``before`` sets per-row adapters for
    the probe's one row. The answer is cached on the model."""
    cached = getattr(model, "_mergetool_packing", None)
    if cached is not None:
        return cached
    at = next((i for i, (_, cs) in enumerate(items) if any(len(x) > 1 for x in cs)), None)
    if at is None:  # single-token choices: packing adds no token, nothing to check yet
        return True
    ctx, conts = items[at]
    real = max(conts, key=len)
    junk = (ctx * (64 // max(len(ctx), 1) + 1))[:64] + real
    dev = next(model.parameters()).device
    ok = False
    try:  # a row: another item, then this context with a junk choice before the real one
        if before is not None:
            before([at])
        packed = _packed_sums(model, [[(junk, [real]), (ctx, [junk, real])]], dev)[0][1][1]
        plain = _plain_choice_loglikelihoods(model, [(ctx, [real])], 8192, None,
                                             (lambda idx: before([at])) if before is not None else None)[0][0][0]
        dtype = next(model.parameters()).dtype
        tol = (1e-4 if dtype in (torch.float32, torch.float64) else 5e-2) * len(real)  # fp32: packed is exact
        ok = abs(packed - plain) <= tol
        if not ok:
            log.info("this model's attention ignores a custom mask or positions: scoring one sequence per choice")
    except Exception as e:  # noqa: BLE001 - an architecture that rejects the mask or positions takes the plain route
        log.info("packed scoring unavailable (%s): scoring one sequence per choice", str(e)[:200])
        ok = False
    model._mergetool_packing = ok
    return ok


def _plain_choice_loglikelihoods(model, items: list[Item], batch_tokens, progress, before):
    pairs, owner = [], []
    for i, (ctx, conts) in enumerate(items):
        pairs += [(ctx, c) for c in conts]
        owner += [i] * len(conts)
    hook = (lambda idx: before([owner[j] for j in idx])) if before is not None else None
    lls = loglikelihoods(model, pairs, batch_tokens, None, hook)
    out, k = [], 0
    for ctx, conts in items:
        out.append(lls[k:k + len(conts)])
        k += len(conts)
        if progress:
            progress(1)
    return out


@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], batch_tokens: int = 8192,
                   progress=None, before=None) -> list[tuple[float, int]]:
    """Sum of log p(continuation | context) and its token count, for every pair, one sequence per pair;
    batched by length."""
    dev = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    i = 0
    while i < len(order):
        longest = len(pairs[order[i]][0]) + len(pairs[order[i]][1]) - 1
        bs = max(1, batch_tokens // max(longest, 1))
        idx = order[i:i + bs]
        seqs = [(pairs[j][0] + pairs[j][1])[:-1] for j in idx]
        L = max(len(s) for s in seqs)
        flat_r = [r for r, s in enumerate(seqs) for _ in s]
        flat_c = [c for s in seqs for c in range(len(s))]
        ids = torch.zeros((len(seqs), L), dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        ids[flat_r, flat_c] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        mask[flat_r, flat_c] = 1
        if before is not None:
            before(idx)
        sums = continuation_sums(model, ids.to(dev), mask.to(dev), [pairs[j] for j in idx])
        for r, j in enumerate(idx):
            out[j] = (sums[r], len(pairs[j][1]))
        if progress:
            progress(len(idx))
        i += bs
    return out


def continuation_sums(model, ids, mask, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Row r of ``ids`` holds pairs[r]'s context + continuation (minus its last token): the summed
    log-probability of each continuation, in one pass and one device sync."""
    dev = ids.device
    rows, pos, tgt = [], [], []
    for r, (ctx, cont) in enumerate(pairs):
        rows += [r] * len(cont)
        pos += range(len(ctx) - 1, len(ctx) - 1 + len(cont))
        tgt += cont
    rows_t = torch.tensor(rows, device=dev)
    lp = _token_logprobs(model, rows_t, torch.tensor(pos, device=dev), torch.tensor(tgt, device=dev),
                         input_ids=ids, attention_mask=mask)
    return torch.zeros(len(pairs), dtype=torch.float64, device=dev).index_add_(0, rows_t, lp.double()).tolist()


def logits_at(model, rows, pos, **inputs) -> torch.Tensor:
    """The logits at the given (row, position)s only: the decoder's hidden states are gathered first and the
    output layer runs on those alone; models whose logits are post-processed (soft-capping) take the route
    through the full logits."""
    decoder = getattr(model, "get_decoder", lambda: None)()
    head = model.get_output_embeddings()
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        return model(**inputs).logits[rows, pos]
    return head(decoder(**inputs).last_hidden_state[rows, pos])


def _token_logprobs(model, rows, pos, tgt, **inputs) -> torch.Tensor:
    """log p(tgt | prefix) at the given (row, position)s (fp32 log-softmax of ``logits_at``)."""
    logits = logits_at(model, rows, pos, **inputs)
    return torch.log_softmax(logits.float(), -1).gather(1, tgt.view(-1, 1)).view(-1)


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


@torch.no_grad()
def generate(model, tok, contexts: list[str], max_new_tokens: int, batch_size: int = 16, progress=None) -> list[str]:
    """Greedy continuations, cut at the first newline or EOS."""
    dev = next(model.parameters()).device
    tok.padding_side = "left"
    out: list[str] = [""] * len(contexts)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([contexts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        for r, i in enumerate(idx):
            text = tok.decode(gen[r, enc.input_ids.shape[1]:], skip_special_tokens=True)
            out[i] = text.split("\n")[0]
        if progress:
            progress(len(idx))
    return out


def evaluate(model, tok, examples: list[Example], norm: str = "tokens", max_new_tokens: int = 32,
             batch_tokens: int = 8192, progress=None) -> Iterator[dict]:
    """One result dict per example (without id/task/adapter), in input order; ``progress(n)`` is called as
    each batch of n examples is done."""
    mc = [e for e in examples if e.kind == "mc"]
    items = encode_choices(tok, [(e.context, e.rec["choices"]) for e in mc])
    lls = dict(zip((e.id for e in mc), choice_loglikelihoods(model, items, batch_tokens, progress))) if mc else {}
    gens = [e for e in examples if e.kind == "gen"]
    texts = dict(zip([e.id for e in gens], generate(model, tok, [e.context for e in gens], max_new_tokens,
                                                    progress=progress))) if gens else {}
    ppl = [e for e in examples if e.kind == "ppl"]
    nll = {}
    if ppl:
        ps = [([prefix_token(tok)], list(ids))
              for ids in tok([e.rec["text"] for e in ppl], add_special_tokens=False).input_ids]
        for e, (s, n) in zip(ppl, loglikelihoods(model, ps, batch_tokens, progress)):
            nll[e.id] = (-s, n)
    for e in examples:
        if e.kind == "mc":
            yield mc_record(e, lls[e.id], norm)
        elif e.kind == "gen":
            refs = e.rec.get("targets") or [e.rec["target"]]
            p = texts[e.id]
            yield {"correct": int(any(normalise(p) == normalise(t) for t in refs)), "prediction": p,
                   "rouge_l": max(rouge_l(p, t) for t in refs)}
        else:
            s, n = nll[e.id]
            yield {"perplexity": math.exp(s / max(n, 1)), "nll": s, "tokens": n}


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
