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
        parts = name.split(".")
        if "layers" not in parts:
            continue
        layer = int(parts[parts.index("layers") + 1])
        if layer in layers and any(name.endswith("." + t) or name.endswith(t) for t in spec.targets):
            names.append(name)
    if not names:
        raise MergetoolError("--target-modules", f"no linear module matches {','.join(spec.targets)} in layers "
                             f"{layers}", "name modules such as mlp.up_proj or self_attn.q_proj")
    return names


class StackedLora:
    """E LoRA adapters on the same modules, applied per batch row (row i uses adapter ``rows[i]``)."""

    def __init__(self, model, names: list[str], n: int, spec: LoraSpec, seeds: list[int]):
        self.model, self.names, self.spec = model, names, spec
        self.A, self.B, self.handles = {}, {}, []
        self.rows: torch.Tensor | None = None
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
            A = self.A[name][self.rows]
            B = self.B[name][self.rows]
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
        ids = ([tok.eos_token_id] if not p else p) + c
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
    """Mean next-token cross-entropy of each row: [rows]."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100,
                                           reduction="none").view(lb.shape)
    n = (lb != -100).sum(1).clamp_min(1)
    return ce.sum(1) / n


def train_stacked(model, tok, items: list[tuple[str, str]], spec: LoraSpec, names: list[str],
                  seeds: list[int], progress=None) -> tuple[StackedLora, list[float]]:
    """Train len(items) experts at once, expert e on items[e] (a (prompt, completion) pair)."""
    dev = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    st = StackedLora(model, names, len(items), spec, seeds)
    opt = torch.optim.AdamW(st.parameters(), lr=spec.lr, weight_decay=0.0)
    ids, mask, lab = lm_batch(tok, items, dev)
    st.rows = torch.arange(len(items), device=dev)
    losses = None
    for _ in range(spec.epochs):
        losses = row_losses(model(input_ids=ids, attention_mask=mask).logits, lab)
        losses.sum().backward()  # each expert's gradient is its own mean loss's
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress:
            progress()
    with torch.no_grad():
        final = row_losses(model(input_ids=ids, attention_mask=mask).logits, lab)
    return st, [float(x) for x in (final if final is not None else losses)]


@torch.no_grad()
def stacked_choice_scores(model, tok, st: StackedLora, recs: list[dict], norm: str = "tokens") -> list[list[float]]:
    """Expert e scores the choices of recs[e] (its own question), all experts in one batch."""
    from .evaluate import choose, continuation_sums, encode_pair

    dev = next(model.parameters()).device
    rows, pairs = [], []
    for e, r in enumerate(recs):
        for c in r["choices"]:
            pairs.append(encode_pair(tok, r["prompt"], c))
            rows.append(e)
    seqs = [(a + b)[:-1] for a, b in pairs]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    st.rows = torch.tensor(rows, device=dev)  # row i is scored by expert rows[i]
    sums = list(zip(continuation_sums(model, ids.to(dev), mask.to(dev), pairs), (len(b) for _, b in pairs)))
    out, k = [], 0
    for r in recs:
        n = len(r["choices"])
        out.append(choose(sums[k:k + n], r["choices"], norm))
        k += n
    return out


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
            st.rows = torch.zeros(len(batch), dtype=torch.long, device=dev)
            lo = row_losses(model(input_ids=ids, attention_mask=mask).logits, lab).mean()
            lo.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(lo)
            if progress:
                progress()
    return st, loss
