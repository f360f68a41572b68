"""The update type: a task vector as per-module low-rank factors or dense deltas.

An :class:`Update` maps module names (PEFT key prefixes such as
``base_model.model.model.layers.14.mlp.up_proj``) to either

* :class:`LowRank` ``(A [r, in], B [out, r], scale)`` with effective update ΔW = scale · B @ A, or
* :class:`Dense` ``delta [out, in]`` (any shape; a full model's task vector holds every tensor).

Every merge method works on ΔW with its scale, in fp32. Updates come from safetensors blobs
(files or ``-`` streams), PEFT adapter directories, full fine-tuned model directories (their task
vector against ``--base``, read tensor by tensor), or directories of adapters (a pool).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import torch

from .errors import MergetoolError, UsageError
from .io import FLOAT_DTYPES, Blob, read_blobs

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


# ----------------------------------------------------------------------------- inputs


def _peft_dir(path: Path) -> Update:
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MergetoolError(str(path), f"unreadable adapter_config.json ({e.__class__.__name__})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergetoolError(str(path), f"peft_type {cfg.get('peft_type')} is not supported", "only LoRA adapters merge")
    st = path / "adapter_model.safetensors"
    if not st.exists():
        if (path / "adapter_model.bin").exists():
            raise MergetoolError(str(path), "holds adapter_model.bin (pickle) only",
                                 "convert it to safetensors; mergetool never unpickles")
        raise MergetoolError(str(path), "has no adapter_model.safetensors", "pass a complete PEFT directory")
    blobs = read_blobs(str(st))
    meta = {"base_model": cfg.get("base_model_name_or_path")}
    embedded = blobs[0].metadata.get("mergetool")
    if embedded:
        try:
            meta.update(json.loads(embedded))
        except json.JSONDecodeError:
            pass
    return from_tensors(blobs[0].tensors, meta, path.name, str(path), peft_config=cfg)


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").exists() and not (p / "adapter_config.json").exists()


def load_inputs(paths: list[str], base=None, allow_pickle: bool = False) -> list[Update]:
    """Load every input (file, ``-``, PEFT dir, full model dir, pool dir) into updates, in order."""
    if sum(p == "-" for p in paths) > 1:
        raise UsageError("inputs", "'-' given more than once", "stdin can be read once")
    out: list[Update] = []
    for src in paths:
        if src == "-":
            out += [from_blob(b, f"stdin-{i + 1}") for i, b in enumerate(read_blobs("-"))]
            continue
        p = Path(src)
        if not p.exists():
            raise MergetoolError(src, "no such file or directory", "check the path")
        if p.is_dir():
            if (p / "adapter_config.json").exists():
                out.append(_peft_dir(p))
            elif _is_model_dir(p):
                from .model import task_vector

                out.append(task_vector(p, base, allow_pickle=allow_pickle))
            else:
                members = sorted(x for x in p.iterdir()
                                 if x.suffix == ".safetensors" or (x.is_dir() and (x / "adapter_config.json").exists()))
                if not members:
                    raise MergetoolError(src, "directory holds no adapters",
                                         "a pool holds .safetensors files or PEFT directories")
                out += load_inputs([str(m) for m in members], base, allow_pickle)
        elif p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise MergetoolError(src, "pickle files are refused", "convert it to safetensors")
        else:
            blobs = read_blobs(src)
            stem = p.name[: -len(".safetensors")] if p.name.endswith(".safetensors") else p.stem
            out += [from_blob(b, stem if len(blobs) == 1 else f"{stem}-{i + 1}") for i, b in enumerate(blobs)]
    return out


def check_compatible(updates: list[Update], base_fingerprint: str | None = None) -> None:
    """Refuse updates of different bases or incompatible shapes."""
    fps = {u.name: u.fingerprint for u in updates if u.fingerprint}
    if base_fingerprint:
        for n, fp in fps.items():
            if fp != base_fingerprint:
                raise MergetoolError(n, f"was trained on another base (fingerprint {fp}, --base is {base_fingerprint})",
                                     "merge adapters of the same base model")
    if len(set(fps.values())) > 1:
        a, b = list(fps.items())[0], next((x for x in fps.items() if x[1] != list(fps.values())[0]))
        raise MergetoolError(b[0], f"has base fingerprint {b[1]}, but {a[0]} has {a[1]}",
                             "merge adapters of the same base model")
    shapes: dict[str, tuple[str, tuple]] = {}
    for u in updates:
        for mod, m in u.modules.items():
            if mod in shapes and shapes[mod][1] != tuple(m.shape):
                raise MergetoolError(u.name, f"module {mod} has shape {tuple(m.shape)}, but {shapes[mod][0]} has "
                                     f"{shapes[mod][1]}", "merge adapters of the same base model")
            shapes.setdefault(mod, (u.name, tuple(m.shape)))
