"""Fisher merging's statistics: the diagonal Fisher information of every adapted linear module's weight, per
task, at the task's expert, on the task's examples.

For a multiple-choice example the model is a classifier over the choices, p(c|x) the softmax of the choices'
scores (``--norm``, as ``eval`` predicts), and its Fisher is the expectation over the model's own prediction,
F = E_x Σ_c p(c|x) (∇_W log p(c|x))², exact rather than sampled; for a generation or passage example (one
continuation) the empirical Fisher of its log-likelihood, (∇_W log p(y|x))². The gradient with respect to the
dense weight W of a module (the space of the task vectors; a LoRA's factors are not identifiable) is, for
one example, Σ_t δ_t x_tᵀ over its tokens: δ the gradient at the module's output, x its input. Both come
from hooks on one batched pass through the per-row engine (rows of task i carry expert i; the layers below
the first adapted one run once), so each example's gradient is its own: per-example outer products, not
the square of a batch's summed gradient (fusion-bench's batch approximation).
"""

from __future__ import annotations

import torch

from ..adapters import RowAdapters
from ..model import linear_dims
from ..scoring import encode_choices, model_max_len, packed_batches, truncate, _packed_len
from ..updates import PREFIX, Update
from .data import DevData, answer_items
from .forward import batch_items, choice_scores, item_tokens

CHUNK_FLOATS = 1 << 26  # per-example outer products computed this many floats at a time


class _Taps:
    """Forward hooks on the adapted modules that keep each input and put each output in the autograd graph
    (through a zero leaf), so that the gradient at every output can be asked for."""

    def __init__(self, model, paths: list[str]):
        self.paths = paths
        self.x: dict[str, torch.Tensor] = {}
        self.out: dict[str, torch.Tensor] = {}
        dev = next(model.parameters()).device
        self.zero = torch.zeros((), device=dev, requires_grad=True)
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in paths]

    def _hook(self, path: str):
        def hook(mod, inp, out):
            self.x[path] = inp[0].detach()
            y = out + self.zero.to(out.dtype)
            self.out[path] = y
            return y
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def fisher_diagonals(model, tok, updates: list[Update], dev: DevData, norm: str = "tokens",
                     batch_tokens: int | None = None) -> dict:
    """{"fisher": {update key: [n, out, in] fp32 on the CPU}}: each task's mean over its examples."""
    exs = dev.examples
    mc = [e.kind == "mc" for e in exs]
    items = encode_choices(tok, [(e.context, e.rec["choices"]) for e in exs if e.kind == "mc"])
    it = iter(items)
    single = iter(answer_items(tok, [e for e in exs if e.kind != "mc"]))
    items = truncate([next(it) if m else next(single) for m in mc], model_max_len(model))
    choices = [e.rec["choices"] if e.kind == "mc" else [""] for e in exs]
    task_of = {i: t for t, idx in enumerate(dev.of) for i in idx}
    jobs = [(i, idx) for i, idx in enumerate(dev.of)]
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    devc = params[0].device
    try:
        with RowAdapters(model, updates) as ad:
            paths = ad.linear_paths()  # F is [n, out, in], as ΔW (a Conv1D's weight is stored [in, out])
            F = {p: torch.zeros((len(updates), *linear_dims(model.get_submodule(p))[::-1]), device=devc)
                 for p in paths}
            taps = _Taps(model, paths)
            try:
                for batch, packed, ready in packed_batches(model, items, jobs, ad, batch_tokens):
                    ids = batch_items(batch)
                    with torch.enable_grad(), ready():
                        scores, sums, counts = choice_scores(model, packed, [choices[i] for i in ids], norm)
                        _accumulate(F, taps, packed, ids, scores, sums, counts, [mc[i] for i in ids],
                                    torch.tensor([task_of[i] for i in ids], device=devc),
                                    [_packed_len(items[i]) for i in ids])
            finally:
                taps.remove()
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)
    n = torch.tensor([len(idx) for idx in dev.of], dtype=torch.float32, device=devc).view(-1, 1, 1)
    return {"fisher": {PREFIX + p: (f / n).cpu() for p, f in F.items()}}


def _accumulate(F, taps: _Taps, packed, ids, scores, sums, counts, is_mc, tasks, sizes) -> None:
    """Add Σ_c p_c (δᵀx)² of every item of the batch to its task's Fisher, one backward pass per choice index."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    most = max(counts)
    logp = torch.zeros((len(ids), most), device=scores.device)
    weight = torch.zeros((len(ids), most), device=scores.device)
    for k, (s, c) in enumerate(zip(starts, counts)):
        if is_mc[k]:  # the prediction's distribution over the choices, and its probabilities as weights
            lp = torch.log_softmax(scores[s:s + c], 0)
            logp[k, :c] = lp
            weight[k, :c] = lp.detach().exp()
        else:  # one continuation: its log-likelihood (the empirical Fisher)
            logp[k, 0] = sums[s]
            weight[k, 0] = 1.0
    tok = item_tokens(packed, sizes).to(scores.device)
    valid = tok >= 0
    tok = tok.clamp_min(0)
    outs = [taps.out[p] for p in taps.paths]
    for c in range(most):
        grads = torch.autograd.grad(logp[:, c].sum(), outs, retain_graph=c < most - 1, allow_unused=True)
        w = weight[:, c]
        for p, g in zip(taps.paths, grads):
            if g is None:
                continue
            x = taps.x[p]
            d = g.reshape(-1, g.shape[-1])[tok].float() * valid.unsqueeze(-1)  # [items, T, out]
            xi = x.reshape(-1, x.shape[-1])[tok].float()  # [items, T, in]
            step = max(1, CHUNK_FLOATS // (d.shape[-1] * xi.shape[-1]))
            for a in range(0, len(ids), step):
                G = torch.bmm(d[a:a + step].transpose(1, 2), xi[a:a + step])  # each item's ∇_W = Σ_t δ_t x_tᵀ
                F[p].index_add_(0, tasks[a:a + step], G.square_() * w[a:a + step].view(-1, 1, 1))
