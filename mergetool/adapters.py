"""Updates applied to a running model: beside the frozen weights, one update per batch row, and the frozen
lower layers computed once.

:class:`RowAdapters` is the one rule by which every command applies an update to a model (``eval
--adapter``, batched evaluation of many updates, ``train-expert``'s trainable experts, ``score``,
``diagnose``). The weights are never rewritten: every adapted linear map (an ``nn.Linear``, or a
transformers ``Conv1D`` as in GPT-2, whose weight is stored transposed, [in, out]) computes ``W x`` as usual
and adds the update's Δ(x) beside it in fp32, ``(x Aᵀ) Bᵀ · scale`` for a LoRA module and ``x ΔWᵀ`` for a
dense one (a LoRA whose rank makes its factors larger than the matrix is stored dense), and rounds once to
the model's dtype; an update holds ΔW as [out, in] for both kinds (PEFT's lora_A [r, in], lora_B [out, r]).
A DoRA module adds (g − 1) W x + g · scale·B A x with g = m / ‖W + scale·B A‖ per output row (from the
running weight W, the norm detached), so that the output is g (W + scale·B A) x + bias exactly as peft's
forward computes it. Row b of a batch uses update ``rows[b]``, for any mix of LoRA and DoRA updates (any
ranks, scales, rslora, target modules), dense deltas, and none (the base model), so one forward pass
evaluates many updates. A LoRA on an ``nn.Embedding`` adds the rows x of B A (its embed_scale applied);
dense deltas of embedding weights (with the output layer when the weights are tied), full tensors
(``modules_to_save``: their value minus the running weight) and biases are applied the same way; other
parameters (norm weights of a full model's task vector) are patched in place, which only an update that
every row shares can do. A LoRA changes the module it names, as peft's forward does, even where the input
and output embeddings share one tensor; a dense delta changes the tensor, so every module holding it.

:class:`Prefix`: when every update touches only decoder layers ≥ L, layers < L compute the same hidden
states under every update. ``states`` runs them once; ``feeding`` then skips them and feeds the saved
states into layer L, exactly (the result is the same computation, not an approximation).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import MergetoolError
from .model import check_updatable, is_conv1d, linear_dims
from .updates import PREFIX, Dora, Full, LowRank, OnBase, Update, check_copy, lora_like, row_norms

# ----------------------------------------------------------------------------- decoder layers


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList] | None:
    """(path, list) of the model's decoder layers: the ModuleList with one entry per hidden layer."""
    cfg = model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and n and len(m) == n]
    return min(found, key=lambda x: len(x[0])) if found else None


def layer_of(name: str, layers_path: str | None = None) -> int | None:
    """The decoder-layer index of a module path such as ``model.layers.14.mlp.up_proj`` (None outside the
    layers). ``layers_path`` is the layer list's path; without it, the component after ``layers``."""
    if layers_path is not None:
        if not name.startswith(layers_path + "."):
            return None
        head = name[len(layers_path) + 1:].split(".", 1)[0]
        return int(head) if head.isdigit() else None
    parts = name.split(".")
    if "layers" not in parts:
        return None
    k = parts.index("layers")
    return int(parts[k + 1]) if k + 1 < len(parts) and parts[k + 1].isdigit() else None


def first_layer(model, paths: Sequence[str]) -> int:
    """The lowest decoder layer any of ``paths`` (module paths) sits in: layers below it are not touched.
    A module outside the layers counts as before them (0), unless it is the output layer or a norm, which
    run after them; so the answer is exact or conservative, never too high."""
    found = decoder_layers(model)
    if found is None:
        return 0
    lpath, layers = found
    out = len(layers)
    head = model.get_output_embeddings()
    mods = dict(model.named_modules())
    for p in paths:
        i = layer_of(p, lpath)
        if i is None:
            m = mods.get(p)
            after = m is not None and (m is head or "norm" in type(m).__name__.lower())
            i = out if after else 0
        out = min(out, i)
    return out


# ----------------------------------------------------------------------------- per-row adapters


# what to do with updates of a model whose forward changes its own weights (``model.check_updatable``)
APPLY_FIX = "merge them into the weights with a method that needs no model run (merge -m task-arithmetic --save-model DIR) and evaluate DIR as the base"


