"""LoRA experts: one per task (peft), or one per example, many at once (one adapter per batch row).

Per example, every expert trains on its own passage (``text``) with the paper's recipe by default (r=64,
alpha=128, mlp.up_proj of one middle layer, lr 4e-3, 10 epochs: "Will it Merge?" section 3.1 and
appendix A.6). E experts train together: each target module gets stacked factors A [E, r, in] and
B [E, out, r] and adds scale·(x Aᵀ) Bᵀ to batch row e with expert e's factors, so one forward/backward
pass trains E independent adapters (the loss is the sum of the per-expert means, so each expert's
gradient is its own; AdamW is elementwise, so each expert follows its own optimiser trajectory). The
adapters are :class:`~mergetool.adapters.RowAdapters` (the same rule that evaluation applies updates by),
and the decoder layers below the adapted ones run once per batch (:class:`~mergetool.adapters.Prefix`).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch

from .adapters import Prefix, RowAdapters, decoder_layers, first_layer, layer_of
from .blobs import blob_bytes
from .model import is_conv1d, linear_dims
from .errors import MergetoolError
from .scoring import logits_at, own_head, prefix_token
from .updates import Update, metadata_for, to_tensors


@dataclass
class LoraSpec:
    rank: int = 64
    alpha: float = 128.0
    targets: list[str] | None = None  # None: the model's defaults (``default_targets``)
    layers: list[int] | None = None  # None: the middle layer (per example) or all layers (per task)
    lr: float = 4e-3
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    dora: bool = False  # DoRA: each expert also trains a magnitude per output row

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target module name: the whole path, or its last dotted components."""
    return name == target or name.endswith("." + target)


def _peft_defaults(model_type: str | None):
    """peft's own default LoRA targets for this model type (a list of names, or a regular expression), if any."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # a peft without the table: the attention's linear maps
        return None
    return mapping.get(model_type)


def _in_attention(layer: torch.nn.Module, rel: str) -> bool:
    """Whether the module at ``rel`` (a path inside a decoder layer) sits in the layer's attention: under a
    module whose class is an attention (``LlamaAttention``, ``GPT2Attention``, ``FalconAttention``, ...)."""
    parts = rel.split(".")
    return any("attention" in type(layer.get_submodule(".".join(parts[:k]))).__name__.lower()
               for k in range(1, len(parts)))


def linear_modules(layers) -> tuple[dict, dict]:
    """The linear maps of the decoder layers by their path inside a layer, over every layer (hybrid models mix
    layers: Mamba and attention in Nemotron-H, layers that share another's keys and values in Gemma-4), and the
    first layer that holds each."""
    rel, home = {}, {}
    for layer in layers:
        for n, m in layer.named_modules():
            if n and n not in rel and linear_dims(m) is not None:
                rel[n], home[n] = m, layer
    return rel, home


def default_targets(model, default_middle: bool) -> tuple[list[str], str]:
    """The target modules when none are named, as module-name suffixes inside a decoder layer, and where they
    come from. Per task: peft's own default for the model type (``q_proj, v_proj`` on Llama, ``c_attn`` on
    GPT-2, ``query_key_value`` on GPT-NeoX, Falcon and BLOOM), else (no default, or one that names nothing
    here) every linear map of the attention (Phi-3: ``qkv_proj, o_proj``). Per example (the paper's recipe, the MLP's up projection): ``mlp.up_proj`` where the
    layers have one, else the layer's linear maps outside the attention that widen the hidden size (``fc1``,
    ``c_fc``, ``dense_h_to_4h``, Phi-3's fused ``gate_up_proj``), gates left out when others remain."""
    lpath, layers = decoder_layers(model)
    rel, home = linear_modules(layers)
    if not default_middle:
        peft = _peft_defaults(getattr(model.config, "model_type", None))
        if isinstance(peft, str):  # a regular expression over whole module paths
            found = [n for n in rel if re.fullmatch(peft, f"{lpath}.0.{n}")]
        else:
            found = [n for n in rel if any(_matches(n, t) for t in peft or ())]
        if found:
            return found, "peft's default for this model type"
        return [n for n in rel if _in_attention(home[n], n)], "the attention's linear maps"
    up = [n for n in rel if _matches(n, "mlp.up_proj")]
    if up:
        return up, "the paper's recipe"
    hidden = model.get_input_embeddings().weight.shape[1]
    wide = [n for n, m in rel.items() if not _in_attention(home[n], n) and linear_dims(m)[0] == hidden
            and linear_dims(m)[1] > hidden]
    plain = [n for n in wide if "gate" not in n.rsplit(".", 1)[-1] or "up" in n.rsplit(".", 1)[-1]]
    return (plain or wide), "the MLP's up projection"


