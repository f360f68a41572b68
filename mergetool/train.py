"""LoRA experts: one per task (peft), or one per example, many at once (one adapter per batch row).

Per example, every expert trains on its own passage (``text``) with the paper's recipe by default (r=64,
alpha=128, mlp.up_proj of one middle layer, lr 4e-3, 10 epochs: "Will it Merge?" section 3.1 and
appendix A.6). E experts train together: each target module gets stacked factors A [E, r, in] and
B [E, out, r] and adds scale·(x Aᵀ) Bᵀ to batch row e with expert e's factors, so one forward/backward
pass trains E independent adapters (the loss is the sum of the per-expert means, so each expert's
gradient is its own; AdamW is elementwise, so each expert follows its own optimiser trajectory).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import torch

from .errors import MergetoolError
from .evaluate import logits_at, prefix_token
from .updates import PREFIX, LowRank, Update


@dataclass
class LoraSpec:
    rank: int = 64
    alpha: float = 128.0
    targets: list[str] = field(default_factory=lambda: ["mlp.up_proj"])
    layers: list[int] | None = None  # None: the middle layer (per example) or all layers (per task)
    lr: float = 4e-3
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def layer_of(name: str) -> tuple[str, int] | None:
    """(path of the layer list, layer index) of a module name such as ``model.layers.14.mlp.up_proj``;
    None outside the decoder layers."""
    parts = name.split(".")
    if "layers" not in parts:
        return None
    k = parts.index("layers")
    return ".".join(parts[:k + 1]), int(parts[k + 1])


def target_modules(model, spec: LoraSpec, default_middle: bool) -> list[str]:
    """Names of the nn.Linear modules to adapt: ``targets`` suffixes in ``layers``."""
    n_layers = model.config.num_hidden_layers
    layers = spec.layers if spec.layers is not None else ([n_layers // 2] if default_middle else list(range(n_layers)))
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise MergetoolError("--layers", f"layer {bad[0]} is outside 0..{n_layers - 1}", "pick existing layers")
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        where = layer_of(name)
        if where is not None and where[1] in layers and any(name.endswith(t) for t in spec.targets):
            names.append(name)
    if not names:
        raise MergetoolError("--target-modules", f"no linear module matches {','.join(spec.targets)} in layers "
                             f"{layers}", "name modules such as mlp.up_proj or self_attn.q_proj")
    return names


def expert_seed(seed: int, example_id: str) -> int:
    """The initialisation seed of an example's expert: fixed by the run's seed and the example's id, so an
    expert is the same whichever batch it trains in (and after --resume)."""
    return zlib.crc32(f"{seed}:{example_id}".encode())


class StackedLora:
    """E LoRA adapters on the same modules, applied per batch row (row i uses adapter ``rows[i]``)."""

    def __init__(self, model, names: list[str], n: int, spec: LoraSpec, seeds: list[int]):
        self.model, self.names, self.spec = model, names, spec
        self.A, self.B, self.handles = {}, {}, []
        self.rows: torch.Tensor | None = None  # adapter of each batch row; None: row i uses adapter i
        mods = dict(model.named_modules())
        dev = next(model.parameters()).device
        for name in names:
            lin = mods[name]
            A = torch.empty((n, spec.rank, lin.in_features), device=dev)
            for e, s in enumerate(seeds):  # peft's init: kaiming-uniform A, zero B, per expert seed
                g = torch.Generator(device="cpu").manual_seed(s * 1_000_003 + zlib.crc32(name.encode()) % 1_000_003)
                bound = 1 / math.sqrt(lin.in_features)  # kaiming_uniform with a=sqrt(5)
                A[e] = (torch.rand((spec.rank, lin.in_features), generator=g) * 2 - 1).to(dev) * bound
            self.A[name] = torch.nn.Parameter(A)
            self.B[name] = torch.nn.Parameter(torch.zeros((n, lin.out_features, spec.rank), device=dev))
            self.handles.append(lin.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, inp, out):
            x = inp[0]
            A, B = self.A[name], self.B[name]
            if self.rows is None and A.shape[0] == 1:  # one adapter for every row: plain matmuls
                lo = (x.to(A.dtype) @ A[0].T) @ B[0].T
            else:  # row i uses adapter rows[i] (None: adapter i), batched matmuls
                if self.rows is not None:
                    A, B = A[self.rows], B[self.rows]
                lo = torch.bmm(torch.bmm(x.to(A.dtype), A.transpose(1, 2)), B.transpose(1, 2))
            return out + (self.spec.scale * lo).to(out.dtype)

        return hook

    def parameters(self):
        return list(self.A.values()) + list(self.B.values())

    def remove(self):
        for h in self.handles:
            h.remove()

    def update(self, e: int, name: str, meta: dict) -> Update:
        mods = {PREFIX + n: LowRank(self.A[n][e].detach().float().cpu().clone(),
                                    self.B[n][e].detach().float().cpu().clone(), self.spec.scale) for n in self.names}
        return Update(name, mods, meta)


def lm_batch(tok, texts: list[tuple[str, str]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels; (prompt, completion) pairs train on the completion only."""
    seqs, labels = [], []
    for prompt, completion in texts:
        p = tok(prompt, add_special_tokens=False).input_ids if prompt else []
        c = tok(completion, add_special_tokens=False).input_ids
        ids = ([prefix_token(tok)] if not p else p) + c
        seqs.append(ids)
        labels.append([-100] * (len(ids) - len(c)) + c)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), L), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(s)] = torch.tensor(lb)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device), lab.to(device)


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row, from full logits: [rows]."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                           reduction="none").view(lb.shape)
    n = (lb != -100).sum(1).clamp_min(1)
    return ce.sum(1) / n


