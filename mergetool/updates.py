"""The update type: a task vector as per-module low-rank factors or dense deltas.

An :class:`Update` maps module names (PEFT key prefixes such as
``base_model.model.model.layers.14.mlp.up_proj``) to one of

* :class:`LowRank` ``(A [r, in], B [out, r], scale)`` with effective update ΔW = scale · B @ A (a LoRA; on an
  embedding, peft's ``lora_embedding_A/B`` in the weight's own [num_embeddings, dim] layout),
* :class:`Dense` ``delta [out, in]`` (any shape; a full model's task vector holds every tensor),
* :class:`Dora` a DoRA module: LoRA factors and a magnitude m, W' = (m / ‖W + scale·B A‖) ⊙ (W + scale·B A)
  row by row, so its update ΔW = W' − W depends on the base weight W,
* :class:`Full` a tensor's new value as PEFT saves it (``modules_to_save``, trained biases): ΔW = value − W.

``Dora`` and ``Full`` are dense deltas that need the base: :func:`bind` gives them a reader of the base's
tensors (``inputs`` does when a base is known; the per-row adapters use the running model's own weights), and
every code path that does not know them sees their effective ΔW. Every merge method works on ΔW with its
scale, in fp32. This module turns safetensors blobs into updates and back (PEFT key names, self-describing
metadata, PEFT directories); ``inputs`` reads every form of input.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Union

import torch

from .errors import MergetoolError
from .blobs import FLOAT_DTYPES, Blob, all_finite

log = logging.getLogger("mergetool")

PREFIX = "base_model.model."
_NAME = r"(?:\.[A-Za-z0-9_-]+)?"  # peft's adapter name inside a key (absent in saved files)
_LORA_KEY = re.compile(rf"^(?P<mod>.+)\.lora_(?P<ab>[AB]){_NAME}\.weight$")
_LORA_BIAS = re.compile(rf"^(?P<mod>.+)\.lora_B{_NAME}\.bias$")
_EMBED_KEY = re.compile(rf"^(?P<mod>.+)\.lora_embedding_(?P<ab>[AB]){_NAME}$")
_MAGNITUDE = re.compile(rf"^(?P<mod>.+)\.lora_magnitude_vector{_NAME}(?:\.weight)?$")

class BaseTensors(Protocol):
    """A base model's tensors by parameter name (``model.layers.0.self_attn.q_proj.weight``)."""

    def read(self, param: str, device) -> torch.Tensor: ...

    def shape(self, param: str) -> tuple[int, ...] | None: ...  # None: the base has no such tensor

    def transposed(self, param: str) -> bool: ...  # stored [in, out] (a Conv1D weight; read as [out, in])


def module_of(param: str) -> str:
    """PEFT-style module key of a model parameter (``x.weight`` -> ``base_model.model.x``; ``x.bias`` stays)."""
    return PREFIX + (param[: -len(".weight")] if param.endswith(".weight") else param)


def _stripped(mod: str) -> str:
    return mod[len(PREFIX):] if mod.startswith(PREFIX) else mod


