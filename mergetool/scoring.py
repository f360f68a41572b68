"""The log-likelihood engine: log-probabilities of multiple-choice continuations and of passages, greedy
generation, and last-layer hidden states, batched, for one model under any number of updates.

Multiple choice follows lm-evaluation-harness's HF backend token for token: context and continuation
are encoded as ``enc(context + choice)`` split after ``enc(context)`` (trailing spaces of the context move
to the choice), without special tokens, and each choice's log-likelihood is the sum over its tokens.

Packing: each item (a context and its choices) is laid out once, its context followed by every choice's
tokens side by side, each choice at the positions it would have right after the context and attending
only to the context and to itself (a 4D attention mask and explicit position ids); several items share a
row of ``ROW`` tokens, each seeing only itself. So the shared prompt is encoded once, all choices are
scored in one pass, and batches carry almost no padding. The output layer runs only at the positions
that predict a choice token (once per position: the context's last position predicts every choice's first
token). Whether a model's attention honours the mask and positions is checked once per model on a probe
(``packing_works``); models that do not take the plain route, one sequence per choice.

Many updates: a *job* is one update (an index into :class:`~mergetool.adapters.RowAdapters`, -1 for the
base) scored on some items. Rows hold one job's items, so a batch mixes jobs row by row. When the updates
touch only decoder layers ≥ L, the layers below L run once per item for all jobs (``adapters.Prefix``):
an item's hidden states there do not depend on its row, since it attends only to itself at explicit
positions, so they are computed once and laid into every row that holds the item. Rows that several jobs
hold are batched next to each other, and in layer L what comes before the adapted modules (and their
frozen product W x) runs once per distinct row of the batch (``Prefix.sharing``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .adapters import Prefix, RowAdapters, StandIn, bare, decoder_layers, first_layer, gathered

log = logging.getLogger("mergetool")

# An item to score: the context's tokens and each choice's continuation tokens.
Item = tuple[list[int], list[list[int]]]
# A job: (update index, -1 for the base; indices of the items it scores).
Job = tuple[int, Sequence[int]]

ROW = 256  # tokens per packed row (at least the longest item): attention costs ∝ row length, padding ∝ 1/row

# ----------------------------------------------------------------------------- tokenisation


def _split_space(context: str) -> tuple[str, str]:
    """lm-eval moves the trailing whitespace of the context to the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:]) if n else (context, "")


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: trailing spaces move to the continuation; enc(ctx + cont) split
    after enc(ctx); no special tokens."""
    ctx, conts = encode_choices(tok, [(context, [continuation])])[0]
    return ctx, conts[0]


def encode_choices(tok, items: list[tuple[str, list[str]]]) -> list[Item]:
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


def model_max_len(model) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(n, int):
        n = getattr(model.config, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def truncate(items: list[Item], max_len: int | None) -> list[Item]:
    """Keep each sequence within the model's length by dropping context tokens from the left, as lm-eval
    does (it keeps the last max_length tokens of context + continuation). The choices share one context, so
    it is cut for the longest choice (lm-eval would keep a few more context tokens for shorter ones)."""
    if not max_len:
        return items
    out = []
    for ctx, conts in items:
        longest = max((len(c) for c in conts), default=0)
        keep = max(1, max_len + 1 - longest)
        if longest > max_len:  # the choice alone is too long: keep its last tokens after one context token
            conts = [c[-max_len:] for c in conts]
        out.append((ctx[-keep:] if len(ctx) > keep else ctx, conts))
    return out


# ----------------------------------------------------------------------------- packing


def _packed_len(item: Item) -> int:
    ctx, conts = item
    return len(ctx) + sum(max(len(x) - 1, 0) for x in conts)


def _rows(lens: list[int], width: int) -> list[list[int]]:
    """Items (longest first) laid into rows of ``width`` tokens: each row takes the longest items left, then
    fills its end with the shortest; so little is padding."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
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