class Targets:
    """Where a batch's labels are: (row, position) of every predicted token, its id, tokens per row."""

    def __init__(self, labels: torch.Tensor):
        lb = labels[:, 1:]
        self.rows, self.pos = (lb != -100).nonzero(as_tuple=True)
        self.tgt = lb[self.rows, self.pos]
        self.n = torch.bincount(self.rows, minlength=labels.shape[0]).clamp_min(1)


def model_row_losses(model, ids: torch.Tensor, mask: torch.Tensor, t: Targets) -> torch.Tensor:
    """``row_losses`` without the full logits: the output layer runs only at the labelled positions
    (``evaluate.logits_at``; padding and prompts cost nothing there), cross-entropy in fp32."""
    logits = logits_at(model, t.rows, t.pos, input_ids=ids, attention_mask=mask)
    ce = torch.nn.functional.cross_entropy(logits.float(), t.tgt, reduction="none")
    return torch.zeros(ids.shape[0], dtype=ce.dtype, device=ce.device).index_add_(0, t.rows, ce) / t.n


class _Skipped(torch.nn.Module):
    """Stands in for a frozen decoder layer whose output is cached: passes its input through (as a tensor or
    a 1-tuple, like the layer it replaces) and answers attribute reads with the replaced layer's."""

    def __init__(self, layer: torch.nn.Module, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule: its weights are not ours
        self._as_tuple = as_tuple

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self._as_tuple else hidden_states


class FrozenPrefix:
    """Every training step of a batch runs the same decoder layers below the lowest adapted one on the same
    inputs, so their output cannot change: computed on the first step, then those layers are skipped and the
    cached hidden states enter the first adapted layer (exact; with the paper's middle-layer experts it
    halves every forward pass). Use as a context around the steps of one fixed batch."""

    def __init__(self, model, names: list[str]):
        self.layers, self.first = min((layer_of(n) for n in names), key=lambda w: w[1])
        self.model, self.cache, self.saved, self.handles, self.as_tuple = model, None, [], [], False

    def __enter__(self):
        if not self.first:
            return self
        layers = self.model.get_submodule(self.layers)
        self.handles.append(layers[self.first].register_forward_pre_hook(self._pre, with_kwargs=True))
        self.handles.append(layers[self.first - 1].register_forward_hook(self._post))
        return self

    def _post(self, mod, args, out):
        self.as_tuple = isinstance(out, tuple)

    def _pre(self, mod, args, kwargs):
        if self.cache is None:
            h = args[0] if args else kwargs["hidden_states"]
            self.cache = h.detach()
            return None
        if args:
            return (self.cache,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.cache}

    def step_done(self):
        """After the first step: skip the frozen layers from now on."""
        if self.first and self.cache is not None and not self.saved:
            layers = self.model.get_submodule(self.layers)
            self.saved = [layers[i] for i in range(self.first)]
            for i in range(self.first):
                layers[i] = _Skipped(self.saved[i], self.as_tuple)

    def __exit__(self, *exc):
        if self.saved:
            layers = self.model.get_submodule(self.layers)
            for i, m in enumerate(self.saved):
                layers[i] = m
        for h in self.handles:
            h.remove()
        self.cache, self.saved, self.handles = None, [], []


def train_stacked(model, tok, items: list[tuple[str, str]], spec: LoraSpec, names: list[str],
                  seeds: list[int], progress=None) -> tuple[StackedLora, list[float]]:
    """Train len(items) experts at once, expert e on items[e] (a (prompt, completion) pair)."""
    dev = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    st = StackedLora(model, names, len(items), spec, seeds)
    opt = torch.optim.AdamW(st.parameters(), lr=spec.lr, weight_decay=0.0)
    ids, mask, lab = lm_batch(tok, items, dev)
    t = Targets(lab)
    st.rows = None  # row e is expert e
    with FrozenPrefix(model, names) as frozen:
        for _ in range(spec.epochs):
            losses = model_row_losses(model, ids, mask, t)
            losses.sum().backward()  # each expert's gradient is its own mean loss's
            opt.step()
            opt.zero_grad(set_to_none=True)
            frozen.step_done()
            if progress:
                progress()
        with torch.no_grad():
            final = model_row_losses(model, ids, mask, t)
    return st, [float(x) for x in final.tolist()]


@torch.no_grad()
def stacked_choice_scores(model, tok, st: StackedLora, recs: list[dict], norm: str = "tokens") -> list[list[float]]:
    """Expert e scores the choices of recs[e] (its own question): every expert in one batch, each
    question packed with its prompt once (``evaluate.choice_loglikelihoods``), row by row its own expert."""
    from .evaluate import choice_loglikelihoods, choose, encode_choices

    dev = next(model.parameters()).device
    items = encode_choices(tok, [(r["prompt"], r["choices"]) for r in recs])

    def before(idx):  # the batch's rows are these experts' questions
        st.rows = torch.tensor(idx, device=dev)

    lls = choice_loglikelihoods(model, items, batch_tokens=1 << 30, before=before)
    return [choose(ll, r["choices"], norm) for ll, r in zip(lls, recs)]


def train_task(model, tok, items: list[tuple[str, str]], spec: LoraSpec, names: list[str], progress=None):
    """One expert on a whole task (mini-batches of ``spec.batch_size``), the same stacked machinery with E=1."""
    dev = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    st = StackedLora(model, names, 1, spec, [spec.seed])
    opt = torch.optim.AdamW(st.parameters(), lr=spec.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    loss = float("nan")
    for _ in range(spec.epochs):
        order = torch.randperm(len(items), generator=g).tolist()
        for s in range(0, len(order), spec.batch_size):
            batch = [items[i] for i in order[s:s + spec.batch_size]]
            ids, mask, lab = lm_batch(tok, batch, dev)
            st.rows = None  # the one adapter serves every row
            lo = model_row_losses(model, ids, mask, Targets(lab)).mean()
            lo.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(lo)
            if progress:
                progress()
    return st, loss
