"""The vocabulary of merge methods: the options they read, the registration decorator, and the
task-vector view they work on. Imports no method family (``methods.registry`` does).

A merge method is one pure function ``fn(tv: TaskVectors, p: Params)`` that yields ``(module, result)``
for every module, where ``result`` is a dense fp32 tensor or a :class:`~mergetool.updates.LowRank`.
It sees the n task vectors through :class:`TaskVectors`: one stacked ``[n, *shape]`` fp32 tensor per
module, on the merge device, made on demand, so full models stream module by module and methods with
a global statistic (TIES' global trim) take one pass for the statistic and one to merge.

Methods are registered by name with their paper reference (``merge --list-methods``). Linear methods
also give their coefficients, so that combinations of LoRAs stay exact LoRAs (concatenated factors).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from ..errors import UsageError
from ..updates import Dense, Update


@dataclass
class Params:
    """Options shared by all methods (the README: merge conventions). ``None`` means the method's default."""

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
    base_acc: list[float] | None = None  # weighted-base: the base model's accuracy on each input's task
    rank_fraction: float | None = None  # tsv: rank per task / min(m, n) (default 1/n); cart: rank per correction (0.12)
    common_fraction: float = 0.8  # iso-cts: share of the span given to the common subspace (the paper's 0.8)
    eta: float = 0.4  # star: fraction of each task's nuclear norm kept (the paper's η = 40%)
    correction: float = 2.0  # cart: coefficient λ of the low-rank corrections (the authors' 8-task setting)
    nuslerp_row_wise: bool = False  # nuslerp (mergekit's option): interpolate columns (dim 0) instead of rows
    nuslerp_flatten: bool = True  # nuslerp (mergekit's option): interpolate each whole tensor as one vector
    ram_epsilon: float = 1e-5  # ram: |τ| above which an entry counts as changed (mergekit's epsilon)
    tall_lambda: float = 0.4  # consensus-*: TALL mask threshold λ, |τ_t| > λ |τ_MTL − τ_t|
    consensus_k: int = 2  # consensus-*: entries kept where at least k tasks' TALL masks agree
    alpha: float = 0.9  # regmean: scale of the Grams' off-diagonal entries (1 = plain RegMean)
    # What a data-aware method learned from its data (Grams, Fisher diagonals, coefficients), set by
    # ``mergetool.merging`` before the merge runs; the merge itself is then a pure function of it.
    stats: dict | None = None
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
    # Several groups merged at once (one batched factorisation for all), yielding each group's stream in turn.
    many: Callable[[list["TaskVectors"], Params], Iterator[Iterator[tuple[str, object]]]] | None = None
    # Defaults that depend on the number of inputs n (TSV's rank fraction 1/n), filled in for n inputs.
    fill: Callable[[Params, int], Params] | None = None
    # Data-aware: merges from statistics of the model on dev examples (``Params.stats``, made by
    # ``mergetool.merging``); the command loads the model and data for it.
    data: bool = False

    def defaults(self, p: Params, n: int) -> Params:
        """``p`` with this method's defaults filled in for n inputs (what runs, and what metadata records); the
        defaults that depend on n stay unset while n is unknown (0)."""
        if p.density is None and self.default_density is not None:
            p = replace(p, density=self.default_density)
        return self.fill(p, n) if self.fill is not None and n else p


METHODS: dict[str, Method] = {}


def register(name: str, pretty: str, reference: str, summary: str, *, options: tuple[str, ...] = (),
             coefficients=None, min_inputs: int = 1, max_inputs: int | None = None,
             default_density: float | None = None, many=None, fill=None, data: bool = False):
    """Register ``fn`` as merge method ``name``."""

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = Method(name, pretty, reference, summary, fn, options, coefficients,
                               min_inputs, max_inputs, default_density, many, fill, data)
        return fn

    return deco


def lookup(name: str) -> Method:
    """A registered method by name. The registry (``methods.registry``) imports every family first; this
    module imports none of them, so a family may look up another (KnOTS's inner method) without a circle."""
    if name not in METHODS:
        raise UsageError("--method", f"unknown method {name!r}", f"choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


class TaskVectors:
    """n task vectors over the union of their modules (a missing module is a zero update).

    ``stacked(mod)`` gives ``[n, *shape]`` fp32 on ``device``; nothing is kept between calls, so a
    method may sweep the modules several times (statistics first, merge second). Full models are read by
    worker threads, which ``close()`` (or leaving a ``with`` block) shuts down.
    """

    def __init__(self, device: torch.device, names: list[str], modules: list[str],
                 shapes: dict[str, tuple[int, ...]], get: Callable[[str], torch.Tensor],
                 parts: Callable[[str], list] | None = None, pools: list | None = None):
        self.device, self.names, self.modules, self._shapes, self._get = device, names, modules, shapes, get
        self._parts = parts or (lambda mod: [Dense(t) for t in get(mod)])
        self._pools = pools or []

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools = []

    def __enter__(self) -> "TaskVectors":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

        pools: list = []
        streamed = any(isinstance(m, Dense) and m.tensor is None for u in updates for m in u.modules.values())
        if streamed:  # full models on disk: read the n inputs in parallel, one module ahead
            from concurrent.futures import ThreadPoolExecutor

            readers = ThreadPoolExecutor(len(updates))
            pools.append(readers)

            def build(mod: str) -> torch.Tensor:  # noqa: F811
                out = torch.zeros((len(updates), *shapes[mod]), dtype=torch.float32, device=device)

                def one(i):
                    m = updates[i].modules.get(mod)
                    if m is not None:
                        out[i] = m.delta(device)

                list(readers.map(one, range(len(updates))))
                return out

            build = _read_ahead(build, modules, pools)
        return cls(device, [u.name for u in updates], modules, shapes, build,
                   lambda mod: [u.modules.get(mod) for u in updates], pools)

    @classmethod
    def of_stacks(cls, names: list[str], stacks: dict[str, torch.Tensor]) -> "TaskVectors":
        dev = next(iter(stacks.values())).device
        return cls(dev, names, list(stacks), {k: tuple(v.shape[1:]) for k, v in stacks.items()}, stacks.__getitem__)


def _read_ahead(build: Callable[[str], torch.Tensor], order: list[str], pools: list) -> Callable[[str], torch.Tensor]:
    """Wrap ``build`` so that asking for one module starts building the next (in ``order``) in a worker
    thread (added to ``pools``): reading models from disk overlaps the tensor work of the current module.
    At most two stacks are alive."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    pools.append(pool)
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
