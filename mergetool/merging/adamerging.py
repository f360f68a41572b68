"""AdaMerging (Yang et al., ICLR 2024): the coefficients of task arithmetic, one per task (task-wise) or one per
task and module (layer-wise, the paper's and fusion-bench's "layer": each weight tensor), learned by minimising
the entropy of the merged model's predictions on unlabelled inputs.

Here the inputs are the dev examples' prompts with their choices (never the answers): the prediction of a
multiple-choice example is the softmax of its choices' scores (``--norm``, as ``eval`` predicts), its entropy
H(x) = −Σ_c p_c log p_c, and the loss Σ_tasks mean_{x ∈ task} H(x), the paper's sum over tasks of each task's
mean entropy. Adam (the paper's lr 1e-3) from every coefficient at 0.3 (the paper's prior), full-batch over
the dev prompts (they are few), for ``steps`` steps (the paper's 500); the coefficients are not clamped
(fusion-bench's setting). The merged update Σ_i λ_{i,m} s_i B_i A_i runs beside the frozen weights as hooks
whose coefficients carry gradients; the layers below the first adapted one run once.
"""

from __future__ import annotations

import torch

from ..adapters import APPLY_FIX
from ..errors import MergetoolError
from ..model import check_updatable, linear_dims
from ..scoring import encode_choices, packed_batches
from ..updates import PREFIX, LowRank, Update
from .data import DevData
from .forward import batch_items, choice_scores


class _Mix:
    """Hooks that add Σ_i λ[i, m] Δ_i(x) to each adapted module's output, in fp32, rounded once (as the per-row
    engine applies an update). ``lam`` is [n, modules] (layer-wise) or [n, 1] (task-wise)."""

    def __init__(self, model, updates: list[Update], keys: list[str], lam: torch.Tensor):
        self.lam, self.handles = lam, []
        dev = next(model.parameters()).device
        for m, key in enumerate(keys):
            parts = [(i, u.modules[key]) for i, u in enumerate(updates) if key in u.modules]
            col = m if lam.shape[1] > 1 else 0
            if all(isinstance(x, LowRank) for _, x in parts):
                A = torch.cat([x.A.to(dev, torch.float32) for _, x in parts], 0)
                B = torch.cat([x.B.to(dev, torch.float32) * x.scale for _, x in parts], 1)
                owner = torch.tensor([i for i, x in parts for _ in range(x.rank)], device=dev)
                hook = self._lora(A, B, owner, col)
            else:
                D = torch.stack([x.delta(dev) for _, x in parts])
                owner = torch.tensor([i for i, _ in parts], device=dev)
                hook = self._dense(D, owner, col)
            path = key[len(PREFIX):] if key.startswith(PREFIX) else key
            self.handles.append(model.get_submodule(path).register_forward_hook(hook))

    def _lora(self, A, B, owner, col):
        def hook(mod, inp, out):
            d = ((inp[0].float() @ A.T) * self.lam[owner, col]) @ B.T
            return (out.float() + d).to(out.dtype)
        return hook

    def _dense(self, D, owner, col):
        def hook(mod, inp, out):
            d = torch.einsum("...i,noi,n->...o", inp[0].float(), D, self.lam[owner, col])
            return (out.float() + d).to(out.dtype)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def adamerging_coefficients(model, tok, updates: list[Update], dev: DevData, steps: int = 500, lr: float = 1e-3,
                            granularity: str = "layer", init: float = 0.3, norm: str = "tokens",
                            batch_tokens: int | None = None, progress=None) -> dict:
    """{"coefficients": {update key: [λ_1 … λ_n]}, "info": {entropy before and after, steps, granularity}}."""
    names = dict(model.named_modules())
    given = {k for u in updates for k in u.modules}
    keys = [k for k in (PREFIX + p for p in names) if k in given] + [p for p in names if p in given]
    bad = next((k for k in sorted(given) if k not in keys or
                linear_dims(names[k[len(PREFIX):] if k.startswith(PREFIX) else k]) is None), None)
    if bad is not None:
        raise MergetoolError(bad, "adamerging learns coefficients of linear modules; this update changes another "
                             "kind of module", "merge LoRA adapters, or use another method")
    exs = dev.examples
    items = encode_choices(tok, [(e.context, e.rec["choices"]) for e in exs])
    weight_of = {i: 1.0 / len(idx) for idx in dev.of for i in idx}  # each task's mean entropy (a task counts once)
    every = sorted(weight_of)
    check_updatable(model, APPLY_FIX)
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    devc = params[0].device
    lam = torch.nn.Parameter(torch.full((len(updates), len(keys) if granularity == "layer" else 1), float(init),
                                        device=devc))
    opt = torch.optim.Adam([lam], lr=lr)
    mix = _Mix(model, updates, keys, lam)
    history = []
    try:
        batches = list(packed_batches(model, items, [(-1, every)], None, batch_tokens, cache={},
                                      adapted=[k[len(PREFIX):] if k.startswith(PREFIX) else k for k in keys]))
        for step in range(steps + 1):
            opt.zero_grad()
            total = 0.0
            for batch, packed, ready in batches:
                ids = batch_items(batch)
                with torch.enable_grad(), ready():
                    scores, _, counts = choice_scores(model, packed, [exs[i].rec["choices"] for i in ids], norm)
                    loss = 0.0
                    at = 0
                    for i, c in zip(ids, counts):
                        p = torch.log_softmax(scores[at:at + c], 0)
                        loss = loss - (p.exp() * p).sum() * weight_of[i]
                        at += c
                    if step < steps:
                        loss.backward()
                total += float(loss.detach())
            history.append(total)
            if step < steps:
                opt.step()
                if progress:
                    progress(1)
    finally:
        mix.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
    got = lam.detach().cpu()
    coef = {k: [float(got[i, m if got.shape[1] > 1 else 0]) for i in range(len(updates))] for m, k in enumerate(keys)}
    return {"coefficients": coef, "info": {"entropy_before": history[0], "entropy_after": history[-1], "steps": steps,
                                           "granularity": granularity, "lr": lr, "init": init}}