def target_modules(model, spec: LoraSpec, default_middle: bool) -> list[str]:
    """Names of the linear maps (``nn.Linear`` or ``Conv1D``) to adapt: those whose name ends with one of
    ``spec.targets`` (whole dotted components, as peft matches; default ``default_targets``) in ``layers``."""
    found = decoder_layers(model)
    if found is None:
        raise MergetoolError("--layers", "cannot find this model's decoder layers", "use a decoder-only model")
    lpath, layer_list = found
    n_layers = len(layer_list)
    layers = spec.layers if spec.layers is not None else ([n_layers // 2] if default_middle else list(range(n_layers)))
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise MergetoolError("--layers", f"layer {bad[0]} is outside 0..{n_layers - 1}", "pick existing layers")
    targets, source = (spec.targets, None) if spec.targets else default_targets(model, default_middle)
    names = []
    for name, mod in model.named_modules():
        if linear_dims(mod) is None:
            continue
        where = layer_of(name, lpath)
        if where is not None and where in layers and any(_matches(name, t) for t in targets):
            names.append(name)
    if not names:
        exist = sorted(linear_modules([layer_list[x] for x in layers])[0])
        what = f"no linear module matches {','.join(targets)}" if targets else f"no default target ({source})"
        raise MergetoolError("--target-modules", f"{what} in layers {layers}; the layers' linear modules are "
                             f"{', '.join(exist) or 'none'}", "name some of them with --target-modules")
    return names


def fan_in_fan_out(model, names: list[str]) -> bool:
    """peft's ``fan_in_fan_out`` flag for these target modules: whether they are ``Conv1D`` (weights [in, out])."""
    mods = dict(model.named_modules())
    return any(is_conv1d(mods[n]) for n in names)


def run_template(model, spec: LoraSpec, names: list[str], base: str, fingerprint: str, per_example: bool) -> dict:
    """The metadata every expert of a run shares: kind, base and its fingerprint, the peft_config of the trained
    modules (``model``: the model or its skeleton), the training settings."""
    lpath = decoder_layers(model)[0]
    peft_cfg = {"r": spec.rank, "lora_alpha": spec.alpha, "use_rslora": False, "use_dora": spec.dora,
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
                "layers_to_transform": sorted({layer_of(n, lpath) for n in names}),
                "fan_in_fan_out": fan_in_fan_out(model, names)}
    return {"kind": "lora", "base_model": base, "base_fingerprint": fingerprint, "peft_config": peft_cfg,
            "training": {"lr": spec.lr, "epochs": spec.epochs, "seed": spec.seed,
                         "mode": "per-example" if per_example else "per-task"}}


def expert_meta(template: dict, name: str, task: str, **training) -> dict:
    """An expert's metadata: the run's ``template`` (kind, base, peft_config, training settings) with its name,
    task, and what its own training adds (example id, final loss, ...)."""
    return {**template, "name": name, "task": task, "training": {**template.get("training", {}), **training}}


def check_finite(u: Update) -> None:
    """A trained expert holding NaN or Inf is an error (the learning rate was too high), never an output."""
    bad = next((k for k, m in u.modules.items()
                if not all(bool(torch.isfinite(t).all()) for t in to_tensors(Update("", {k: m})).values())), None)
    if bad is not None:
        raise MergetoolError(u.name, f"training diverged: module {bad} holds NaN or Inf", "lower --lr")


def expert_seed(seed: int, example_id: str) -> int:
    """The initialisation seed of an example's expert: fixed by the run's seed and the example's id, so an
    expert is the same whichever batch it trains in (and after --resume)."""
    return zlib.crc32(f"{seed}:{example_id}".encode())


def training_pairs(examples) -> list[tuple[str, str]]:
    """Each example's (prompt, completion), the completion's tokens carrying the loss: a multiple-choice record's
    right choice, a generation record's target, a passage's text (with no prompt)."""
    out = []
    for e in examples:
        r = e.rec
        if e.kind == "mc":
            out.append((e.context or r["prompt"], r["choices"][r["answer"]]))
        elif e.kind == "gen":
            out.append((e.context or r["prompt"], r.get("target") or r["targets"][0]))
        else:
            out.append(("", r["text"]))
    return out


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
    (``scoring.logits_at``; padding and prompts cost nothing there), cross-entropy in fp32."""
    logits = logits_at(model, t.rows, t.pos, input_ids=ids, attention_mask=mask)
    ce = torch.nn.functional.cross_entropy(logits.float(), t.tgt, reduction="none")
    return torch.zeros(ids.shape[0], dtype=ce.dtype, device=ce.device).index_add_(0, t.rows, ce) / t.n


def train_stacked(model, tok, items: list[tuple[str, str]], spec: LoraSpec, names: list[str],
                  seeds: list[int], progress=None) -> tuple[RowAdapters, list[float]]:
    """Train len(items) experts at once, expert e on items[e] (a (prompt, completion) pair); the frozen layers
    below the adapted ones run once, on the first step. Returns the adapters (remove them when done) and each
    expert's final loss."""
    dev = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    own_head(model)  # decided before a frozen prefix is fed
    ad = RowAdapters.trainable(model, names, len(items), spec.rank, spec.scale, seeds, spec.dora)
    opt = torch.optim.AdamW(ad.parameters(), lr=spec.lr, weight_decay=0.0)
    ids, mask, lab = lm_batch(tok, items, dev)
    t = Targets(lab)
    prefix = Prefix(model, first_layer(model, names))
    hidden = prefix.states(input_ids=ids, attention_mask=mask) if prefix.first else None
    with prefix.feeding(hidden):
        for _ in range(spec.epochs):
            losses = model_row_losses(model, ids, mask, t)
            losses.sum().backward()  # each expert's gradient is its own mean loss's
            opt.step()
            opt.zero_grad(set_to_none=True)
            if progress:
                progress()
        with torch.no_grad():
            final = model_row_losses(model, ids, mask, t)
    return ad, [float(x) for x in final.tolist()]


def train_examples(model, tok, exs, spec: LoraSpec, names: list[str], template: dict,
                   keep_if_correct: bool = False) -> list[tuple[str, bytes | None, float]]:
    """Per-example experts, trained together (``train_stacked``), expert e on the text of ``exs[e]``: each as
    (example id, its safetensors blob, or None when ``keep_if_correct`` drops an expert that misses its own
    question, final loss). ``template``: the experts' metadata (``expert_meta``)."""
    ad, losses = train_stacked(model, tok, [("", e.rec["text"]) for e in exs], spec, names,
                               [expert_seed(spec.seed, e.id) for e in exs])
    try:
        ok = [True] * len(exs)
        if keep_if_correct:
            scores = stacked_choice_scores(model, tok, ad, [e.rec for e in exs])
            ok = [max(range(len(sc)), key=sc.__getitem__) == e.rec["answer"] for sc, e in zip(scores, exs)]
        out = []
        for i, e in enumerate(exs):
            blob = None
            if ok[i]:
                u = ad.expert(i, e.id, expert_meta(template, e.id, e.task, example=e.id, final_loss=losses[i]))
                check_finite(u)
                blob = blob_bytes(to_tensors(u), metadata_for(u))
            out.append((e.id, blob, losses[i]))
        return out
    finally:
        ad.remove()


@torch.no_grad()
def stacked_choice_scores(model, tok, ad: RowAdapters, recs: list[dict], norm: str = "tokens") -> list[list[float]]:
    """Expert e scores the choices of recs[e] (its own question): all experts in one batched pass, one job per
    expert (``scoring.choice_loglikelihoods``)."""
    from .evaluate import choose
    from .scoring import choice_loglikelihoods, encode_choices

    items = encode_choices(tok, [(r["prompt"], r["choices"]) for r in recs])
    lls = choice_loglikelihoods(model, items, [(e, [e]) for e in range(len(recs))], ad, batch_tokens=1 << 30)
    return [choose(ll[0], r["choices"], norm) for ll, r in zip(lls, recs)]


def train_task(model, tok, items: list[tuple[str, str]], spec: LoraSpec, names: list[str], progress=None):
    """One expert on a whole task (mini-batches of ``spec.batch_size``), the same machinery with one expert
    that every row uses."""
    dev = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    ad = RowAdapters.trainable(model, names, 1, spec.rank, spec.scale, [spec.seed], spec.dora)
    ad.use(0)
    opt = torch.optim.AdamW(ad.parameters(), lr=spec.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(spec.seed)
    loss = float("nan")
    for _ in range(spec.epochs):
        order = torch.randperm(len(items), generator=g).tolist()
        for s in range(0, len(order), spec.batch_size):
            batch = [items[i] for i in order[s:s + spec.batch_size]]
            ids, mask, lab = lm_batch(tok, batch, dev)
            lo = model_row_losses(model, ids, mask, Targets(lab)).mean()
            lo.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(lo.detach())
            if progress:
                progress()
    return ad, loss