@dataclass
class Packed:
    """A batch of rows of packed items: ids, position ids, and the 4D mask's inputs (item of every token,
    -1 for padding; segment 0 for a context, j+1 for choice j); where each token lies (flat_r, flat_c, in
    row then item order); for every choice token the (row, position) that predicts it, its id and its
    choice's index in the batch (``owner``); and each item's number of choices."""

    ids: torch.Tensor
    position: torch.Tensor
    item: torch.Tensor
    seg: torch.Tensor
    flat_r: torch.Tensor
    flat_c: torch.Tensor
    rr: list[int]
    pos: list[int]
    tgt: list[int]
    owner: list[int]
    n_choices: list[list[int]]

    def inputs(self, dev, dtype) -> dict:
        return {"input_ids": self.ids.to(dev), "attention_mask": mask4d(self.item.to(dev), self.seg.to(dev), dtype),
                "position_ids": self.position.to(dev)}


def pack(rows: list[list[Item]]) -> Packed:
    B = len(rows)
    L = -(-max(max(sum(_packed_len(x) for x in row) for row in rows), 1) // 8) * 8  # aligned for fused kernels
    flat_r, flat_c, flat_id, flat_pos, flat_item, flat_seg = [], [], [], [], [], []
    rr, pos, tgt, owner, n_choices = [], [], [], [], []
    n = 0
    for r, row in enumerate(rows):
        at = 0  # where this item starts in the row
        n_choices.append([])
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
                    owner.append(n + j)
            n += len(conts)
            n_choices[-1].append(len(conts))
            flat_r += [r] * len(seq)
            flat_c += range(at, at + len(seq))
            flat_id += seq
            flat_pos += ps
            flat_item += [k] * len(seq)
            flat_seg += seg
            at += len(seq)
    fr, fc = torch.tensor(flat_r, dtype=torch.long), torch.tensor(flat_c, dtype=torch.long)

    def grid(values, fill):
        g = torch.full((B, L), fill, dtype=torch.long)
        g[fr, fc] = torch.tensor(values, dtype=torch.long)
        return g

    return Packed(grid(flat_id, 0), grid(flat_pos, 0), grid(flat_item, -1), grid(flat_seg, 0), fr, fc,
                  rr, pos, tgt, owner, n_choices)


def mask4d(item: torch.Tensor, seg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: a query sees the earlier keys of its own item that are in the context or
    in its own segment; padding sees only itself, so no row of the mask is empty."""
    dtype = dtype if dtype.is_floating_point else torch.float32
    L = seg.shape[1]
    causal = torch.ones((L, L), dtype=torch.bool, device=seg.device).tril_()
    ok = causal & (item[:, None, :] == item[:, :, None]) & (item[:, None, :] >= 0)
    ok &= (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    ok |= torch.eye(L, dtype=torch.bool, device=seg.device)
    return torch.zeros(ok.shape, dtype=dtype, device=seg.device).masked_fill_(~ok, torch.finfo(dtype).min)[:, None]


# ----------------------------------------------------------------------------- the forward pass

# Tokens per scoring batch when none is given: on a GPU as many as keep it busy; on a CPU fewer, so that a
# layer's activations ([tokens, intermediate] fp32, 12 MiB for SmolLM2 at 2048) stay in the cache: measured
# on 2 cores, 2048 runs SmolLM2-135M 14-19% faster than 8192 (BENCHMARKS.md, issue 7).
BATCH_TOKENS = {"cuda": 8192, "cpu": 2048}


def batch_tokens_for(device, batch_tokens: int | None = None) -> int:
    """``batch_tokens`` if given, else the default for the device's kind (``BATCH_TOKENS``)."""
    if batch_tokens:
        return batch_tokens
    return BATCH_TOKENS.get(torch.device(device).type, BATCH_TOKENS["cuda"])


# ----------------------------------------------------------------------------- the output head


class _Given:
    """What the decoder's stand-in returns: the given hidden states as ``last_hidden_state`` (and as ``[0]``);
    every other output a decoder may have (caches, attentions, router logits) is None."""

    def __init__(self, h: torch.Tensor):
        self.last_hidden_state = h

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, i):
        if i in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise IndexError(i)


def _decoder_slot(model) -> tuple[torch.nn.Module, str] | None:
    """(parent, attribute) under which ``model`` holds its decoder (``model.get_decoder()``), or None; found
    once per model."""
    if "_mergetool_slot" not in model.__dict__:
        decoder = getattr(model, "get_decoder", lambda: None)()
        found = None
        if decoder is not None and decoder is not model:
            name = next((n for n, m in model.named_modules() if m is decoder), None)
            if name is not None:
                parent, _, attr = name.rpartition(".")
                found = (model.get_submodule(parent) if parent else model), attr
        model.__dict__["_mergetool_slot"] = found
    return model.__dict__["_mergetool_slot"]


def head(model, h: torch.Tensor) -> torch.Tensor:
    """The model's own output head on hidden states ``h`` [n, hidden] (the decoder's last, after its final
    norm): the model's ``forward`` runs with its decoder replaced by a stand-in that returns ``h`` as n
    sequences of one token, so the logits [n, vocabulary] are computed as the model computes them: its output
    projection and whatever it does before or after it (Gemma-2's soft-capping, Granite's ``logits_scaling``,
    Cohere's ``logit_scale``, MiniCPM3's scaled hidden states, ...). Valid where ``own_head(model)``."""
    parent, attr = _decoder_slot(model)
    real = getattr(parent, attr)
    setattr(parent, attr, StandIn(real, lambda *a, **k: _Given(h[:, None])))
    try:
        out = model(input_ids=torch.zeros((h.shape[0], 1), dtype=torch.long, device=h.device))
    finally:
        setattr(parent, attr, real)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, 0]


