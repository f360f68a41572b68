"""RegMean's statistics: the Gram matrix of every adapted linear module's inputs on each task's examples, with
the task's expert applied (RegMean), or with the layers below already merged (RegMean++).

One batched pass over all tasks' examples through the per-row engine (``adapters.RowAdapters``): the rows of
task i carry expert i, a forward hook on each adapted module adds XᵀX of its input's real tokens (padding
excluded) to task i's Gram, and the layers below the first adapted one run once per example (``Prefix``).
Modules that read the same input (q, k and v) share one Gram. Each Gram is divided by the task's number of
tokens (fusion-bench's mean over tokens), so a task weighs the same however long its examples are.
"""

from __future__ import annotations

import torch

from ..adapters import RowAdapters, decoder_layers, layer_of
from ..errors import MergetoolError
from ..model import linear_dims
from ..methods.dataaware import Normal, regmean_dense, regmean_lora
from ..scoring import packed_batches
from ..updates import PREFIX, Dense, LowRank, Update
from .data import DevData, sequence_items


class _Stop(Exception):
    pass


class _Grams:
    """Forward hooks that add each module's input Gram, per task, to fp32 sums: one per distinct input, modules
    called one after another on the same tensor (q, k, v; gate, up) sharing it."""

    def __init__(self, model, paths: list[str], n: int):
        self.n, self.paths = n, paths
        self.site: dict[str, int] = {}  # module -> its Gram (modules reading one input share it)
        self.sums: list[torch.Tensor] = []
        self.tokens = torch.zeros(n, dtype=torch.float64)
        self._last: tuple[torch.Tensor, int] | None = None  # the last input seen and its Gram (q, k, v in turn)
        self._done: set[int] = set()
        self.handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in paths]

    def batch(self, row_task: torch.Tensor, real: torch.Tensor) -> None:
        """The next forward pass: the task of each row, and which positions hold tokens."""
        self.row_task, self.real = row_task, real
        self._last, self._done = None, set()
        for t in range(self.n):
            self.tokens[t] += float(real[row_task == t].sum())

    def _hook(self, path: str):
        def hook(mod, inp, out):
            x = inp[0]
            if path not in self.site:  # the first pass decides which modules read the same tensor
                if self._last is not None and self._last[0] is x:
                    self.site[path] = self._last[1]
                else:
                    self.site[path] = len(self.sums)
                    self.sums.append(torch.zeros((self.n, x.shape[-1], x.shape[-1]), dtype=torch.float32,
                                                 device=x.device))
            s = self.site[path]
            self._last = (x, s)
            if s in self._done:
                return
            self._done.add(s)
            for t in self.row_task.unique().tolist():
                rows = self.row_task == t
                X = x[rows][self.real[rows]].float()
                self.sums[s][t] += X.T @ X
        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        """Module path -> [n, d, d] fp64 Grams on the CPU, each task's divided by its token count."""
        scale = 1 / self.tokens.clamp_min(1)
        per_site = [(g.double().cpu() * scale.view(-1, 1, 1)) for g in self.sums]
        return {p: per_site[self.site[p]] for p in self.paths if p in self.site}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect(model, tok, updates: list, dev: DevData, paths: list[str] | None = None, stop_after: int | None = None,
            batch_tokens: int | None = None, cache: dict | None = None) -> dict[str, torch.Tensor]:
    """Grams of the given modules (default: every linear module the updates change) on each adapter's task's
    examples, with ``updates[i]`` on adapter i's rows; the forward pass stops after decoder layer ``stop_after``
    when given. Returns {update key: [n, d, d]}."""
    items = sequence_items(tok, dev.examples)
    jobs = [(i, idx) for i, idx in enumerate(dev.of)]
    dev_ = next(model.parameters()).device
    found = decoder_layers(model)
    with RowAdapters(model, updates) as ad:
        paths = paths if paths is not None else ad.linear_paths()
        hooks = _Grams(model, paths, len(updates))
        stopper = None
        if stop_after is not None and found and stop_after + 1 < len(found[1]):
            def stop(mod, args, kwargs):
                raise _Stop
            stopper = found[1][stop_after + 1].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for batch, packed, ready in packed_batches(model, items, jobs, ad, batch_tokens, cache):
                hooks.batch(torch.tensor([jobs[j][0] for j, _ in batch], device=dev_), (packed.item >= 0).to(dev_))
                with ready():
                    try:
                        model.get_decoder()(**packed.inputs(dev_, next(model.parameters()).dtype))
                    except _Stop:
                        pass
        finally:
            hooks.remove()
            if stopper is not None:
                stopper.remove()
    return {PREFIX + p: g for p, g in hooks.grams().items()}


def regmean_grams(model, tok, updates: list[Update], dev: DevData, batch_tokens: int | None = None) -> dict:
    """RegMean: each expert on its own task's examples, every adapted module's Gram in one pass."""
    return {"grams": collect(model, tok, updates, dev, batch_tokens=batch_tokens)}


def regmean_pp_grams(model, tok, updates: list[Update], dev: DevData, alpha: float,
                     batch_tokens: int | None = None) -> dict:
    """RegMean++: decoder layer by layer, the Grams of layer l's modules with layers < l already merged (by
    RegMean, from the Grams found for them) and expert i's own layer l on task i's rows; then layer l is merged.
    One pass per adapted layer, each stopped after that layer (the layers below the first adapted one run once
    for all). The merged layers are what ``regmean`` computes from the returned Grams, so the merge that runs
    afterwards from these statistics is the one this loop built."""
    found = decoder_layers(model)
    mods = sorted({k for u in updates for k in u.modules})
    where = {}
    for k in mods:
        path = k[len(PREFIX):] if k.startswith(PREFIX) else k
        lay = layer_of(path, found[0]) if found else None
        m = dict(model.named_modules()).get(path)
        if lay is None or linear_dims(m) is None:
            raise MergetoolError(k, "regmean++ merges decoder layers one after another; this update changes "
                                 "something that is not a linear module of a decoder layer",
                                 "use regmean, which merges every module from one pass")
        where[k] = lay
    grams: dict[str, torch.Tensor] = {}
    merged: dict[str, object] = {}
    cache: dict = {}
    for lay in sorted(set(where.values())):
        here = [k for k in mods if where[k] == lay]
        per_task = [Update(u.name, {**merged, **{k: m for k, m in u.modules.items() if where[k] == lay}}, u.meta)
                    for u in updates]
        g = collect(model, tok, per_task, dev, [k[len(PREFIX):] for k in here], lay, batch_tokens, cache)
        grams.update(g)
        normals: dict[int, Normal] = {}  # one factorisation per input (q, k and v share theirs)
        for k in here:
            parts = [u.modules.get(k) for u in updates]
            if all(m is None or isinstance(m, LowRank) for m in parts):
                if id(g[k]) not in normals:
                    normals[id(g[k])] = Normal(g[k], alpha)
                merged[k] = regmean_lora(parts, normals[id(g[k])], alpha)
            else:
                shape = next(m for m in parts if m is not None).shape
                D = torch.stack([m.delta() if m is not None else torch.zeros(shape) for m in parts])
                merged[k] = Dense(regmean_dense(D, g[k], alpha).float())
    return {"grams": grams}
