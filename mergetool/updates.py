"""The update type: a task vector as per-module low-rank factors or dense deltas.

An :class:`Update` maps module names (PEFT key prefixes such as
``base_model.model.model.layers.14.mlp.up_proj``) to either

* :class:`LowRank` ``(A [r, in], B [out, r], scale)`` with effective update ΔW = scale · B @ A, or
* :class:`Dense` ``delta [out, in]`` (any shape; a full model's task vector holds every tensor).

Every merge method works on ΔW with its scale, in fp32. This module turns safetensors blobs into updates
and back (PEFT key names, self-describing metadata); ``inputs`` reads every form of input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .errors import MergetoolError
from .blobs import FLOAT_DTYPES, Blob

log = logging.getLogger("mergetool")

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass
class LowRank:
    """ΔW = scale · B @ A."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, device=None, dtype=torch.float32) -> torch.Tensor:
        A = self.A.to(device=device, dtype=dtype)
        B = self.B.to(device=device, dtype=dtype)
        return (B * self.scale) @ A

    def to(self, device) -> "LowRank":
        return LowRank(self.A.to(device), self.B.to(device), self.scale)

    def svdvals(self) -> torch.Tensor:
        """Singular values of ΔW (fp64), from the factors: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QRs),
        ΔW = scale · Q_B (R_B R_Aᵀ) Q_Aᵀ has the singular values of the r×r core, whatever the layer's width."""
        _, rb = torch.linalg.qr(self.B.double() * self.scale)
        _, ra = torch.linalg.qr(self.A.double().T)
        return torch.linalg.svdvals(rb @ ra.T)


@dataclass
class Dense:
    """A full delta; ``loader`` computes it on demand (full models are streamed, never held whole)."""

    tensor: torch.Tensor | None = None
    loader: Callable[[torch.device | str], torch.Tensor] | None = None
    shape_: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape) if self.tensor is not None else tuple(self.shape_)

    def delta(self, device=None, dtype=torch.float32) -> torch.Tensor:
        t = self.tensor if self.tensor is not None else self.loader(device or "cpu")
        return t.to(device=device, dtype=dtype)

    def to(self, device) -> "Dense":
        return Dense(self.tensor.to(device)) if self.tensor is not None else self

    def svdvals(self) -> torch.Tensor:
        """Singular values of a matrix delta (fp64); a vector's (a norm or bias delta) is its norm."""
        d = self.delta(dtype=torch.float64)
        return torch.linalg.svdvals(d) if d.dim() == 2 else d.reshape(-1).norm().reshape(1)


Module = Union[LowRank, Dense]