def own_head(model) -> bool:
    """Whether ``head`` gives this model's logits: checked once per model (the answer is cached on it) on a
    probe of 8 tokens, the model's own ``model(...).logits`` at four positions in another order against
    ``head`` on the decoder's hidden states gathered there (fp32: to rounding, 1e-4 relative; bf16 and fp16:
    2e-2). A model whose forward computes its logits from anything but the decoder's last hidden states,
    position by position, or that rejects the stand-in (an error from its forward) takes the full route:
    ``model(**inputs).logits``, then the positions. Decided before any row's update is chosen (the probe
    runs with the adapters' hooks off, ``adapters.bare``) and outside a frozen prefix's feeding."""
    cached = getattr(model, "_mergetool_head", None)
    if cached is not None:
        return cached
    ok = False
    if _decoder_slot(model) is not None:
        dev = next(model.parameters()).device
        ids = ((torch.arange(8, device=dev) * 7 + 3) % model.get_input_embeddings().weight.shape[0])[None]
        mask = torch.ones_like(ids)
        at = torch.tensor([5, 0, 7, 2], device=dev)
        try:
            with torch.no_grad(), bare(model):
                full = model(input_ids=ids, attention_mask=mask).logits[0, at].float()
                h = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[0, at]
                fast = head(model, h).float()
            dtype = next(model.parameters()).dtype
            tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
            ok = fast.shape == full.shape and bool(((fast - full).abs().max() <= tol * full.abs().max().clamp_min(1)))
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, NotImplementedError, RuntimeError) as e:
            if out_of_memory(e):
                raise
            log.info("the output head cannot run apart (%s): computing full logits", str(e)[:200])
        if not ok:
            log.info("this model's logits are not its head on the last hidden states: computing full logits")
    model._mergetool_head = ok
    return ok


def _vocab(model) -> int:
    """The width of the model's logits: its output embedding's rows (its input embedding's where the head holds
    no plain output embedding)."""
    emb = model.get_output_embeddings()
    return int((emb if emb is not None else model.get_input_embeddings()).weight.shape[0])


def logits_at(model, rows, pos, **inputs) -> torch.Tensor:
    """The logits at the given (row, position)s only: the decoder's hidden states are gathered first and the
    model's own head (``head``) runs on those alone; a model whose head cannot run apart (``own_head``) takes
    the route through the full logits."""
    if not own_head(model):
        return model(**inputs).logits[rows, pos]
    h = model.get_decoder()(**inputs).last_hidden_state[rows, pos]
    with gathered(model, rows):
        return head(model, h)


# scored positions per output-layer call in ``token_logprobs``: about 64 MiB of fp32 logits at a time, so a
# batch of thousands of positions never holds a [positions, vocabulary] tensor (memory-bound on a CPU)
HEAD_FLOATS = 1 << 24


