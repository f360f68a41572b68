"""Merging as a library call: ``merge(updates, method, params) -> Update``, used by ``mergetool merge``,
``score`` and ``diagnose`` alike.

``merge_stream`` is the engine underneath: it yields ``(module, merged)`` one module at a time with λ
applied (full models stream through it into ``--save-model`` without ever being whole in memory); linear
methods keep LoRA modules exact LoRAs (concatenated factors). ``merge`` collects the stream into an
:class:`~mergetool.updates.Update` whose metadata records the method, its *effective* parameters (defaults
filled in), the parents and their tasks. ``to_rank`` truncates a merged stream to LoRAs of rank ≤ R.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Iterator

import torch

from ..errors import MergetoolError, UsageError
from ..updates import Dense, Dora, LowRank, Update, combine, lora_of
from .base import Method, Params, TaskVectors
from .registry import get

log = logging.getLogger("mergetool")

# Method option (as on the command line) -> Params field.
OPTION_FIELDS = {"weights": "weights", "lambda": "lam", "density": "density", "trim-scope": "trim_scope",
                 "rescale": "rescale", "t": "t", "seed": "seed", "gamma": "gamma", "epsilon": "epsilon",
                 "inner": "inner", "for-task": "for_task", "base-acc": "base_acc", "tau": "tau",
                 "rank-fraction": "rank_fraction", "common-fraction": "common_fraction", "eta": "eta",
                 "correction": "correction", "nuslerp-row-wise": "nuslerp_row_wise",
                 "nuslerp-flatten": "nuslerp_flatten", "ram-epsilon": "ram_epsilon", "tall-lambda": "tall_lambda",
                 "consensus-k": "consensus_k", "alpha": "alpha"}


def resolve(method: str | Method) -> Method:
    return get(method) if isinstance(method, str) else method


def inner_of(method: Method, p: Params) -> Method | None:
    """The method that merges the aligned coordinates, for methods that take ``--inner`` (KnOTS)."""
    if "inner" not in method.options:
        return None
    inner = get(p.inner)
    if "inner" in inner.options:
        whose = "its own" if inner is method else f"the {method.name}"
        raise UsageError("--inner", f"{inner.name} cannot be {whose} inner method", "choose ties, mean, dare-ties, ...")
    return inner


def effective_params(method: Method, p: Params, rank: int | None = None) -> dict:
    """The parameters that actually run, defaults filled in, keyed as in metadata (``trim_scope``, ...): the
    method's own options, its inner method's, λ, and ``--rank`` when given."""
    inner = inner_of(method, p)
    opts = list(method.options) + (list(inner.options) if inner else [])
    n = len(p.names)
    q = method.defaults(p, n)
    if inner is not None:
        q = inner.defaults(q, n)
    out: dict = {}
    for opt in dict.fromkeys(opts + ["lambda"]):
        value = getattr(q, OPTION_FIELDS[opt])
        out[opt.replace("-", "_")] = value
    if method.coefficients is not None and q.names:  # the inputs' own weights, once the inputs are known
        out["coefficients"] = method.coefficients(q, len(q.names))
    if rank is not None:
        out["rank"] = rank
    return out


def check_options(method: Method, p: Params, given: set[str] = frozenset()) -> None:
    """Every option checked before any input is read: ranges, finiteness (a NaN λ or weight would write a
    merge full of NaN), and options the method would ignore. ``given`` names options passed as files
    (``weights``, ``base-acc``) whose values are not read yet."""
    for opt, value in (("--lambda", p.lam), ("--t", p.t), ("--gamma", p.gamma), ("--epsilon", p.epsilon),
                       ("--tau", p.tau), ("--density", p.density)):
        if value is not None and not math.isfinite(value):
            raise UsageError(opt, f"{value} is not a finite number", "pass a finite value")
    if p.density is not None and not (0 < p.density <= 1):
        raise UsageError("--density", f"{p.density} is outside (0, 1]", "pass a fraction such as 0.2")
    if p.trim_scope not in ("global", "tensor"):
        raise UsageError("--trim-scope", f"unknown scope {p.trim_scope!r}", "use global or tensor")
    if p.rescale not in ("paper", "l1", "none"):
        raise UsageError("--rescale", f"unknown rescale {p.rescale!r}", "use paper, l1 or none")
    if not 0 <= p.t <= 1:
        raise UsageError("--t", f"{p.t} is outside [0, 1]", "pass an interpolation factor in [0, 1]")
    if not 0 <= p.gamma < 1:
        raise UsageError("--gamma", f"{p.gamma} is outside [0, 1)", "pass a small fraction such as 0.01")
    if not 0 <= p.epsilon < 1:
        raise UsageError("--epsilon", f"{p.epsilon} is outside [0, 1)", "pass a small spread such as 0.15")
    if not p.tau > 0:
        raise UsageError("--tau", f"{p.tau} is not positive", "pass a positive temperature such as 0.5")
    for opt, value, example in (("--rank-fraction", p.rank_fraction, "0.125"), ("--common-fraction", p.common_fraction,
                                "0.8"), ("--eta", p.eta, "0.4 (the STAR paper's η = 40%)")):
        if value is not None and not 0 < value <= 1:
            raise UsageError(opt, f"{value} is outside (0, 1]", f"pass a fraction such as {example}")
    if not math.isfinite(p.correction):
        raise UsageError("--correction", f"{p.correction} is not a finite number", "pass a finite value such as 2")
    for opt, value, example in (("--ram-epsilon", p.ram_epsilon, "1e-5"), ("--tall-lambda", p.tall_lambda, "0.4")):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(opt, f"{value} is not a finite number ≥ 0", f"pass a value such as {example}")
    if p.consensus_k < 0:
        raise UsageError("--consensus-k", f"{p.consensus_k} is negative", "pass a count of tasks such as 2")
    if not (math.isfinite(p.alpha) and 0 <= p.alpha <= 1):
        raise UsageError("--alpha", f"{p.alpha} is outside [0, 1]", "pass a fraction such as 0.9")
    inner = inner_of(method, p)
    taken = set(method.options) | set(inner.options if inner else ())
    given = set(given) | {opt for opt, v in (("weights", p.weights), ("base-acc", p.base_acc)) if v is not None}
    for opt in sorted(given - taken):
        raise UsageError(f"--{opt}", f"{method.name}{f' with --inner {inner.name}' if inner else ''} "
                         f"does not take --{opt}, so it would be ignored",
                         "drop it, or choose a method that takes it (see --list-methods)")
    if "base-acc" in taken and "base-acc" not in given:
        raise UsageError("--base-acc", f"{method.name} needs the base model's accuracy per task",
                         "pass --base-acc FILE (eval --summary records of the base model)")


def check_inputs(method: Method, n: int, p: Params) -> None:
    """``check_options``, and the inputs' count against the method and the per-input values."""
    check_options(method, p)
    if n < method.min_inputs:
        raise UsageError("inputs", f"{method.name} needs at least {method.min_inputs} inputs, got {n}",
                         "pass more adapters")
    if method.max_inputs is not None and n > method.max_inputs:
        raise UsageError("inputs", f"{method.name} takes at most {method.max_inputs} inputs, got {n}",
                         "use multislerp or karcher for more than two")
    if p.weights is not None:
        if len(p.weights) != n:
            raise UsageError("--weights", f"{len(p.weights)} weights for {n} inputs", "give one weight per adapter")
        bad = next((w for w in p.weights if not math.isfinite(w)), None)
        if bad is not None:
            raise UsageError("--weights", f"weight {bad} is not a finite number", "give finite weights")
    if p.base_acc is not None:
        if len(p.base_acc) != n or not all(math.isfinite(a) and 0 <= a <= 1 for a in p.base_acc):
            raise UsageError("--base-acc", "needs one accuracy in [0, 1] per input", "pass eval --summary records")
    inner = inner_of(method, p)
    if inner is not None and n < inner.min_inputs:
        raise UsageError("inputs", f"{inner.name} needs at least {inner.min_inputs} inputs, got {n}",
                         "pass more adapters")