@dataclass
class Update:
    name: str
    modules: dict[str, Module]
    meta: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @property
    def kind(self) -> str:
        return "lora" if all(isinstance(m, LowRank) for m in self.modules.values()) else "dense"

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("base_fingerprint")

    def to(self, device) -> "Update":
        return Update(self.name, {k: m.to(device) for k, m in self.modules.items()}, self.meta, self.dtype)

    def digest(self) -> str:
        """Hash of what the update does (its modules' names, kinds, scales, shapes and values; not its name):
        tensors up to 16 MiB whole, larger ones by a strided sample of a million values; a full model's delta,
        read only on demand, by its weights' content digest (``meta['content']``)."""
        h = hashlib.sha256()
        for k in sorted(self.modules):
            m = self.modules[k]
            if isinstance(m, LowRank):
                h.update(f"{k}|lora|{m.scale!r}|".encode())
                tensors = [m.A, m.B]
            elif m.tensor is not None:
                h.update(f"{k}|dense|".encode())
                tensors = [m.tensor]
            else:
                h.update(f"{k}|dense|{tuple(m.shape)}|{self.meta.get('content')}".encode())
                tensors = []
            for t in tensors:
                t = t.detach().contiguous().reshape(-1)
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                if t.numel() * t.element_size() > 16 * 2**20:
                    t = t[:: t.numel() // 2**20 + 1].contiguous()
                h.update(t.cpu().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


def adapter_stats(u: Update) -> dict:
    """An update's own statistics (score and diagnose report them): ‖ΔW‖_F (all modules), σ_max (the largest
    module's), and the effective rank exp(H(σ/Σσ)) (Roy and Vetterli), averaged over the modules; from the
    factors for LoRA modules."""
    sq, top, ranks = 0.0, 0.0, []
    for m in u.modules.values():
        s = m.svdvals()
        sq += float(s.pow(2).sum())
        if s.numel():
            top = max(top, float(s.max()))
        t = float(s.sum())
        if t > 0 and s.numel() > 1:
            p = s[s > 0] / t
            ranks.append(math.exp(float(-(p * p.log()).sum())))
    return {"norm_f": math.sqrt(sq), "sigma_max": top,
            "effective_rank": sum(ranks) / len(ranks) if ranks else None}


# ----------------------------------------------------------------------------- PEFT scale


def _pattern_value(patterns: dict, module: str, default):
    target = module[len(PREFIX):] if module.startswith(PREFIX) else module
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pat}$", target):
            return val
    return default


def lora_scale(cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rslora (per-module patterns honoured).
    ``cfg`` has passed :func:`check_peft_config`; a missing (or null) lora_alpha is r (scale 1)."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} has no scale")
    default = cfg.get("lora_alpha")
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, rank if default is None else default)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _shown(x) -> str:
    try:
        text = json.dumps(x)
    except (TypeError, ValueError):
        text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_amount(x) -> bool:
    """A finite number >= 0 (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def check_peft_config(cfg, what: str, label: str = "peft_config ") -> dict:
    """Type-check the LoRA config fields that set an adapter's scale (r, lora_alpha, use_rslora, alpha_pattern,
    rank_pattern), so a wrong one is one line naming ``what`` and the field, never a TypeError later. Null
    fields count as absent. ``label`` prefixes the field names (``"peft_config "`` inside adapter metadata)."""
    if not isinstance(cfg, dict):
        raise MergetoolError(what, f"{label.strip() or 'the config'} is not a JSON object (got {_shown(cfg)})",
                             "write the LoRA config as an object")

    def bad(key: str, must: str, got) -> MergetoolError:
        return MergetoolError(what, f"{label}field {key!r} must be {must}, got {_shown(got)}",
                              "fix the LoRA config")

    if cfg.get("target_parameters"):  # peft's LoRA on MoE experts' stacked 3-D weights (ParamWrapper)
        raise MergetoolError(what, f"a LoRA on parameters ({label}target_parameters {_shown(cfg['target_parameters'])}:"
                             " MoE experts' stacked weights) is not supported", "train the adapter on target_modules "
                             "only (the attention, dense MLPs, shared experts)")
    if cfg.get("r") is not None and not (_is_int(cfg["r"]) and cfg["r"] >= 1):
        raise bad("r", "a positive integer", cfg["r"])
    if cfg.get("lora_alpha") is not None and not _is_amount(cfg["lora_alpha"]):
        raise bad("lora_alpha", "a finite number >= 0", cfg["lora_alpha"])
    if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
        raise bad("use_rslora", "true or false", cfg["use_rslora"])
    for name, ok, must in (("alpha_pattern", _is_amount, "finite numbers >= 0"),
                           ("rank_pattern", lambda v: _is_int(v) and v >= 1, "positive integers")):
        pat = cfg.get(name)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise bad(name, "an object (module pattern -> value)", pat)
        for k, v in pat.items():
            if not ok(v):
                raise bad(name, f"an object of {must}", {k: v})
            try:
                re.compile(rf"(.*\.)?{k}$")
            except (re.error, RecursionError, OverflowError, ValueError):
                raise MergetoolError(what, f"{label}field {name!r}: {_shown(k)} is not a valid module pattern "
                                     "(a regular expression)", "fix the LoRA config") from None
    return cfg


# ----------------------------------------------------------------------------- blobs <-> updates


def _check_float(name: str, t: torch.Tensor, source: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise MergetoolError(source, f"tensor {name!r} has dtype {t.dtype} (a floating type is needed)",
                             "adapters hold float32, float16 or bfloat16 tensors")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise MergetoolError(source, f"tensor {name!r} holds NaN or Inf", "the adapter is broken; retrain or re-export it")


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict, name: str, source: str,
                 peft_config: dict | None = None) -> Update:
    """Build an update from PEFT-named (``*.lora_A.weight``/``*.lora_B.weight``) or ``*.delta`` tensors. The
    metadata fields that are read later (name, task, base model and fingerprint, training example) and the LoRA
    config are type-checked here: a wrong type is one line naming the field."""
    for key in ("name", "task", "base_model", "base_fingerprint", "example"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise MergetoolError(source, f"metadata field {key!r} must be a string, got {_shown(meta[key])}",
                                 "rewrite the adapter's metadata")
    training = meta.get("training")
    if training is not None and (not isinstance(training, dict) or
                                 training.get("example") is not None and not isinstance(training["example"], str)):
        raise MergetoolError(source, f"metadata field 'training' must be an object (its 'example' a string), got "
                             f"{_shown(training)}", "rewrite the adapter's metadata")
    cfg = peft_config if peft_config is not None else meta.get("peft_config")
    if cfg is not None:
        check_peft_config(cfg, source)
    guessed = cfg is None and any(".lora_" in k for k in tensors)
    cfg = {} if guessed else cfg
    halves: dict[str, dict[str, torch.Tensor]] = {}
    modules: dict[str, Module] = {}
    dtypes = set()
    for key, t in tensors.items():
        _check_float(key, t, source)
        dtypes.add(t.dtype)
        m = _LORA_KEY.match(key)
        if m:
            halves.setdefault(m["mod"], {})[m["ab"]] = t
        elif key.endswith(".delta"):
            modules[key[: -len(".delta")]] = Dense(t)
        else:
            raise MergetoolError(source, f"unsupported tensor {key!r}",
                                 "adapters hold *.lora_A.weight / *.lora_B.weight or *.delta tensors")
    for mod, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise MergetoolError(source, f"module {mod!r} has lora_{''.join(ab)} without its pair",
                                 "each LoRA module needs lora_A and lora_B")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergetoolError(source, f"module {mod!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                                 "have mismatched ranks", "lora_A is [r, in] and lora_B is [out, r]")
        if A.shape[0] == 0:
            raise MergetoolError(source, f"module {mod!r} has rank 0 (lora_A {tuple(A.shape)})",
                                 "drop the module, or give it rank >= 1")
        if mod in modules:
            raise MergetoolError(source, f"module {mod!r} is both LoRA and dense", "keep one form per module")
        modules[mod] = LowRank(A, B, lora_scale(cfg, mod, A.shape[0]))
    if not modules:
        raise MergetoolError(source, "holds no tensors", "pass an adapter")
    if guessed:
        log.warning("%s: no peft_config in the metadata; assuming lora_alpha = r (scale 1)", source)
    meta = dict(meta)
    if cfg is not None and "peft_config" not in meta:
        meta["peft_config"] = cfg
    widest = max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
    return Update(meta.get("name") or name, modules, meta, widest)


def from_blob(blob: Blob, default_name: str) -> Update:
    raw = blob.metadata.get("mergetool")
    meta: dict = {}
    if raw is not None:
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError, too many digits, too deep
            raise MergetoolError(blob.source, "metadata 'mergetool' is not valid JSON",
                                 "rewrite the metadata") from None
        if not isinstance(meta, dict):
            raise MergetoolError(blob.source, "metadata 'mergetool' is not a JSON object", "rewrite the metadata")
    return from_tensors(blob.tensors, meta, default_name, blob.source)


def to_tensors(update: Update, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT-named tensors of an update (LoRA factors with scale folded into B), cast to ``dtype``."""
    dtype = dtype or update.dtype
    out: dict[str, torch.Tensor] = {}
    for mod, m in update.modules.items():
        if isinstance(m, LowRank):
            out[f"{mod}.lora_A.weight"] = m.A.to("cpu", dtype).contiguous()
            out[f"{mod}.lora_B.weight"] = (m.B.float() * m.scale).to("cpu", dtype).contiguous()
        else:
            out[f"{mod}.delta"] = m.delta("cpu").to(dtype).contiguous()
    return out


