"""The registry, the options every method reads, and the task-vector view methods work on.

A merge method is one pure function ``fn(tv: TaskVectors, p: Params)`` that yields ``(module, result)``
for every module, where ``result`` is a dense fp32 tensor or a :class:`~mergetool.updates.LowRank`.
It sees the n task vectors through :class:`TaskVectors`: one stacked ``[n, *shape]`` fp32 tensor per
module, on the merge device, made on demand, so full models stream module by module and methods with
a global statistic (TIES' global trim) take one pass for the statistic and one to merge.

Methods are registered by name with their paper reference (``merge --list-methods``). Linear methods
also give their coefficients, so that combinations of LoRAs stay exact LoRAs (concatenated factors).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from ..errors import UsageError
from ..updates import Dense, LowRank, Update


@dataclass
class Params:
    """Options shared by all methods (DESIGN.md section 3). ``None`` means the method's default."""

    weights: list[float] | None = None  # one per input; default 1 each
    lam: float = 1.0  # θ = θ_base + λ·merged
    density: float | None = None
    trim_scope: str = "global"  # "global" (TIES/KnOTS papers) or "tensor" (mergekit, peft)
    rescale: str = "paper"  # DARE/DELLA: "paper" (1/keep-prob), "l1" (mergekit), "none"
    t: float = 0.5  # slerp
    seed: int = 0
    gamma: float = 0.01  # breadcrumbs: fraction of largest entries removed
    epsilon: float = 0.15  # della: spread of keep probabilities
    inner: str = "ties"  # knots
    for_task: str | None = None  # emr: the task whose mask and rescaler to apply
    tau: float = 1.0  # weighted-base temperature
    names: list[str] = field(default_factory=list)

    def w(self, n: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * n


@dataclass(frozen=True)
class Method:
    name: str
    pretty: str
    reference: str
    summary: str
    fn: Callable[["TaskVectors", Params], Iterator[tuple[str, object]]]
    options: tuple[str, ...] = ()
    coefficients: Callable[[Params, int], list[float]] | None = None
    min_inputs: int = 1
    max_inputs: int | None = None
    default_density: float | None = None


METHODS: dict[str, Method] = {}


def register(name: str, pretty: str, reference: str, summary: str, *, options: tuple[str, ...] = (),
             coefficients=None, min_inputs: int = 1, max_inputs: int | None = None,
             default_density: float | None = None):
    """Register ``fn`` as merge method ``name``."""

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = Method(name, pretty, reference, summary, fn, options, coefficients,
                               min_inputs, max_inputs, default_density)
        return fn

    return deco


def get(name: str) -> Method:
    from . import families, knots  # noqa: F401  (registers every method)

    if name not in METHODS:
        raise UsageError("--method", f"unknown method {name!r}", f"choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def all_methods() -> dict[str, Method]:
    from . import families, knots  # noqa: F401

    return METHODS


class TaskVectors:
    """n task vectors over the union of their modules (a missing module is a zero update).

    ``stacked(mod)`` gives ``[n, *shape]`` fp32 on ``device``; nothing is kept between calls, so a
    method may sweep the modules several times (statistics first, merge second).
    """

    def __init__(self, device: torch.device, names: list[str], modules: list[str],
                 shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor],
                 parts: Callable[[str], list] | None = None):
        self.device, self.names, self.modules, self._shapes, self._get = device, names, modules, shapes, get
        self._parts = parts or (lambda mod: [Dense(t) for t in get(mod)])

    @property
    def n(self) -> int:
        return len(self.names)

    def shape(self, mod: str) -> tuple[int, ...]:
        return self._shapes[mod]

    def stacked(self, mod: str) -> torch.Tensor:
        return self._get(mod)

    def parts(self, mod: str) -> list:
        """The tasks' own module objects (LowRank, Dense or None when absent): KnOTS reads factors."""
        return self._parts(mod)

    def numel(self) -> int:
        return sum(_prod(s) for s in self._shapes.values())

    @classmethod
    def of_updates(cls, updates: list[Update], device: torch.device) -> "TaskVectors":
        modules: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        for u in updates:
            for mod, m in u.modules.items():
                if mod not in shapes:
                    modules.append(mod)
                    shapes[mod] = tuple(m.shape)

        def build(mod: str) -> torch.Tensor:
            out = torch.zeros((len(updates), *shapes[mod]), dtype=torch.float32, device=device)
            for i, u in enumerate(updates):
                m = u.modules.get(mod)
                if m is not None:
                    out[i] = m.delta(device)
            return out

        streamed = any(isinstance(m, Dense) and m.tensor is None for u in updates for m in u.modules.values())
        if streamed:  # full models on disk: read the n inputs in parallel, one module ahead
            from concurrent.futures import ThreadPoolExecutor

            readers = ThreadPoolExecutor(len(updates))

            def build(mod: str) -> torch.Tensor:  # noqa: F811
                out = torch.zeros((len(updates), *shapes[mod]), dtype=torch.float32, device=device)

                def one(i):
                    m = updates[i].modules.get(mod)
                    if m is not None:
                        out[i] = m.delta(device)

                list(readers.map(one, range(len(updates))))
                return out

        get = _read_ahead(build, modules) if streamed else build
        return cls(device, [u.name for u in updates], modules, shapes, get,
                   lambda mod: [u.modules.get(mod) for u in updates])

    @classmethod
    def of_stacks(cls, names: list[str], stacks: dict[str, torch.Tensor]) -> "TaskVectors":
        dev = next(iter(stacks.values())).device
        return cls(dev, names, list(stacks), {k: tuple(v.shape[1:]) for k, v in stacks.items()}, stacks.__getitem__)


def _read_ahead(build: Callable[[str], torch.Tensor], order: list[str]) -> Callable[[str], torch.Tensor]:
    """Wrap ``build`` so that asking for one module starts building the next (in ``order``) in a worker
    thread: reading models from disk overlaps the tensor work of the current module. At most two
    stacks are alive."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    index = {m: i for i, m in enumerate(order)}
    pending: dict = {}

    def get(mod: str) -> torch.Tensor:
        fut = pending.pop(mod, None)
        for f in pending.values():  # an out-of-order request: drop the guess
            f.cancel()
        pending.clear()
        out = fut.result() if fut is not None else build(mod)
        i = index[mod] + 1
        if i < len(order):
            pending[order[i]] = pool.submit(build, order[i])
        return out

    return get


def _prod(s) -> int:
    n = 1
    for d in s:
        n *= d
    return n


def weights_tensor(p: Params, tv: TaskVectors, ndim: int) -> torch.Tensor:
    w = torch.tensor(p.w(tv.n), dtype=torch.float32, device=tv.device)
    return w.view(-1, *([1] * ndim))


# ----------------------------------------------------------------------------- the engine


def merge_stream(updates: list[Update], method: Method, p: Params, device: torch.device) -> Iterator[tuple[str, object]]:
    """Yield ``(module, merged)`` with λ applied; LoRA-only modules of linear methods stay exact LoRAs."""
    if p.density is None and method.default_density is not None:
        p = replace(p, density=method.default_density)
    tv = TaskVectors.of_updates(updates, device)
    if method.coefficients is not None:
        coef = method.coefficients(p, len(updates))
        for mod in tv.modules:
            parts = [(c, u.modules[mod]) for c, u in zip(coef, updates) if mod in u.modules]
            if all(isinstance(m, LowRank) for _, m in parts):
                # Σ c_i s_i B_i A_i = [c_1 s_1 B_1 … c_n s_n B_n] @ [A_1; …; A_n]: exact.
                B = torch.cat([m.B.to(device, torch.float32) * (c * m.scale * p.lam) for c, m in parts], 1)
                A = torch.cat([m.A.to(device, torch.float32) for _, m in parts], 0)
                yield mod, LowRank(A, B, 1.0)
            else:
                stack = tv.stacked(mod)
                c = torch.tensor(coef, dtype=torch.float32, device=device).view(-1, *([1] * (stack.dim() - 1)))
                yield mod, (stack * c).sum(0) * p.lam
        return
    for mod, r in method.fn(tv, p):
        if isinstance(r, LowRank):
            yield mod, LowRank(r.A, r.B * p.lam, r.scale) if p.lam != 1 else r
        else:
            yield mod, r * p.lam if p.lam != 1 else r


def check_inputs(method: Method, n: int, p: Params) -> None:
    if n < method.min_inputs:
        raise UsageError("inputs", f"{method.name} needs at least {method.min_inputs} inputs, got {n}",
                         "pass more adapters")
    if method.max_inputs is not None and n > method.max_inputs:
        raise UsageError("inputs", f"{method.name} takes at most {method.max_inputs} inputs, got {n}",
                         "use multislerp or karcher for more than two")
    if p.weights is not None and len(p.weights) != n:
        raise UsageError("--weights", f"{len(p.weights)} weights for {n} inputs", "give one weight per adapter")
    if p.density is not None and not (0 < p.density <= 1):
        raise UsageError("--density", f"{p.density} is outside (0, 1]", "pass a fraction such as 0.2")
    if p.trim_scope not in ("global", "tensor"):
        raise UsageError("--trim-scope", f"unknown scope {p.trim_scope!r}", "use global or tensor")
    if p.rescale not in ("paper", "l1", "none"):
        raise UsageError("--rescale", f"unknown rescale {p.rescale!r}", "use paper, l1 or none")
    if not 0 <= p.t <= 1:
        raise UsageError("--t", f"{p.t} is outside [0, 1]", "pass an interpolation factor in [0, 1]")


def to_rank(stream, rank: int):
    """Truncate every merged module to a LoRA of rank ≤ R by SVD (fp64), reporting retained energy."""
    from .knots import factor_coords

    kept = total = 0.0
    worst = 1.0
    for mod, r in stream:
        if isinstance(r, LowRank) and r.rank <= rank:
            yield mod, r
            continue
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


log = logging.getLogger("mergetool")

__all__ = ["to_rank", "Params", "Method", "TaskVectors", "register", "get", "all_methods", "merge_stream", "Dense", "LowRank"]
