"""The update type: a task vector as per-module low-rank factors or dense deltas.

An :class:`Update` maps module names (PEFT key prefixes such as
``base_model.model.model.layers.14.mlp.up_proj``) to either

* :class:`LowRank` ``(A [r, in], B [out, r], scale)`` with effective update ΔW = scale · B @ A, or
* :class:`Dense` ``delta [out, in]`` (any shape; a full model's task vector holds every tensor).

Every merge method works on ΔW with its scale, in fp32. This module turns safetensors blobs into updates
and back (PEFT key names, self-describing metadata); ``inputs`` reads every form of input.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from .errors import MergetoolError
from .io import FLOAT_DTYPES, Blob

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


# ----------------------------------------------------------------------------- PEFT scale


def _pattern_value(patterns: dict, module: str, default):
    target = module[len(PREFIX):] if module.startswith(PREFIX) else module
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?{pat}$", target):
            return val
    return default


def lora_scale(cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rslora (per-module patterns honoured)."""
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


# ----------------------------------------------------------------------------- blobs <-> updates


def _check_float(name: str, t: torch.Tensor, source: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise MergetoolError(source, f"tensor {name!r} has dtype {t.dtype} (a floating type is needed)",
                             "adapters hold float32, float16 or bfloat16 tensors")
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise MergetoolError(source, f"tensor {name!r} holds NaN or Inf", "the adapter is broken; retrain or re-export it")


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict, name: str, source: str,
                 peft_config: dict | None = None) -> Update:
    """Build an update from PEFT-named (``*.lora_A.weight``/``*.lora_B.weight``) or ``*.delta`` tensors."""
    cfg = peft_config if peft_config is not None else meta.get("peft_config")
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
        except json.JSONDecodeError:
            raise MergetoolError(blob.source, "metadata 'mergetool' is not valid JSON", "rewrite the metadata") from None
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
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
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


def save_peft(update: Update, out_dir: str) -> None:
    """Write a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained`` loads; built beside ``out_dir`` and moved into place when complete."""
    from .io import atomic_dir, write_blob

    with atomic_dir(out_dir) as d:
        cfg = folded_peft_config(update, update.meta.get("base_model"))
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        with open(d / "adapter_model.safetensors", "wb") as fh:
            write_blob(fh, to_tensors(update), metadata_for(update))