class _Stop(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


@dataclass
class _Site:
    """What the updates add at one module: per update a LoRA (A [r, in], B·scale [out, r]), a DoRA (A, B·scale,
    and g = m / ‖W + scale·B A‖ per output row) or a dense delta (fp32, on the model's device); for a trainable
    site, stacked factors (and DoRA magnitudes) used row by row."""

    module: torch.nn.Module
    embedding: bool
    lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dora: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    dense: dict[int, torch.Tensor] = field(default_factory=dict)
    bias: dict[int, torch.Tensor] = field(default_factory=dict)
    A: torch.nn.Parameter | None = None  # trainable: [E, r, in]
    B: torch.nn.Parameter | None = None  # trainable: [E, out, r]
    M: torch.nn.Parameter | None = None  # trainable DoRA magnitudes: [E, out]
    scale: float = 1.0

    def _low(self, x: torch.Tensor, A: torch.Tensor, Bs: torch.Tensor) -> torch.Tensor:
        """(Bs A) applied to x: (x Aᵀ) Bsᵀ for a linear module; for an embedding, the rows x of Bs A (Bs[x] A)."""
        if self.embedding:
            return torch.nn.functional.embedding(x, Bs) @ A * _embed_scale(self.module)
        return (x.float() @ A.T) @ Bs.T

    def _frozen(self, out: torch.Tensor) -> torch.Tensor:
        """W x of the module's output (its bias taken off), in fp32."""
        bias = getattr(self.module, "bias", None)
        return out.float() - bias.float() if bias is not None else out.float()

    def delta(self, u: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Δ of update u on input x (fp32), given the frozen module's output ``out``; None where u does not touch
        this module. DoRA: (g − 1) W x + g · scale·B A x, so that the output is g (W + scale·B A) x + bias, with
        the norm in g detached, as peft computes it."""
        if self.A is not None:  # a trainable site: expert u
            lo = ((x.to(self.A.dtype) @ self.A[u].T) @ self.B[u].T) * self.scale
            return lo if self.M is None else self._dora(out, lo, self._magnitude_factor()[u])
        d = None
        if u in self.lora:
            d = self._low(x, *self.lora[u])
        elif u in self.dora:
            A, Bs, g = self.dora[u]
            d = self._dora(out, self._low(x, A, Bs), g)
        elif u in self.dense:
            D = self.dense[u]
            d = torch.nn.functional.embedding(x, D) * _embed_scale(self.module) if self.embedding else x.float() @ D.T
        if u in self.bias:
            d = self.bias[u] if d is None else d + self.bias[u]
        return d

    def _dora(self, out: torch.Tensor, lo: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (g - 1) * self._frozen(out) + g * lo

    def weight(self) -> torch.Tensor:
        """The module's frozen weight as [out, in] (a ``Conv1D`` stores it transposed)."""
        return self.module.weight.detach().T if is_conv1d(self.module) else self.module.weight.detach()

    def _magnitude_factor(self) -> torch.Tensor:
        """Trainable DoRA: g_e = m_e / ‖W + scale·B_e A_e‖ of every expert [E, out], the norm detached (DoRA,
        section 4.3, as peft trains it)."""
        with torch.no_grad():
            n = row_norms(self.weight(), self.A, self.B * self.scale)
        return self.M / n

    def each(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Trainable site, row e uses expert e: batched matmuls over the stacked factors."""
        lo = torch.bmm(torch.bmm(x.to(self.A.dtype), self.A.transpose(1, 2)), self.B.transpose(1, 2)) * self.scale
        return lo if self.M is None else self._dora(out, lo, self._magnitude_factor().unsqueeze(1))


def _embed_scale(module: torch.nn.Module):
    """The factor an embedding module applies to its rows (Gemma's scaled embeddings), or 1."""
    s = getattr(module, "embed_scale", None)
    return 1.0 if s is None else s


class RowAdapters:
    """Updates applied beside the frozen weights, one update per batch row (see the module docstring).

    Use as a context manager (or call ``remove``). Choose who uses what before each forward pass:
    ``use(u)``: every row uses update ``u`` (None: the base model); ``set_rows(rows)``: row b uses
    ``rows[b]`` (-1: the base); ``each()``: row b uses update b (trainable experts). Updates are indexed
    in the order given.
    """

    def __init__(self, model, updates: Sequence[Update | None] = ()):
        self.model, self.updates = model, list(updates)
        self.sites: dict[str, _Site] = {}
        self.patches: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self.handles: list = []
        self._mode: tuple = ("use", None)
        self._patched: int | None = None
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        self.dev = next(model.parameters()).device
        if any(u is not None for u in self.updates):
            check_updatable(model, APPLY_FIX)
        mods = dict(model.named_modules())
        params = dict(model.named_parameters(remove_duplicate=False))
        for ui, u in enumerate(self.updates):
            for key, m in ([] if u is None else u.modules.items()):
                self._add(ui, u, key, m, mods, params)
            for name, t in ({} if u is None else u.copies).items():
                if name not in params:
                    raise MergetoolError(u.name, f"module {name} is not in the base model",
                                         "use an update of this base")
                check_copy(u.name, name, t, params[name].detach())
        self._install()

    # -- building

    def _site(self, path: str, module) -> _Site:
        if path not in self.sites:
            self.sites[path] = _Site(module, isinstance(module, torch.nn.Embedding))
        return self.sites[path]

    def _add(self, ui: int, u: Update, key: str, m, mods: dict, params: dict) -> None:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in mods and isinstance(getattr(mods[name], "weight", None), torch.Tensor):
            path, attr = name, "weight"
        elif name in params:
            path, _, attr = name.rpartition(".")
        else:
            raise MergetoolError(u.name, f"module {name} is not in the base model", "use an update of this base")
        module = mods[path]
        param = getattr(module, attr)
        linear = linear_dims(module) is not None  # nn.Linear or Conv1D: ΔW is [out, in] for both
        flip = attr == "weight" and is_conv1d(module)  # stored [in, out]
        weight = param.detach().T if flip else param.detach()  # [out, in]
        if flip and isinstance(m, Full):
            raise MergetoolError(u.name, f"module {name}: a full tensor (modules_to_save) of a Conv1D module is not "
                                 "supported", "leave Conv1D modules out of modules_to_save")
        shape = tuple(weight.shape)
        if tuple(m.shape) != shape:
            raise MergetoolError(u.name, f"module {name}: update {tuple(m.shape)} vs weight {shape}"
                                 f"{' ([out, in]; stored transposed, as Conv1D)' if flip else ''}",
                                 "use an update of this base")

        def delta():  # DoRA and full tensors against the running model's own weight
            return m.delta(self.dev, base=weight) if isinstance(m, OnBase) else m.delta(self.dev)

        if attr == "weight" and (linear or isinstance(module, torch.nn.Embedding)):
            if lora_like(m):  # a LoRA changes the module it names, as peft's forward does
                lr = m.lora if isinstance(m, Dora) else m
                site = self._site(path, module)
                factors = (lr.A.to(self.dev, torch.float32), lr.B.to(self.dev, torch.float32) * lr.scale)
                if lr.rank * sum(lr.shape) >= math.prod(lr.shape) or isinstance(m, Dora) and not linear:
                    site.dense[ui] = delta()  # factors larger than the matrix; DoRA on an embedding
                elif isinstance(m, Dora):
                    site.dora[ui] = (*factors, m.factor(self.dev, weight))
                else:
                    site.lora[ui] = factors
                return
            d = delta()
            for p2, mod2 in mods.items():  # every module holding this weight (tied embeddings and output layer)
                if getattr(mod2, "weight", None) is param and (linear_dims(mod2) or isinstance(mod2, torch.nn.Embedding)):
                    self._site(p2, mod2).dense[ui] = d
            return
        if attr == "bias" and linear:
            self._site(path, module).bias[ui] = delta().view(-1)
            return
        self.patches.setdefault(ui, []).append((param, delta().reshape(param.shape)))

    @classmethod
    def trainable(cls, model, paths: list[str], n: int, rank: int, scale: float, seeds: list[int],
                  dora: bool = False) -> "RowAdapters":
        """``n`` trainable LoRA experts on the modules ``paths``: A kaiming-uniform (as peft), B zero, each
        expert's initialisation seeded by ``seeds[e]`` and the module's name; row e uses expert e. ``dora``: each
        expert also trains a DoRA magnitude per output row, initialised to ‖W‖ (‖W + scale·B A‖ with B = 0)."""
        check_updatable(model, "train it where the model keeps its weights as stored (peft, in training mode) and "
                        "merge the result into a full model (merge --save-model)")
        self = cls(model)
        mods = dict(model.named_modules())
        for path in paths:
            lin = mods[path]
            fan_in, fan_out = linear_dims(lin)
            A = torch.empty((n, rank, fan_in), device=self.dev)
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform with a=sqrt(5)
            for e, s in enumerate(seeds):
                g = torch.Generator(device="cpu").manual_seed(s * 1_000_003 + zlib.crc32(path.encode()) % 1_000_003)
                A[e] = (torch.rand((rank, fan_in), generator=g) * 2 - 1).to(self.dev) * bound
            site = self._site(path, lin)
            site.A = torch.nn.Parameter(A)
            site.B = torch.nn.Parameter(torch.zeros((n, fan_out, rank), device=self.dev))
            if dora:
                site.M = torch.nn.Parameter(site.weight().float().norm(dim=1).expand(n, -1).clone())
            site.scale = scale
        self._install()
        self.each()
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for s in self.sites.values() for p in (s.A, s.B, s.M) if p is not None]

    def expert(self, e: int, name: str, meta: dict) -> Update:
        """Trainable expert ``e`` as an update (fp32 factors, and DoRA magnitudes, on the CPU)."""
        def own(t):
            return t[e].detach().float().cpu().clone()

        mods = {}
        for path, s in self.sites.items():
            if s.A is not None:
                lora = LowRank(own(s.A), own(s.B), s.scale)
                mods[PREFIX + path] = lora if s.M is None else \
                    Dora(param=path + ".weight", source=name, lora=lora, magnitude=own(s.M))
        return Update(name, mods, meta)

    def paths(self, updates: Sequence[int] | None = None) -> list[str]:
        """The module paths the given updates (default: all) change."""
        keep = None if updates is None else set(updates)
        out = [p for p, s in self.sites.items()
               if s.A is not None or keep is None or keep & (set(s.lora) | set(s.dora) | set(s.dense) | set(s.bias))]
        if any(keep is None or ui in keep for ui in self.patches):
            names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
            out += [names[id(p)].rpartition(".")[0] for ui, ps in self.patches.items()
                    if keep is None or ui in keep for p, _ in ps]
        return out

    def linear_paths(self) -> list[str]:
        """The paths of the changed modules that are linear maps (``nn.Linear`` or ``Conv1D``: the modules whose
        input Gram, weight gradient or Fisher data-aware merges read; ΔW is [out, in] for both)."""
        return [p for p in self.paths() if linear_dims(self.model.get_submodule(p)) is not None]

    # -- choosing who uses what

    def use(self, u: int | None) -> None:
        """Every row uses update ``u`` (None or -1: the base model)."""
        u = None if u is None or u < 0 else u
        self._patch(u)
        self._mode = ("use", u)

    def set_rows(self, rows: Sequence[int]) -> None:
        """Row b uses update ``rows[b]`` (-1: the base model)."""
        rows = [int(r) for r in rows]
        if len(set(rows)) == 1:
            return self.use(rows[0])
        bad = next((r for r in rows if r in self.patches), None)
        if bad is not None:
            raise MergetoolError(self.updates[bad].name, "changes parameters other than linear and embedding "
                                 "weights (norms), which cannot differ between rows of a batch",
                                 "evaluate it alone")
        self._patch(None)
        self._mode = ("rows", _segments(rows), len(rows))

    def each(self) -> None:
        """Row b uses update b (trainable experts, or n updates on n rows)."""
        self._patch(None)
        self._mode = ("each",)

    @contextlib.contextmanager
    def gathered(self, rows: torch.Tensor) -> Iterator[None]:
        """While the output layer runs on hidden states gathered from batch rows ``rows`` (one per scored
        position), map each position to its row's update."""
        mode = self._mode
        if mode[0] == "rows":
            per = [u for u, s, e in mode[1] for _ in range(e - s)]
            self._mode = ("rows", _segments([per[r] for r in rows.tolist()]), len(rows))
        elif mode[0] == "each":
            self._mode = ("rows", _segments(rows.tolist()), len(rows))
        try:
            yield
        finally:
            self._mode = mode

    @contextlib.contextmanager
    def bare(self) -> Iterator[None]:
        """While it runs, the hooks add nothing, to a batch of any number of rows (a probe of the model itself;
        parameters patched in place for a shared update stay patched); the choice made before is restored
        after."""
        mode = self._mode
        self._mode = ("use", None)
        try:
            yield
        finally:
            self._mode = mode

    def _patch(self, u: int | None) -> None:
        """Parameters no hook can reach (norm weights of a full model's delta) are patched in place for the
        update every row shares, and restored when another is chosen."""
        if u == self._patched:
            return
        with torch.no_grad():
            if self._patched is not None:
                for p, saved in self._saved:
                    p.copy_(saved)
            self._saved = []
            if u is not None and u in self.patches:
                for p, d in self.patches[u]:
                    self._saved.append((p, p.detach().clone()))
                    p.copy_((p.float() + d).to(p.dtype))
        self._patched = u if u in self.patches else None

    # -- running

    def _install(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = [s.module.register_forward_hook(self._hook(p, s)) for p, s in self.sites.items()]
        self.model._mergetool_adapters = self

    def _hook(self, path: str, site: _Site):
        def hook(mod, inp, out):
            if not isinstance(out, torch.Tensor):  # Llama-4's router, an nn.Linear that also routes
                raise MergetoolError(path, f"is a {type(mod).__name__}, whose forward returns a {type(out).__name__}, "
                                     "not a linear map's output: an update of it is not supported (peft cannot run "
                                     "one either)", "leave it out of the adapter's target_modules")
            x = inp[0]
            mode = self._mode
            if mode[0] == "use":
                if mode[1] is None:
                    return out
                d = site.delta(mode[1], x, out)
                return out if d is None else (out.float() + d).to(out.dtype)
            if mode[0] == "each" and site.A is not None:
                return (out.float() + site.each(x, out)).to(out.dtype)
            segments, n = (_segments(list(range(x.shape[0]))), x.shape[0]) if mode[0] == "each" else mode[1:]
            if x.shape[0] != n:
                raise RuntimeError(f"per-row adapters: a batch of {x.shape[0]} rows, {n} rows were set")
            pieces = []
            for u, s, e in segments:
                d = None if u < 0 else site.delta(u, x[s:e], out[s:e])
                pieces.append(out[s:e] if d is None else (out[s:e].float() + d).to(out.dtype))
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)

        return hook

    def remove(self) -> None:
        self._patch(None)
        for h in self.handles:
            h.remove()
        self.handles = []
        if getattr(self.model, "_mergetool_adapters", None) is self:
            del self.model._mergetool_adapters

    def __enter__(self) -> "RowAdapters":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def device_bytes(u: Update) -> int:
    """What an update occupies on the device once applied: its LoRA (or DoRA) factors, or the dense delta where
    the factors would be larger (as ``RowAdapters`` stores it), in fp32."""
    n = 0
    for m in u.modules.values():
        lr = m.lora if isinstance(m, Dora) else m
        if lora_like(m) and lr.rank * sum(lr.shape) < math.prod(lr.shape):
            n += lr.rank * sum(lr.shape) + (lr.shape[0] if isinstance(m, Dora) else 0)
        else:
            n += math.prod(m.shape)
    return 4 * n


def fitting_groups(updates: Sequence[Update], device, budget: int | None = None) -> list[list[int]]:
    """The updates' indices in consecutive groups that each fit ``budget`` bytes on the device (default: a third
    of the free GPU memory, or 4 GiB on a CPU), so that a set too large to apply at once is streamed through."""
    if budget is None:
        if torch.device(device).type == "cuda":
            budget = int(torch.cuda.mem_get_info(torch.device(device))[0] / 3)
        else:
            budget = 4 * 2**30
    groups: list[list[int]] = []
    used = budget + 1
    for i, u in enumerate(updates):
        b = device_bytes(u)
        if used + b > budget and (not groups or groups[-1]):
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += b
    return groups


def _segments(rows: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal update in ``rows``: (update, start, end)."""
    out = []
    for i, r in enumerate(rows):
        if out and out[-1][0] == r:
            out[-1] = (r, out[-1][1], i + 1)
        else:
            out.append((r, i, i + 1))
    return out


def gathered(model, rows: torch.Tensor):
    """``RowAdapters.gathered`` of the adapters installed on ``model`` (a no-op without any)."""
    ad = getattr(model, "_mergetool_adapters", None)
    return ad.gathered(rows) if ad is not None else contextlib.nullcontext()


def bare(model):
    """``RowAdapters.bare`` of the adapters installed on ``model`` (a no-op without any)."""
    ad = getattr(model, "_mergetool_adapters", None)
    return ad.bare() if ad is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- the frozen prefix


class StandIn(torch.nn.Module):
    """Stands in for ``module``: runs ``forward`` instead of it and answers attribute reads with the replaced
    module's (so a caller that reads a setting off it still finds it)."""

    def __init__(self, module: torch.nn.Module, forward):
        super().__init__()
        object.__setattr__(self, "_module", module)  # not a submodule: its weights are not ours
        object.__setattr__(self, "_forward", forward)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_module"), name)

    def forward(self, *args, **kwargs):
        return object.__getattribute__(self, "_forward")(*args, **kwargs)


def _passing(as_tuple: bool):
    """A frozen decoder layer's stand-in forward: its input passed through (as a tensor or a 1-tuple, like the
    layer it replaces)."""

    def forward(hidden_states, *args, **kwargs):
        return (hidden_states,) if as_tuple else hidden_states

    return forward


class Prefix:
    """The decoder layers below ``first`` of ``model``, frozen under every update that touches only layers
    ≥ ``first``: ``states(**inputs)`` runs them once and returns the hidden states entering layer ``first``;
    inside ``feeding(hidden)`` those layers are skipped and ``hidden`` enters layer ``first`` instead (the
    inputs must be laid out as when the states were computed). ``first == 0``: nothing is frozen.

    Inside layer ``first`` itself, what runs before the first adapted module (the attention and the gate
    projection when the updates touch ``mlp.up_proj``) and the frozen weight's own product ``W x`` of an
    adapted module still see the same input under every update. ``sharing(inverse)`` runs those parts once
    per distinct row of a batch whose rows repeat (row b holds the same packed items as distinct row
    ``inverse[b]``, under another update): see :func:`_row_shared`."""

    def __init__(self, model, first: int, adapted: Sequence[str] = ()):
        found = decoder_layers(model)
        self.model, self.first = model, (first if found else 0)
        self.layers = found[1] if found else None
        self.as_tuple = False
        self.parts: list[torch.nn.Module] = []
        if self.first and self.first < len(self.layers):
            base = f"{found[0]}.{self.first}"
            self.parts = _frozen_parts(self.layers[self.first], base, {p for p in adapted if p.startswith(base + ".")})

    @contextlib.contextmanager
    def sharing(self, inverse: Sequence[int]) -> Iterator[None]:
        """While a batch whose row b repeats distinct row ``inverse[b]`` runs (distinct rows numbered in order
        of first appearance), the frozen parts of layer ``first`` compute on the distinct rows only."""
        n = max(inverse) + 1 if len(inverse) else 0
        if not self.parts or n == len(inverse):
            yield
            return
        firsts = [list(inverse).index(k) for k in range(n)]
        dups = [b for b, k in enumerate(inverse) if firsts[k] != b]
        dev = next(self.model.parameters()).device  # made once per batch, on the device its inputs are on
        plan = _RowPlan(len(inverse), *(torch.tensor(x, dtype=torch.long, device=dev) for x in
                                        (firsts, list(inverse), dups, [firsts[inverse[b]] for b in dups])))
        saved = []
        try:
            for m in self.parts:
                saved.append((m, m.__dict__.get("forward")))
                m.forward = _row_shared(m.forward, plan)
            yield
        finally:
            for m, f in reversed(saved):
                if f is None:
                    del m.__dict__["forward"]
                else:
                    m.forward = f

    @torch.no_grad()
    def states(self, **inputs) -> torch.Tensor:
        if not self.first:
            raise ValueError("no frozen layers")

        def stop(mod, args, kwargs):
            raise _Stop(args[0] if args else kwargs["hidden_states"])

        def shape(mod, args, out):
            self.as_tuple = isinstance(out, tuple)

        hs = [self.layers[self.first].register_forward_pre_hook(stop, with_kwargs=True),
              self.layers[self.first - 1].register_forward_hook(shape)]
        try:
            self.model.get_decoder()(**inputs)
        except _Stop as s:
            return s.hidden.detach()
        finally:
            for h in hs:
                h.remove()
        raise RuntimeError("the decoder never reached its frozen boundary")

    @contextlib.contextmanager
    def feeding(self, hidden: torch.Tensor) -> Iterator[None]:
        if not self.first:
            yield
            return

        def feed(mod, args, kwargs):
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        saved = [self.layers[i] for i in range(self.first)]
        h = self.layers[self.first].register_forward_pre_hook(feed, with_kwargs=True)
        try:
            for i in range(self.first):
                self.layers[i] = StandIn(saved[i], _passing(self.as_tuple))
            yield
        finally:
            for i, m in enumerate(saved):
                self.layers[i] = m
            h.remove()


def _frozen_parts(module: torch.nn.Module, path: str, adapted: set[str]) -> list[torch.nn.Module]:
    """The largest submodules of ``module`` that hold no adapted module, and the adapted modules themselves
    (their frozen product runs shared; the updates' hooks add each row's Δ after it)."""
    out = []
    for name, child in module.named_children():
        p = f"{path}.{name}"
        if p in adapted:
            out.append(child)
        elif any(a.startswith(p + ".") for a in adapted):
            out += _frozen_parts(child, p, adapted)
        else:
            out.append(child)
    return out


@dataclass
class _RowPlan:
    rows: int  # rows of the batch
    firsts: torch.Tensor  # the distinct rows' first appearances
    inverse: torch.Tensor  # row b -> its distinct row
    dups: torch.Tensor  # the rows that repeat an earlier one
    dup_of: torch.Tensor  # ... and the first row each repeats


def _tree(x, f):
    if isinstance(x, torch.Tensor):
        return f(x)
    if isinstance(x, tuple):
        items = [_tree(v, f) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return [_tree(v, f) for v in x]
    if isinstance(x, dict):
        return {k: _tree(v, f) for k, v in x.items()}
    return x


def _row_shared(forward, plan: _RowPlan):
    """``forward`` run on the distinct rows of its batch and expanded back, when every batch-shaped input
    (tensors whose first dimension is the batch's rows) repeats exactly where the rows repeat; otherwise run
    as it is. Exact for any module whose output row depends only on its input row (every part of a decoder
    layer in evaluation): the repeated rows' inputs are checked equal, not assumed (after an adapted module
    they differ, and that part runs on every row)."""

    def run(*args, **kwargs):
        batched: list[torch.Tensor] = []
        _tree((args, kwargs), lambda t: batched.append(t) if t.dim() and t.shape[0] == plan.rows else None)
        if not batched:
            return forward(*args, **kwargs)
        for t in batched:
            a, b = t[plan.dups].flatten(1), t[plan.dup_of].flatten(1)
            if not (torch.equal(a[:, :64], b[:, :64]) and torch.equal(a, b)):
                return forward(*args, **kwargs)
        take = lambda t: t.index_select(0, plan.firsts) if t.dim() and t.shape[0] == plan.rows else t  # noqa: E731
        uargs, ukwargs = _tree((list(args), kwargs), take)
        out = forward(*uargs, **ukwargs)
        n = len(plan.firsts)
        return _tree(out, lambda t: t.index_select(0, plan.inverse) if t.dim() and t.shape[0] == n else t)

    return run