def merge_stream(updates: list[Update], method: Method | str, p: Params,
                 device: torch.device) -> Iterator[tuple[str, object]]:
    """Yield ``(module, merged)`` with λ applied; LoRA-only modules of linear methods stay exact LoRAs."""
    method = resolve(method)
    p = method.defaults(p, len(updates))
    with TaskVectors.of_updates(updates, device) as tv:
        if method.coefficients is not None:
            coef = method.coefficients(p, len(updates))
            for mod in tv.modules:
                parts = [(c * p.lam, u.modules[mod]) for c, u in zip(coef, updates) if mod in u.modules]
                exact = combine(parts, device)  # LoRAs (and DoRAs) stay exact, in factors
                if exact is not None:
                    yield mod, exact
                else:
                    stack = tv.stacked(mod)
                    c = torch.tensor(coef, dtype=torch.float32, device=device).view(-1, *([1] * (stack.dim() - 1)))
                    yield mod, (stack * c).sum(0) * p.lam
            return
        for mod, r in method.fn(tv, p):
            yield mod, _scaled(r, p.lam)


def _scaled(r, lam: float):
    """θ = θ_base + λ·merged: λ applied to a merged module (to B for a LoRA)."""
    if lam == 1:
        return r
    return LowRank(r.A, r.B * lam, r.scale) if isinstance(r, LowRank) else r * lam


