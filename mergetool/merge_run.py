"""A merge run around the engine (``methods``) and the data-aware merges (``merging``): the inputs read and checked
against the base with their weights, the choice between streaming tensor by tensor (full models, dense deltas)
and merging in memory, and the merged update written to its outputs, every one built aside and landing only if
all of them succeed. ``cli/merge.py`` parses and checks the options, calls these and reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable

from .errors import MergetoolError
from .examples import Example
from .methods import Method, Params
from .updates import Update, lora_of

log = logging.getLogger("mergetool")


def read_inputs(paths: list[str], base, allow_pickle: bool, p: Params, weights: str | None,
                base_acc: str | None) -> tuple[list[Update], str | None]:
    """The inputs as updates, checked against the base (DoRA and full tensors are task vectors against it), and
    the base's fingerprint; ``p`` gets their names, their --weights and their tasks' --base-acc."""
    from .inputs import check_compatible, load_inputs
    from .model import fingerprint
    from .updates import check_bound
    from .weights import base_accuracy, read_weights

    updates = load_inputs(list(paths), base, allow_pickle)
    check_bound(updates)
    base_fp = fingerprint(base) if base else None
    check_compatible(updates, base_fp)
    p.names = [u.name for u in updates]
    if weights:
        p.weights = read_weights(weights, p.names)
    if base_acc:
        p.base_acc = base_accuracy(base_acc).of([(u.name, u.meta.get("task") or u.name) for u in updates])
    return updates, base_fp


def streams(updates: list[Update], m: Method | None, with_data: bool, rank: int | None, save_peft: str | None,
            to_blob: bool, save_model: str | None) -> bool:
    """Whether the merge can stream one tensor at a time from the inputs to one output (a full model or a blob of
    dense deltas): a method of fixed coefficients over inputs that are no LoRA, with no truncation to a rank."""
    return (not with_data and rank is None and m.coefficients is None and "inner" not in m.options
            and not save_peft and not any(lora_of(mm) for u in updates for mm in u.modules.values())
            and bool(to_blob) != bool(save_model))


def merge_streaming(updates: list[Update], m: Method, p: Params, base, dev, meta: dict, name: str,
                    save_model: str | None, output: str | None, out_dtype, keep_dtype, allow_pickle: bool) -> None:
    """The merge streamed one tensor at a time from the inputs into its one output: the merged model's shards
    (``save_model``), or a blob of dense deltas (``output``, None for stdout)."""
    from .blobs import write_blob
    from .methods import merge_stream
    from .methods.engine import checked
    from .model import save_model as write_model
    from .outputs import atomic_dir, atomic_output

    if save_model:
        with atomic_dir(save_model) as d:
            info = write_model(base, d, checked(merge_stream(updates, m, p, dev)), dev, allow_pickle, keep_dtype)
        log.info("merged %d inputs with %s into %s (%d tensors, %d patched, %d shards)", len(updates), m.name,
                 save_model, info["tensors"], info["patched"], info["shards"])
        return
    order = list(dict.fromkeys(mod for u in updates for mod in u.modules))
    shapes = {mod: tuple(u.modules[mod].shape) for u in reversed(updates) for mod in u.modules}
    specs = [(f"{mod}.delta", out_dtype, shapes[mod]) for mod in order]
    header = {"format": "pt", "mergetool": json.dumps({**meta, "name": name, "kind": "dense"}, sort_keys=True)}
    with atomic_output(output) as fh:
        write_blob(fh, ((f"{mod}.delta", d.to(out_dtype)) for mod, d in checked(merge_stream(updates, m, p, dev))),
                   header, specs)
    log.info("merged %d inputs with %s into %d dense modules -> %s", len(updates), m.name, len(order),
             output or "stdout")


def steps_of(method: str, steps: int, budget: str | None) -> tuple[int, str]:
    """What a data-aware merge's progress counts, and how many: AdaMerging's steps, the candidates LoraHub and
    auto judge (auto's budget in seconds counts none)."""
    from .merging.auto import parse_budget

    total = {"adamerging": steps, "lorahub": int(budget or 40),
             "auto": parse_budget(budget or "64").candidates or 0}.get(method, 0)
    return total, "steps" if method == "adamerging" else "candidates"


def merge_in_memory(method: str, m: Method | None, updates: list[Update], p: Params, dev,
                    examples: list[Example] | None, base, opts, progress: Callable | None, **kw) -> Update:
    """The merged update: by the data-aware merges when ``examples`` are given (``auto``: the search), else by
    the engine."""
    if examples is not None:
        from .merging import merge_on_data

        return merge_on_data(method, updates, examples, p, base, opts, dev, progress=progress, **kw)
    from .methods import merge

    return merge(updates, m, p, dev, **kw)


def _check_peft(merged: Update, save_peft: str | None, base) -> None:
    """A PEFT directory holds LoRA modules: refused for a merge of only dense deltas; the merged embeddings are
    marked as such against the base."""
    if save_peft and not any(lora_of(mm) for mm in merged.modules.values()):
        raise MergetoolError("--save-peft", f"{merged.meta['method']} gives only dense deltas here, which PEFT cannot "
                             "hold without a LoRA module", "pass --rank R to write a LoRA by truncated SVD")
    if save_peft and base is not None:
        from .inputs import mark_embeddings

        mark_embeddings(merged, base)


def write_outputs(merged: Update, base, dev, save_model: str | None, save_peft: str | None, to_blob: bool,
                  output: str | None, allow_pickle: bool, keep_dtype) -> None:
    """Every output of the merge, each built aside, landing only if all of them succeed: the full model, the PEFT
    directory, the blob (a file, or stdout). A merge that PEFT cannot hold is refused first (``--save-peft``)."""
    from .blobs import write_blob
    from .inputs import BaseWeights
    from .model import save_model as write_model
    from .outputs import atomic_dir, atomic_output
    from .updates import metadata_for, save_peft as write_peft, to_tensors

    _check_peft(merged, save_peft, base)
    with contextlib.ExitStack() as outputs:
        if save_model:
            d = outputs.enter_context(atomic_dir(save_model))
            info = write_model(base, d, iter(merged.modules.items()), dev, allow_pickle, keep_dtype)
            log.info("wrote merged model to %s (%d tensors, %d patched, %d shards)", save_model, info["tensors"],
                     info["patched"], info["shards"])
        if save_peft:
            write_peft(merged, outputs.enter_context(atomic_dir(save_peft)),
                       BaseWeights(base, allow_pickle) if base else None)
            log.info("wrote PEFT adapter to %s", save_peft)
        if to_blob:
            write_blob(outputs.enter_context(atomic_output(output)), to_tensors(merged), metadata_for(merged))


def kinds(merged: Update) -> str:
    """What the merged update holds, in words: its LoRA ranks and whether it is dense."""
    ranks = sorted({lora_of(mm).rank for mm in merged.modules.values() if lora_of(mm)})
    parts = ([f"LoRA rank {ranks[0]}-{ranks[-1]}"] if ranks else []) + (["dense"] if merged.kind == "dense" else [])
    return " and ".join(parts)