@dataclass
class LowRank:
    """ΔW = scale · B @ A. ``embedding``: peft's ``lora_embedding_A`` [r, num] and ``lora_embedding_B`` [dim, r],
    held in the embedding weight's layout [num, dim]: B = lora_embedding_Aᵀ, A = lora_embedding_Bᵀ."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float = 1.0
    embedding: bool = False

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
        return replace(self, A=self.A.to(device), B=self.B.to(device))

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


@dataclass
class OnBase(Dense):
    """A dense delta computed from the base's tensor ``param`` (read by ``base``, bound by :func:`bind`, or given
    to ``delta`` by whoever holds the weight); ``source`` names the adapter in the error when no base is bound."""

    param: str = ""
    base: BaseTensors | None = None
    source: str = ""

    def weight(self, device=None, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            if self.base is None:
                raise self.unbound(self.source)
            base = self.base.read(self.param, device or "cpu")
        return base.to(device=device, dtype=torch.float32)

    def unbound(self, name: str) -> MergetoolError:
        return MergetoolError(name, f"{self.needs} the base model's weights", "pass --base MODEL")

    def to(self, device) -> "OnBase":
        return self


@dataclass
class Full(OnBase):
    """A tensor's new value as PEFT saves it (``modules_to_save``, a trained bias): ΔW = value − W."""

    value: torch.Tensor | None = None

    @property
    def needs(self) -> str:
        return f"full tensors (modules_to_save, trained biases: {self.param}) are task vectors against"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def delta(self, device=None, dtype=torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        return (self.value.to(device=device, dtype=torch.float32) - self.weight(device, base)).to(dtype)


@dataclass
class Dora(OnBase):
    """DoRA (Liu et al. 2024, as peft computes it): W' = (m / ‖W + scale·B A‖) ⊙ (W + scale·B A), the norm and m
    per output row (per embedding dimension, a column, for an embedding), so ΔW = W' − W. ``lora`` holds the
    factors (its ``embedding`` flag the layout), ``magnitude`` m."""

    lora: LowRank | None = None
    magnitude: torch.Tensor | None = None
    needs = "DoRA adapters rescale W + ΔW row by row (their magnitude over its norm), so they need"

    @property
    def shape(self) -> tuple[int, int]:
        return self.lora.shape

    def factor(self, device=None, base: torch.Tensor | None = None) -> torch.Tensor:
        """g = m / ‖W + scale·B A‖ (fp32), the factor of each row (column for an embedding) of W + scale·B A."""
        return self.magnitude.to(device, torch.float32) / dora_norms(self.weight(device, base), self.lora)

    def delta(self, device=None, dtype=torch.float32, base: torch.Tensor | None = None) -> torch.Tensor:
        W = self.weight(device, base)
        g = self.factor(device, W)
        V = W + self.lora.delta(device)
        return ((V * g if self.lora.embedding else V * g[:, None]) - W).to(dtype)


def dora_norms(W: torch.Tensor, lora: LowRank) -> torch.Tensor:
    """‖W + scale·B A‖ as DoRA takes it: per output row, or per embedding dimension (a column) of an embedding."""
    W = W.float()
    A, Bs = lora.A.to(W.device, torch.float32), lora.B.to(W.device, torch.float32) * lora.scale
    return row_norms(W.T, Bs.T, A.T) if lora.embedding else row_norms(W, A, Bs)


def row_norms(W: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
    """‖W + Bs A‖ of each row (fp32), from the factors: ‖W_i‖² + 2 Bs_i·(W Aᵀ)_i + Bs_i (A Aᵀ) Bs_iᵀ, never
    the dense [out, in] sum; A [..., r, in] and Bs [..., out, r] may carry a batch of experts."""
    W, A, Bs = W.float(), A.float(), Bs.float()
    At = A.transpose(-1, -2)
    sq = (W * W).sum(-1) + 2 * (Bs * (W @ At)).sum(-1) + ((Bs @ (A @ At)) * Bs).sum(-1)
    return sq.clamp_min(0).sqrt()


Module = Union[LowRank, Dense]


def lora_like(m) -> bool:
    """A LoRA or a DoRA module (PEFT writes both as factors)."""
    return isinstance(m, (LowRank, Dora))


def lora_of(m) -> LowRank | None:
    """A module's LoRA factors: a LoRA's own, a DoRA's direction; None for a dense module."""
    return m.lora if isinstance(m, Dora) else m if isinstance(m, LowRank) else None


def combine(terms: list[tuple[float, Module]], device) -> Module | None:
    """Σ c_i ΔW_i of the LoRA and DoRA modules of one weight W, exactly, in factors: LoRAs as one LoRA of rank
    Σ r_i (concatenated factors); LoRAs and DoRAs of a linear weight as one DoRA. With g_i the DoRA factor of
    term i (1 for a LoRA), W + Σ c_i (W'_i − W) = diag(G) (W + B'A') with G = 1 + Σ c_i (g_i − 1),
    B' = diag(1/G) [c_1 g_1 s_1 B_1 … c_n g_n s_n B_n], A' = [A_1; …; A_n], so the DoRA
    (A', B', m' = G ‖W + B'A'‖) is the combination. None where the terms are not all LoRA and DoRA, mix layouts,
    or some G is near 0."""
    loras = [lora_of(m) for _, m in terms]
    if any(lr is None for lr in loras) or len({lr.embedding for lr in loras}) != 1:
        return None
    if not any(isinstance(m, Dora) for _, m in terms):
        B = torch.cat([lr.B.to(device, torch.float32) * (c * lr.scale) for (c, _), lr in zip(terms, loras)], 1)
        return LowRank(torch.cat([lr.A.to(device, torch.float32) for lr in loras], 0), B, 1.0, loras[0].embedding)
    if loras[0].embedding:
        return None
    dora = next(m for _, m in terms if isinstance(m, Dora))
    W = dora.weight(device)
    G = torch.ones(W.shape[0], device=W.device)
    Bs = []
    for (c, m), lr in zip(terms, loras):
        g = m.factor(W.device, W) if isinstance(m, Dora) else torch.ones_like(G)
        G = G + c * (g - 1)
        Bs.append(lr.B.to(W.device, torch.float32) * (c * lr.scale) * g[:, None])
    if float(G.abs().min()) < 1e-4:
        return None
    lora = LowRank(torch.cat([lr.A.to(W.device, torch.float32) for lr in loras], 0), torch.cat(Bs, 1) / G[:, None])
    return Dora(param=dora.param, base=dora.base, source=dora.source, lora=lora, magnitude=G * dora_norms(W, lora))


def bind(u: "Update", base: BaseTensors) -> None:
    """Give ``u``'s DoRA and full-tensor modules the base's tensors, each checked against the base's shapes; the
    base copies the adapter carries (``u.copies``) must equal the base's."""
    for mod, m in u.modules.items():
        if isinstance(m, OnBase):
            shape = base.shape(m.param)
            if isinstance(m, Full) and base.transposed(m.param):
                raise MergetoolError(u.name, f"module {_stripped(mod)}: a full tensor (modules_to_save) of a Conv1D "
                                     "module is not supported", "leave Conv1D modules out of modules_to_save")
            if shape is None:
                raise MergetoolError(u.name, f"module {_stripped(mod)} is not in the base model",
                                     "use an update of this base")
            if tuple(shape) != tuple(m.shape):
                raise MergetoolError(u.name, f"module {_stripped(mod)}: update {tuple(m.shape)} vs weight "
                                     f"{tuple(shape)}", "use an update of this base")
            m.base = base
    for param, t in u.copies.items():
        if base.shape(param) is None:
            raise MergetoolError(u.name, f"module {param} is not in the base model", "use an update of this base")
        check_copy(u.name, param, t, base.read(param, "cpu"))


def check_bound(updates: list["Update"]) -> None:
    """Refuse, before any work, updates whose DoRA or full-tensor modules have no base to compute ΔW against."""
    for u in updates:
        m = next((m for m in u.modules.values() if isinstance(m, OnBase) and m.base is None), None)
        if m is not None:
            raise m.unbound(u.name)


def check_copy(name: str, param: str, copy: torch.Tensor, base: torch.Tensor) -> None:
    """peft saves a targeted embedding's base weights beside its LoRA (``base_layer.weight``): they must be the
    base's own (within bf16 rounding), or the adapter belongs to another base (or a resized vocabulary)."""
    if tuple(copy.shape) != tuple(base.shape) or \
            float((copy.float() - base.float()).norm()) > 1e-2 * float(base.float().norm()) + 1e-6:
        raise MergetoolError(name, f"its copy of the base's {param} differs from the base's",
                             "use the base the adapter was trained on (a resized vocabulary is not supported)")


@dataclass
class Update:
    name: str
    modules: dict[str, Module]
    meta: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    # The base's own tensors the adapter file carries (peft's base_layer copies of a targeted embedding), by
    # parameter name: checked against the base where it is known (:func:`bind`), never applied.
    copies: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``lora`` when every module is a LoRA or DoRA (PEFT holds it as factors), else ``dense``."""
        return "lora" if all(lora_like(m) for m in self.modules.values()) else "dense"

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("base_fingerprint")

    def to(self, device) -> "Update":
        return Update(self.name, {k: m.to(device) for k, m in self.modules.items()}, self.meta, self.dtype,
                      self.copies)

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
            elif isinstance(m, Dora):
                h.update(f"{k}|dora|{m.lora.scale!r}|".encode())
                tensors = [m.lora.A, m.lora.B, m.magnitude]
            elif isinstance(m, Full):
                h.update(f"{k}|full|{m.param}|".encode())
                tensors = [m.value]
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
    """The value of the first pattern that matches the module's name, as peft's ``get_pattern_key`` (the
    pattern grouped, so an alternation ``q_proj|v_proj`` must match the name's end as a whole)."""
    target = _stripped(module)
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", target):
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
                re.compile(rf"(.*\.)?({k})$")
            except (re.error, RecursionError, OverflowError, ValueError):
                raise MergetoolError(what, f"{label}field {name!r}: {_shown(k)} is not a valid module pattern "
                                     "(a regular expression)", "fix the LoRA config") from None
    for key in ("use_dora", "lora_bias"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false", cfg[key])
    if cfg.get("bias") not in (None, "none", "all", "lora_only"):
        raise bad("bias", '"none", "all" or "lora_only"', cfg["bias"])
    for key, kind in VARIANTS.items():
        if cfg.get(key) not in (None, False, {}, []):
            raise MergetoolError(what, f"{kind} adapters are not supported ({label}field {key!r} is set)",
                                 "mergetool reads LoRA adapters: plain, rsLoRA, DoRA, with patterns, biases, "
                                 "embeddings and modules_to_save")
    init = cfg.get("init_lora_weights")
    kind = next((v for k, v in CHANGED_BASE.items() if isinstance(init, str) and init.lower().startswith(k)), None)
    if kind is not None:
        raise MergetoolError(what, f"{kind} adapters are not supported: they are trained against a changed base "
                             f"({label}field 'init_lora_weights' is {init!r})",
                             "convert it to a plain LoRA first (peft's save_pretrained with "
                             "path_initial_model_for_weight_conversion)")
    return cfg


# peft_config fields of the LoRA variants whose forward is not LoRA's or DoRA's, with the variant's name.
VARIANTS = {"use_qalora": "QA-LoRA", "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow",
            "velora_config": "VeLoRA", "use_bdlora": "BD-LoRA", "monteclora_config": "MonteCLoRA",
            "kasa_config": "KaSA", "mica": "MiCA", "trainable_token_indices": "Trainable-token",
            "layer_replication": "Layer-replication"}
# Initialisations that change the base weights the adapter is trained against (the residual W − BA).
CHANGED_BASE = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ", "lora_ga": "LoRA-GA"}


# ----------------------------------------------------------------------------- blobs <-> updates


def _check_float(name: str, t: torch.Tensor, source: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise MergetoolError(source, f"tensor {name!r} has dtype {t.dtype} (a floating type is needed)",
                             "adapters hold float32, float16 or bfloat16 tensors")
    if not all_finite(t):
        raise MergetoolError(source, f"tensor {name!r} holds NaN or Inf", "the adapter is broken; retrain or re-export it")


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict, name: str, source: str,
                 peft_config: dict | None = None) -> Update:
    """Build an update from PEFT-named tensors (``*.lora_A.weight``/``*.lora_B.weight``, DoRA's
    ``*.lora_magnitude_vector``, ``*.lora_embedding_A/B``, ``*.lora_B.bias``, and full tensors such as
    ``modules_to_save`` weights and trained biases) or ``*.delta`` tensors. The metadata fields that are read
    later (name, task, base model and fingerprint, training example) and the LoRA config are type-checked here:
    a wrong type is one line naming the field."""
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
    halves: dict[str, dict[str, torch.Tensor]] = {}  # module -> A, B (a linear LoRA) or eA, eB (an embedding's)
    magnitudes: dict[str, torch.Tensor] = {}
    lora_biases: dict[str, torch.Tensor] = {}
    full: dict[str, torch.Tensor] = {}  # parameter name -> its trained value
    copies: dict[str, torch.Tensor] = {}
    modules: dict[str, Module] = {}
    dtypes = set()
    for key, t in tensors.items():
        _check_float(key, t, source)
        dtypes.add(t.dtype)
        if m := _LORA_KEY.match(key):
            halves.setdefault(m["mod"], {})[m["ab"]] = t
        elif m := _EMBED_KEY.match(key):
            halves.setdefault(m["mod"], {})["e" + m["ab"]] = t
        elif m := _MAGNITUDE.match(key):
            magnitudes[m["mod"]] = t
        elif m := _LORA_BIAS.match(key):
            lora_biases[m["mod"]] = t
        elif key.endswith(".delta"):
            modules[key[: -len(".delta")]] = Dense(t)
        elif key.startswith(PREFIX) and ".lora_" not in key and "trainable_tokens" not in key:
            param = key[len(PREFIX):].replace(".base_layer.", ".")
            (copies if ".base_layer." in key and key.endswith(".weight") else full)[param] = t
        else:
            raise MergetoolError(source, f"unsupported tensor {key!r}",
                                 "adapters hold PEFT LoRA or DoRA tensors (*.lora_A.weight, *.lora_B.weight, ...), "
                                 "full tensors of modules_to_save, or *.delta tensors")
    for mod, ab in halves.items():
        emb = "eA" in ab or "eB" in ab
        a, b = ("eA", "eB") if emb else ("A", "B")
        kind = "lora_embedding_" if emb else "lora_"
        if set(ab) != {a, b}:
            raise MergetoolError(source, f"module {mod!r} has {', '.join(kind + k[-1] for k in sorted(ab))} without "
                                 "its pair", f"each LoRA module needs {kind}A and {kind}B")
        A, B = (ab[b].T, ab[a].T) if emb else (ab[a], ab[b])  # an embedding's, in its weight's layout
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise MergetoolError(source, f"module {mod!r}: {kind}A {tuple(ab[a].shape)} and {kind}B "
                                 f"{tuple(ab[b].shape)} have mismatched ranks",
                                 "lora_A is [r, in] and lora_B is [out, r]" if not emb else
                                 "lora_embedding_A is [r, num_embeddings] and lora_embedding_B is [dim, r]")
        if A.shape[0] == 0:
            raise MergetoolError(source, f"module {mod!r} has rank 0 ({kind}A {tuple(ab[a].shape)})",
                                 "drop the module, or give it rank >= 1")
        if mod in modules:
            raise MergetoolError(source, f"module {mod!r} is both LoRA and dense", "keep one form per module")
        lora = LowRank(A, B, _finite_scale(cfg, mod, A.shape[0], B, source), emb)
        modules[mod] = lora
        if mod in magnitudes:
            mag = magnitudes.pop(mod)
            if mod in lora_biases:
                raise MergetoolError(source, f"module {mod!r} is DoRA with lora_bias, which peft does not allow",
                                     "train DoRA adapters without lora_bias")
            if tuple(mag.shape) != (A.shape[1] if emb else B.shape[0],):
                raise MergetoolError(source, f"module {mod!r}: lora_magnitude_vector {tuple(mag.shape)} does not fit "
                                     f"its LoRA ({tuple(lora.shape)})", "re-export the DoRA adapter")
            modules[mod] = Dora(param=_stripped(mod) + ".weight", source=source, lora=lora, magnitude=mag)
        elif peft_config is not None and cfg.get("use_dora"):  # peft would load it with a wrong magnitude
            raise MergetoolError(source, f"the config says use_dora, but module {mod!r} has no lora_magnitude_vector",
                                 "re-export the DoRA adapter")
    if magnitudes:
        raise MergetoolError(source, f"module {next(iter(magnitudes))!r} has a lora_magnitude_vector but no LoRA",
                             "each DoRA module needs lora_A, lora_B and its magnitude")
    for mod, b in lora_biases.items():  # lora_bias: the bias changes by scale · lora_B.bias
        lora = modules.get(mod)
        if not isinstance(lora, LowRank) or lora.embedding or b.shape != lora.B.shape[:1]:
            raise MergetoolError(source, f"module {mod!r} has a lora_B.bias {tuple(b.shape)} without a fitting "
                                 "lora_B", "re-export the adapter")
        delta = b.float() * lora.scale
        param = _stripped(mod) + ".bias"
        if param in full:  # bias='all' and lora_bias at once: the trained bias plus the LoRA's
            full[param] = full[param].float() + delta
        else:
            modules[f"{mod}.bias"] = Dense(delta)
    for param, t in full.items():
        mod = module_of(param)
        if mod in modules:
            raise MergetoolError(source, f"module {_stripped(mod)!r} is both LoRA and a full tensor",
                                 "keep one form per module")
        modules[mod] = Full(param=param, source=source, value=t)
    if not modules:
        raise MergetoolError(source, "holds no tensors", "pass an adapter")
    if guessed:
        log.warning("%s: no peft_config in the metadata; assuming lora_alpha = r (scale 1)", source)
    meta = dict(meta)
    if cfg is not None and "peft_config" not in meta:
        meta["peft_config"] = cfg
    widest = max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
    return Update(meta.get("name") or name, modules, meta, widest, copies)


def _finite_scale(cfg: dict, mod: str, rank: int, B: torch.Tensor, source: str) -> float:
    """The module's scale, refused when scale · B overflows (a lora_alpha of 1e300 would make every output Inf)."""
    scale = lora_scale(cfg, mod, rank)
    if not (math.isfinite(scale) and bool(torch.isfinite(B.float() * scale).all())):
        raise MergetoolError(source, f"module {_stripped(mod)!r}: its scale {scale:g} (lora_alpha / r) makes scale · "
                             "lora_B overflow", "fix lora_alpha in the LoRA config")
    return scale


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


def _factors(mod: str, lora: LowRank, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A LoRA's PEFT tensors with its scale folded into B (an embedding's as lora_embedding_A/B)."""
    Bs = lora.B.float() * lora.scale
    pair = {f"{mod}.lora_embedding_A": Bs.T, f"{mod}.lora_embedding_B": lora.A.T} if lora.embedding else \
        {f"{mod}.lora_A.weight": lora.A, f"{mod}.lora_B.weight": Bs}
    return {k: v.to("cpu", dtype).contiguous() for k, v in pair.items()}


def to_tensors(update: Update, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT-named tensors of an update (LoRA factors with scale folded into B, DoRA's magnitudes, full tensors by
    their parameter's name), dense deltas as ``*.delta``, cast to ``dtype``."""
    dtype = dtype or update.dtype
    out: dict[str, torch.Tensor] = {}
    for mod, m in update.modules.items():
        if isinstance(m, LowRank):
            out.update(_factors(mod, m, dtype))
        elif isinstance(m, Dora):
            out.update(_factors(mod, m.lora, dtype))
            out[f"{mod}.lora_magnitude_vector"] = m.magnitude.to("cpu", dtype).contiguous()
        elif isinstance(m, Full):
            out[PREFIX + m.param] = m.value.to("cpu", dtype).contiguous()
        else:
            out[f"{mod}.delta"] = m.delta("cpu").to(dtype).contiguous()
    return out


def folded_peft_config(update: Update, base_model: str | None) -> dict:
    """A PEFT LoRA config whose scale is 1 in every module (alpha = r), with per-module ranks, its LoRA and DoRA
    modules named exactly (``target_modules``), and ``use_dora`` when any is DoRA."""
    ranks = {_stripped(mod): (m.lora if isinstance(m, Dora) else m).rank
             for mod, m in update.modules.items() if lora_like(m)}
    r = max(ranks.values())
    pattern = {re.escape(k): v for k, v in ranks.items() if v != r}
    layers = [re.findall(r"\.layers\.(\d+)\.", k) for k in ranks]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
        "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
        "use_dora": any(isinstance(m, Dora) for m in update.modules.values()),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": bool((update.meta.get("peft_config") or {}).get("fan_in_fan_out", False)),
        "base_model_name_or_path": base_model, "inference_mode": True,
        "layers_to_transform": sorted({int(x[0]) for x in layers}) if all(layers) else None,
    }


def metadata_for(update: Update) -> dict[str, str]:
    meta = dict(update.meta)
    meta["name"] = update.name
    meta["kind"] = update.kind
    if any(lora_like(m) for m in update.modules.values()):
        meta["peft_config"] = folded_peft_config(update, meta.get("base_model"))
    else:
        meta.pop("peft_config", None)
    return {"format": "pt", "mergetool": json.dumps(meta, sort_keys=True)}


def peft_state(update: Update, base: BaseTensors | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The PEFT config and tensors of an update, in peft's own layout: LoRA factors (scale folded), DoRA's
    magnitudes (a plain LoRA beside a DoRA gets the magnitude that leaves it plain, ‖W + ΔW‖), and every dense
    module as the full value θ_base + ΔW: a weight (or any other parameter) in ``modules_to_save``, a bias with
    ``bias='all'`` (under ``base_layer`` where the module is a LoRA target). Dense values need the ``base``."""
    cfg = folded_peft_config(update, update.meta.get("base_model"))
    targets = set(cfg["target_modules"])

    def base_of(name: str, what: str):
        if base is None:
            raise MergetoolError("--save-peft", f"{_stripped(name)} is {what}, which PEFT stores as a full value "
                                 "(θ_base + ΔW)", "pass --base MODEL")
        return base

    dense: dict[str, torch.Tensor] = {}  # parameter -> value
    tensors: dict[str, torch.Tensor] = {}
    for mod, m in update.modules.items():
        name = _stripped(mod)
        if lora_like(m):
            lora = m.lora if isinstance(m, Dora) else m
            tensors.update(_factors(mod, lora, update.dtype))
            if cfg["use_dora"]:
                mag = m.magnitude if isinstance(m, Dora) else \
                    dora_norms(base_of(mod, "a LoRA beside DoRA modules").read(name + ".weight", "cpu"), lora)
                tensors[f"{mod}.lora_magnitude_vector"] = mag.to("cpu", update.dtype).contiguous()
        elif isinstance(m, Full):
            dense[m.param] = m.value
        else:
            b = base_of(mod, "a dense delta")
            param = name if b.shape(name) is not None and b.shape(name + ".weight") is None else name + ".weight"
            value = b.read(param, "cpu").float() + m.delta("cpu")
            dense[param] = value.T if b.transposed(param) else value  # as the module stores it
    owners = {p.rpartition(".")[0] for p in dense if not p.endswith(".bias")}
    for param, value in dense.items():
        owner = param.rpartition(".")[0]
        key = f"{owner}.base_layer.bias" if param.endswith(".bias") and owner in targets else param
        tensors[PREFIX + key] = value.to("cpu", update.dtype).contiguous()
        if param.endswith(".bias") and owner not in owners:
            cfg["bias"] = "all"
    cfg["modules_to_save"] = sorted(owners) or None
    return cfg, tensors


def save_peft(update: Update, d, base: BaseTensors | None = None) -> None:
    """Write a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained`` loads into the directory ``d`` (a ``Path``; ``outputs.atomic_dir`` gives one that
    moves into place when complete); ``base`` reads the base's tensors where PEFT holds full values
    (:func:`peft_state`)."""
    from .blobs import write_blob

    cfg, tensors = peft_state(update, base)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    with open(d / "adapter_model.safetensors", "wb") as fh:
        write_blob(fh, tensors, metadata_for(update))