def token_logprobs(model, rows, pos, tgt, **inputs) -> torch.Tensor:
    """log p(tgt | prefix) at the given (row, position)s, in fp32: the model's head (``head``) runs once per
    distinct position (a context's last position predicts every choice's first token), on chunks of
    positions, and each chunk's logits give ``logit[tgt] - logsumexp(logits)`` without a full log-softmax."""
    width = inputs["input_ids"].shape[1]
    key, inverse = torch.unique(rows * width + pos, return_inverse=True)
    if not own_head(model):
        logits = logits_at(model, key // width, key % width, **inputs)
        return torch.log_softmax(logits.float(), -1)[inverse, tgt]
    krows = key // width
    h = model.get_decoder()(**inputs).last_hidden_state[krows, key % width]
    step = max(1, HEAD_FLOATS // _vocab(model))
    out = torch.empty(len(tgt), dtype=torch.float32, device=h.device)
    order = torch.argsort(inverse)
    bounds = torch.searchsorted(inverse[order], torch.arange(0, len(key) + step, step, device=inverse.device))
    for c, s in enumerate(range(0, len(key), step)):
        with gathered(model, krows[s:s + step]):
            logits = head(model, h[s:s + step]).float()
        idx = order[bounds[c]:bounds[c + 1]]
        local = inverse[idx] - s
        picked = logits[local, tgt[idx]]
        out[idx] = picked - _logsumexp_(logits)[local]
    return out


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension, overwriting ``x``: max, then exp(x - max) summed, in place. The same
    steps as ``torch.logsumexp``, without its temporaries: on a CPU it takes a third of the time over a
    49152-word vocabulary (the output layer's second cost after its matmul). Under autograd (the data-aware
    merges differentiate log-likelihoods) it is torch's own, which keeps what the backward pass needs."""
    if x.requires_grad:
        return torch.logsumexp(x, -1)
    m = x.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf (or inf) keeps torch's answer
    return x.sub_(m).exp_().sum(-1).log_().add_(m[..., 0])


def _sums(model, packed: Packed, dev) -> list[list[list[float]]]:
    """Each row's items' choices' summed log-likelihoods, from one forward pass."""
    dtype = next(model.parameters()).dtype
    lp = token_logprobs(model, torch.tensor(packed.rr, device=dev), torch.tensor(packed.pos, device=dev),
                        torch.tensor(packed.tgt, device=dev), **packed.inputs(dev, dtype))
    total = sum(sum(x) for x in packed.n_choices)
    sums = torch.zeros(total, dtype=torch.float64, device=dev).index_add_(
        0, torch.tensor(packed.owner, device=dev), lp.double()).tolist()
    out, k = [], 0
    for row in packed.n_choices:
        out.append([])
        for n in row:
            out[-1].append(sums[k:k + n])
            k += n
    return out


# ----------------------------------------------------------------------------- many updates, one pass


class _Runner:
    """Lays jobs' items into rows (one job per row), batches them, and sets up each batch's forward pass:
    the per-row updates and, when the updates leave the lower layers untouched, those layers' states
    computed once per item and fed in."""

    def __init__(self, model, items: list[Item], jobs: list[Job], adapters: RowAdapters | None,
                 batch_tokens: int | None, share_prefix: bool = True, cache: dict | None = None,
                 adapted: Sequence[str] | None = None):
        self.model, self.items, self.jobs, self.adapters = model, items, jobs, adapters
        self.dev = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.batch_tokens = batch_tokens_for(self.dev, batch_tokens)
        self.lens = [_packed_len(x) for x in items]
        self.width = max([ROW] + self.lens)
        self.prefix, self.states = None, None
        if (adapters is not None or adapted is not None) and share_prefix and (len(jobs) > 1 or cache is not None):
            paths = list(adapted) if adapted is not None else adapters.paths([u for u, _ in jobs if u >= 0])
            first = first_layer(model, paths)
            if 0 < first < len(decoder_layers(model)[1]):
                self.prefix = Prefix(model, first, paths)
                self.states = {} if cache is None else cache.setdefault(("prefix", first), {})
                self._prefix_states(sorted({i for _, idx in jobs for i in idx} - set(self.states)))

    def _batches(self, rows: list[tuple[int, list[int]]]) -> Iterator[list[tuple[int, list[int]]]]:
        i = 0
        while i < len(rows):
            batch, longest = [], 0
            while i < len(rows):
                n = sum(self.lens[x] for x in rows[i][1])
                if batch and (len(batch) + 1) * max(longest, n) > self.batch_tokens:
                    break
                batch.append(rows[i])
                longest = max(longest, n)
                i += 1
            yield batch

    def _prefix_states(self, needed: list[int]) -> None:
        """The hidden states entering the first adapted layer, per item, under the base model."""
        if not needed:
            return
        if self.adapters is not None:
            self.adapters.use(None)
        rows = [(-1, [needed[k] for k in r]) for r in _rows([self.lens[i] for i in needed], self.width)]
        for batch in self._batches(rows):
            packed = pack([[self.items[x] for x in r] for _, r in batch])
            h = self.prefix.states(**packed.inputs(self.dev, self.dtype))
            flat = h[packed.flat_r.to(self.dev), packed.flat_c.to(self.dev)]
            k = 0
            for _, r in batch:
                for x in r:
                    n = sum(len(c) - 1 for c in self.items[x][1]) + len(self.items[x][0])
                    self.states[x] = flat[k:k + n]
                    k += n

    def run(self) -> Iterator[tuple[list[tuple[int, list[int]]], Packed, Callable]]:
        """Yield (batch rows as (job, item indices), packed batch, a context that sets up its forward pass)."""
        rows = [(j, [idx[k] for k in r]) for j, (_, idx) in enumerate(self.jobs)
                for r in _rows([self.lens[i] for i in idx], self.width)]
        if self.prefix is not None:  # a row that several jobs hold, next to itself: batches repeat rows (sharing)
            at: dict[tuple, int] = {}
            rows.sort(key=lambda row: at.setdefault(tuple(row[1]), len(at)))
        for batch in self._batches(rows):
            packed = pack([[self.items[x] for x in r] for _, r in batch])
            yield batch, packed, lambda batch=batch, packed=packed: self._ready(batch, packed)

    @contextlib.contextmanager
    def _ready(self, batch, packed: Packed):
        if self.adapters is not None:
            self.adapters.set_rows([self.jobs[j][0] for j, _ in batch])
        if self.prefix is None:
            yield
            return
        h0 = next(iter(self.states.values()))
        hidden = torch.zeros((*packed.ids.shape, h0.shape[-1]), dtype=h0.dtype, device=self.dev)
        hidden[packed.flat_r.to(self.dev), packed.flat_c.to(self.dev)] = torch.cat(
            [self.states[x] for _, r in batch for x in r])
        distinct: dict[tuple, int] = {}
        inverse = [distinct.setdefault(tuple(r), len(distinct)) for _, r in batch]
        with self.prefix.feeding(hidden), self.prefix.sharing(inverse):
            yield


@torch.no_grad()
def choice_loglikelihoods(model, items: list[Item], jobs: list[Job] | None = None,
                          adapters: RowAdapters | None = None, batch_tokens: int | None = None, progress=None,
                          share_prefix: bool = True, cache: dict | None = None) -> list[list[list[tuple[float, int]]]]:
    """Summed log p(choice | context) and token count of every choice of every item of every job (default:
    one job, every item under the current model). Returns, per job, per item of the job, per choice.
    ``cache`` (a dict kept by the caller across calls on the same ``items``) keeps the lower layers' states
    of the items, so each is computed once for a whole run."""
    items = truncate(items, model_max_len(model))
    own_head(model)  # decided before a frozen prefix is fed
    jobs = jobs if jobs is not None else [(-1, range(len(items)))]
    jobs = [(u, list(idx)) for u, idx in jobs]
    lens = [_packed_len(x) for x in items]
    window = getattr(model.config, "sliding_window", None)  # a custom mask bypasses the window: stay within it
    if (isinstance(window, int) and lens and max(lens) > window) or not packing_works(model, items, adapters):
        return _plain_choice_loglikelihoods(model, items, jobs, adapters, batch_tokens, progress)
    out = [[None] * len(idx) for _, idx in jobs]
    where = [{x: k for k, x in enumerate(idx)} for _, idx in jobs]
    runner = _Runner(model, items, jobs, adapters, batch_tokens, share_prefix, cache)
    for batch, packed, ready in runner.run():
        with ready():
            sums = _sums(model, packed, runner.dev)
        for b, (j, r) in enumerate(batch):
            for k, x in enumerate(r):
                out[j][where[j][x]] = [(s, len(c)) for s, c in zip(sums[b][k], items[x][1])]
        if progress:
            progress(sum(len(r) for _, r in batch))
    return out


def packed_batches(model, items: list[Item], jobs: list[Job], adapters: RowAdapters | None = None,
                   batch_tokens: int | None = None, cache: dict | None = None, adapted: Sequence[str] | None = None):
    """The batches ``choice_loglikelihoods`` runs ``jobs`` in, for callers that run the model themselves (the
    data-aware merges collect Grams and gradients): yields (batch rows as (job, item indices), Packed, ready),
    where ``ready()`` is the context that sets each row's update and feeds the frozen lower layers' states.
    ``adapted`` names the modules that change when the updates are applied some other way than ``adapters``
    (AdaMerging's own hooks), so that the layers below them still run once. Items are cut to the model's
    length first."""
    own_head(model)  # decided before a frozen prefix is fed (the callers' forwards run inside ``ready()``)
    runner = _Runner(model, truncate(items, model_max_len(model)), [(u, list(idx)) for u, idx in jobs], adapters,
                     batch_tokens, cache=cache, adapted=adapted)
    yield from runner.run()


@torch.no_grad()
def final_hidden(model, seqs: list[list[int]], jobs: list[Job] | None = None, adapters: RowAdapters | None = None,
                 batch_tokens: int | None = None, progress=None) -> list[list[torch.Tensor]]:
    """The decoder's last hidden states (after its final norm, as ``output_hidden_states[-1]``) of every
    token of every sequence of every job: per job, per sequence, a [len, hidden] fp32 tensor on the CPU.
    Sequences are packed (each attends only to itself at positions from 0) and the lower layers shared
    across jobs as for ``choice_loglikelihoods``."""
    items = [(list(s[-(model_max_len(model) or len(s)):]), []) for s in seqs]
    jobs = [(u, list(idx)) for u, idx in (jobs if jobs is not None else [(-1, range(len(items)))])]
    out = [[None] * len(idx) for _, idx in jobs]
    where = [{x: k for k, x in enumerate(idx)} for _, idx in jobs]
    runner = _Runner(model, items, jobs, adapters, batch_tokens)
    decoder = model.get_decoder()
    for batch, packed, ready in runner.run():
        with ready():
            h = decoder(**packed.inputs(runner.dev, runner.dtype)).last_hidden_state
        flat = h[packed.flat_r.to(runner.dev), packed.flat_c.to(runner.dev)].float().cpu()
        k = 0
        for j, r in batch:
            for x in r:
                n = len(items[x][0])
                out[j][where[j][x]] = flat[k:k + n]
                k += n
        if progress:
            progress(sum(len(r) for _, r in batch))
    return out


def out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: CUDA's ``OutOfMemoryError``, or the plain ``RuntimeError`` of the CPU
    allocator (and of MPS), which are not a model's answer about packing."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower())


def packing_works(model, items: list[Item], adapters: RowAdapters | None = None) -> bool:
    """Whether this model scores packed choices as it scores them one by one (its attention honours a custom
    4D mask and position ids). Checked once per model on a probe built from the first item with a
    multi-token choice: packed in a row after another item, with a long junk choice before a real one,
    which would change the real one's score a lot if the mask or the positions were ignored (in fp32 the
    two routes agree to rounding, 1e-4 per token; in bf16 to 5e-2). An architecture that rejects the mask
    or the positions (a TypeError, ValueError, IndexError, NotImplementedError or RuntimeError from its
    forward) takes the plain route; running out of memory (``out_of_memory``, on any device) is raised. The answer is cached on the model."""
    cached = getattr(model, "_mergetool_packing", None)
    if cached is not None:
        return cached
    at = next((i for i, (_, cs) in enumerate(items) if any(len(x) > 1 for x in cs)), None)
    if at is None:  # single-token choices: packing adds no token, nothing to check yet
        return True
    if adapters is not None:
        adapters.use(None)
    ctx, conts = items[at]
    real = max(conts, key=len)
    junk = (ctx * (64 // max(len(ctx), 1) + 1))[:64] + real
    dev = next(model.parameters()).device
    try:  # a row: another item, then this context with a junk choice before the real one
        packed = _sums(model, pack([[(junk, [real]), (ctx, [junk, real])]]), dev)[0][1][1]
    except (TypeError, ValueError, NotImplementedError, IndexError, RuntimeError) as e:
        if out_of_memory(e):
            raise
        log.info("packed scoring unavailable (%s): scoring one sequence per choice", str(e)[:200])
        model._mergetool_packing = False
        return False
    plain = loglikelihoods(model, [(ctx, real)])[0][0]
    dtype = next(model.parameters()).dtype
    tol = (1e-4 if dtype in (torch.float32, torch.float64) else 5e-2) * len(real)  # fp32: packed is exact
    ok = abs(packed - plain) <= tol
    if not ok:
        log.info("this model's attention ignores a custom mask or positions: scoring one sequence per choice")
    model._mergetool_packing = ok
    return ok


def _plain_choice_loglikelihoods(model, items, jobs, adapters, batch_tokens, progress):
    out = []
    for u, idx in jobs:
        if adapters is not None:
            adapters.use(u)
        pairs, owner = [], []
        for k, i in enumerate(idx):
            ctx, conts = items[i]
            pairs += [(ctx, c) for c in conts]
            owner += [k] * len(conts)
        lls = loglikelihoods(model, pairs, batch_tokens)
        per, k = [], 0
        for i in idx:
            n = len(items[i][1])
            per.append(lls[k:k + n])
            k += n
            if progress:
                progress(1)
        out.append(per)
    return out


@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], batch_tokens: int | None = None,
                   progress=None) -> list[tuple[float, int]]:
    """Sum of log p(continuation | context) and its token count, for every pair, one sequence per pair
    (cut to the model's length from the left, as lm-eval); batched by length."""
    max_len = model_max_len(model)
    if max_len:
        pairs = [_fit(c, x, max_len) for c, x in pairs]
    dev = next(model.parameters()).device
    batch_tokens = batch_tokens_for(dev, batch_tokens)
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
        sums = continuation_sums(model, ids.to(dev), mask.to(dev), [pairs[j] for j in idx])
        for r, j in enumerate(idx):
            out[j] = (sums[r], len(pairs[j][1]))
        if progress:
            progress(len(idx))
        i += bs
    return out


def _fit(ctx: list[int], cont: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Cut a (context, continuation) pair so that the sequence the model sees, (ctx + cont)[:-1], fits its
    length: context tokens go first, from the left (lm-eval keeps the last max_length + 1 tokens); a
    continuation longer than the model keeps its last max_length tokens after one context token."""
    if len(ctx) + len(cont) - 1 <= max_len:
        return ctx, cont
    if len(cont) >= max_len:
        return ctx[-1:], cont[-max_len:]
    return ctx[-(max_len + 1 - len(cont)):], cont


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
    lp = token_logprobs(model, rows_t, torch.tensor(pos, device=dev), torch.tensor(tgt, device=dev),
                        input_ids=ids, attention_mask=mask)
    return torch.zeros(len(pairs), dtype=torch.float64, device=dev).index_add_(0, rows_t, lp.double()).tolist()


@torch.no_grad()
def generate(model, tok, contexts: list[str], max_new_tokens: int, batch_size: int = 16, progress=None) -> list[str]:
    """Greedy continuations, cut at the first newline or EOS; a context is cut from the left so that it and
    the continuation fit the model's length."""
    dev = next(model.parameters()).device
    tok.padding_side = "left"
    max_len = model_max_len(model)
    keep = max(1, max_len - max_new_tokens) if max_len else None
    out: list[str] = [""] * len(contexts)
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        enc = tok([contexts[i] for i in idx], add_special_tokens=False).input_ids
        enc = [e[-keep:] if keep else e for e in enc]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, L - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[r, L - len(e):] = 1
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, use_cache=True)
        for r, i in enumerate(idx):
            text = tok.decode(gen[r, L:], skip_special_tokens=True)
            out[i] = text.split("\n")[0]
        if progress:
            progress(len(idx))
    return out