def folded_peft_config(update: Update, base_model: str | None) -> dict:
    """A PEFT LoRA config whose scale is 1 in every module (alpha = r), with per-module ranks."""
    ranks = {mod[len(PREFIX):] if mod.startswith(PREFIX) else mod: m.rank
             for mod, m in update.modules.items() if isinstance(m, LowRank)}
    r = max(ranks.values())
    targets = sorted({k.rsplit(".", 1)[-1] for k in ranks})
    pattern = {re.escape(k): v for k, v in ranks.items() if v != r}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": bool((update.meta.get("peft_config") or {}).get("fan_in_fan_out", False)),
        "base_model_name_or_path": base_model, "inference_mode": True,
        "layers_to_transform": sorted({int(x) for k in ranks for x in re.findall(r"\.layers\.(\d+)\.", k)}) or None,
    }


def metadata_for(update: Update) -> dict[str, str]:
    meta = dict(update.meta)
    meta["name"] = update.name
    meta["kind"] = update.kind
    if update.kind == "lora":
        meta["peft_config"] = folded_peft_config(update, meta.get("base_model"))
    else:
        meta.pop("peft_config", None)
    return {"format": "pt", "mergetool": json.dumps(meta, sort_keys=True)}


def save_peft(update: Update, d) -> None:
    """Write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained`` loads into the directory ``d`` (a ``Path``; ``outputs.atomic_dir`` gives one that
    moves into place when complete)."""
    from .blobs import write_blob

    cfg = folded_peft_config(update, update.meta.get("base_model"))
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    with open(d / "adapter_model.safetensors", "wb") as fh:
        write_blob(fh, to_tensors(update), metadata_for(update))