def to_rank(stream, rank: int):
    """Truncate every merged module to a LoRA of rank ≤ R by SVD (fp64), reporting retained energy."""
    from .knots import factor_coords

    kept = total = 0.0
    worst = 1.0
    for mod, r in stream:
        if lora_of(r) is not None and lora_of(r).rank <= rank:
            yield mod, r
            continue
        if isinstance(r, Dora):  # a DoRA of higher rank: its effective ΔW, truncated as a plain LoRA
            r = r.delta(r.lora.A.device)
        if isinstance(r, LowRank):  # exact SVD from the factors (QR + small core)
            U, S, Q = factor_coords([(r.B * r.scale).unsqueeze(0)], [r.A.unsqueeze(0)])
            U, S, coords = U[0], S[0], Q[0][0]
        elif r.dim() == 2:
            U, S, Vh = torch.linalg.svd(r.double(), full_matrices=False)
            coords = S.unsqueeze(1) * Vh
        else:
            yield mod, r  # vectors (norms, biases) stay dense
            continue
        k = min(rank, int((S > 0).sum()))
        e_all, e_kept = float((S ** 2).sum()), float((S[:k] ** 2).sum())
        kept, total = kept + e_kept, total + e_all
        if e_all > 0:
            worst = min(worst, e_kept / e_all)
        yield mod, LowRank(coords[:k].float(), U[:, :k].float(), 1.0)
    if total > 0:
        log.info("--rank %d keeps %.4f%% of the merged update's energy (lowest module %.4f%%)",
                 rank, 100 * kept / total, 100 * worst)


def describe(updates: list[Update], method: Method, p: Params, *, rank: int | None = None,
             base_model: str | None = None, base_fingerprint: str | None = None) -> dict:
    """The metadata of a merge: ``method``, its effective ``params``, ``parents``, their ``tasks``, and the base
    model and fingerprint (the inputs' own when not given)."""
    meta = {"method": method.name, "params": effective_params(method, p, rank), "parents": list(p.names),
            "base_model": base_model or _common(u.meta.get("base_model") for u in updates),
            "base_fingerprint": base_fingerprint or _common(u.fingerprint for u in updates)}
    tasks = [u.meta.get("task") for u in updates if u.meta.get("task")]
    if tasks:
        meta["tasks"] = tasks
    if any((u.meta.get("peft_config") or {}).get("fan_in_fan_out") for u in updates):
        meta["peft_config"] = {"fan_in_fan_out": True}  # Conv1D modules (GPT-2): the flag PEFT writers set
    return meta


def widest_dtype(updates: list[Update]) -> torch.dtype:
    return max((u.dtype for u in updates), key=lambda d: torch.finfo(d).bits)


def merge(updates: list[Update], method: Method | str, p: Params, device: torch.device, *,
          rank: int | None = None, name: str | None = None, base_model: str | None = None,
          base_fingerprint: str | None = None, dtype: torch.dtype | None = None) -> Update:
    """Merge ``updates`` into one :class:`Update`, checked first (``check_inputs``), described by ``describe``,
    cast to ``dtype`` on write (default: the widest input dtype). A non-finite result is refused."""
    method = resolve(method)
    p = replace(p, names=list(p.names) or [u.name for u in updates])
    check_inputs(method, len(updates), p)
    meta = describe(updates, method, p, rank=rank, base_model=base_model, base_fingerprint=base_fingerprint)
    merged = Update(name or f"{method.name}-merge", {}, meta, dtype or widest_dtype(updates))
    for mod, r in laid_out(checked(merge_stream(updates, method, p, device), rank), updates):
        merged.modules[mod] = r
    return merged


def merge_many(groups: list[list[Update]], method: Method | str, p: Params, device: torch.device, *,
               names: list[str] | None = None) -> list[Update]:
    """Merge several groups of updates, one merged update per group, each the same as ``merge`` of that group
    alone. Methods that can merge many groups at once (KnOTS: one batched QR/SVD for all groups' bases) do."""
    method = resolve(method)
    names = names or [f"{method.name}-merge-{i}" for i in range(len(groups))]
    ps = [replace(p, names=[u.name for u in g]) for g in groups]
    if method.many is None or method.coefficients is not None or len(groups) < 2:
        return [merge(g, method, q, device, name=n) for g, q, n in zip(groups, ps, names)]
    for g, q in zip(groups, ps):
        check_inputs(method, len(g), q)
    q = method.defaults(p, len(groups[0]))  # many() merges groups of one size (else it merges them one by one)
    tvs = [TaskVectors.of_updates(g, device) for g in groups]
    out = []
    try:
        for g, gp, n, stream in zip(groups, ps, names, method.many(tvs, q)):
            merged = Update(n, {}, describe(g, method, gp), widest_dtype(g))
            for mod, r in laid_out(checked((mod, _scaled(r, q.lam)) for mod, r in stream), g):
                merged.modules[mod] = r
            out.append(merged)
    finally:
        for tv in tvs:
            tv.close()
    return out


def laid_out(stream: Iterator[tuple[str, object]], updates: list[Update]) -> Iterator[tuple[str, object]]:
    """The merged stream as modules: tensors as dense deltas, and a LoRA of a module that the inputs hold as an
    embedding's LoRA (peft's lora_embedding_A/B) in that layout."""
    embeddings = {mod for u in updates for mod, m in u.modules.items() if getattr(lora_of(m), "embedding", False)}
    for mod, r in stream:
        if isinstance(r, LowRank) and mod in embeddings:
            r.embedding = True
        yield mod, r if isinstance(r, (LowRank, Dense)) else Dense(r)


def checked(stream: Iterator[tuple[str, object]], rank: int | None = None) -> Iterator[tuple[str, object]]:
    """The merged stream, truncated to ``rank`` when given, each module refused if it holds NaN or Inf. A LoRA of
    rank 0 (zero updates, or weights that cancel, in an exact-LoRA method) becomes a rank-1 zero LoRA: the same
    update, in a form that mergetool and peft read (r = 0 is no LoRA config)."""
    for mod, r in (to_rank(stream, rank) if rank is not None else stream):
        check_finite(mod, r)
        if isinstance(r, LowRank) and r.rank == 0:
            r = LowRank(r.A.new_zeros((1, r.A.shape[1])), r.B.new_zeros((r.B.shape[0], 1)), 1.0)
        yield mod, r


def check_finite(mod: str, r) -> None:
    """A merged module holding NaN or Inf is an error, never an output."""
    parts = (r.A, r.B) if isinstance(r, LowRank) else (r.lora.A, r.lora.B, r.magnitude) if isinstance(r, Dora) else (r,)
    if not all(bool(torch.isfinite(t).all()) for t in parts):
        raise MergetoolError(mod, "the merge produced NaN or Inf", "check the inputs and options (weights, λ)")


def _common(values):
    vals = {v for v in values if v}
    return vals.pop() if len(vals) == 1 else None
