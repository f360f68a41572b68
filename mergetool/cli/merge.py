"""``mergetool merge``: merge adapters (or full models' task vectors) into one adapter or model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
from .common import AllowPickle, Debug, Device, Quiet, pick_device
from .main import app, begin

log = logging.getLogger("mergetool")

HELP = """Merge adapters into one adapter (safetensors on stdout), a PEFT directory, or a full model.

Inputs are .safetensors adapters, PEFT adapter directories, full fine-tuned model directories (their
task vectors against --base, streamed tensor by tensor), directories of adapters (a pool), or - (a
stream of concatenated blobs on stdin). Every method merges the effective updates ΔW = scale·B@A in
fp32; λ scales the result (θ = θ_base + λ·merged). Linear methods (mean, linear, task-arithmetic,
weighted-base) keep LoRAs exact (concatenated factors); knots writes an exact LoRA of rank ≤ Σ r_i;
the others give dense deltas, or a LoRA by truncated SVD with --rank.

\b
Examples:
  mergetool merge --method knots a.safetensors b.safetensors > ab.safetensors
  mergetool merge --method mean a.safetensors b.safetensors | mergetool merge --method ties - c.safetensors -o out.safetensors
  mergetool weight --tau 0.5 < base_eval.jsonl > w.jsonl && mergetool merge --method linear --weights w.jsonl experts/
  mergetool merge --method ties --density 0.2 --base BASE ft1/ ft2/ --save-model merged/
"""

Opt = typer.Option

# The registry's names, kept here so TAB completion need not import torch (a test checks they agree).
METHOD_NAMES = ("breadcrumbs", "dare-linear", "dare-ties", "della", "emr", "karcher", "knots", "linear", "magnitude",
                "mean", "model-stock", "multislerp", "slerp", "task-arithmetic", "ties", "weighted-base")


def _complete_method(incomplete: str) -> list[str]:
    return [n for n in METHOD_NAMES if n.startswith(incomplete)]


def _read_weights(src: str, names: list[str]) -> list[float]:
    from ..io import read_jsonl

    rows = read_jsonl(src)
    by: dict[str, float] = {}
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("adapter"), str) or not isinstance(r.get("weight"), (int, float)):
            raise MergetoolError(f"{src}:{i}", "a weight record needs 'adapter' (string) and 'weight' (number)",
                                 'write {"adapter": NAME, "weight": w}')
        by[r["adapter"]] = float(r["weight"])
    if len(set(names)) != len(names):
        raise MergetoolError("--weights", "two inputs share a name, so weights by name are ambiguous",
                             "rename the adapters (metadata 'name')")
    missing = [n for n in names if n not in by]
    if missing:
        raise MergetoolError(src, f"no weight for {', '.join(missing[:3])}", "give one weight per input adapter")
    extra = [n for n in by if n not in names]
    if extra:
        raise MergetoolError(src, f"weight for unknown adapter {extra[0]!r}", f"inputs are {', '.join(names[:5])}")
    return [by[n] for n in names]


def _read_base_acc(src: str, updates) -> list[float]:
    """Base-model accuracy per input, from eval --summary records (adapter null) matched by task or name."""
    from ..io import read_jsonl

    rows = read_jsonl(src)
    acc: dict[str, float] = {}
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("task"), str) or not isinstance(r.get("accuracy"), (int, float)):
            raise MergetoolError(f"{src}:{i}", "needs 'task' and 'accuracy'", "pass eval --summary records")
        if r.get("adapter") in (None, "base") or r["task"] not in acc:
            acc[r["task"]] = float(r["accuracy"])
    out = []
    for u in updates:
        key = u.meta.get("task") or u.name
        if key not in acc:
            raise MergetoolError(src, f"no base accuracy for task {key!r} (adapter {u.name})",
                                 "evaluate the base on every task first")
        out.append(acc[key])
    return out


@app.command("merge", help=HELP, short_help="Merge adapters into one adapter, PEFT directory or model.",
             no_args_is_help=True)
def merge_cmd(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Adapters: files, directories, or - for stdin.",
                                                          show_default=False, metavar="ADAPTER...")] = None,
    method: Annotated[str, Opt("--method", "-m", help="Merge method (see --list-methods).", metavar="NAME",
                               autocompletion=_complete_method)] = "mean",
    weights: Annotated[Optional[str], Opt("--weights", help='JSONL of {"adapter": NAME, "weight": w}, or -.',
                                          metavar="FILE|-")] = None,
    lam: Annotated[float, Opt("--lambda", help="Scale of the merged update: θ = θ_base + λ·merged.")] = 1.0,
    density: Annotated[Optional[float], Opt("--density", help="Fraction kept by trim/drop, in (0, 1] "
                                            "(default: ties/magnitude 0.2, dare/della 0.5, breadcrumbs 0.9).")] = None,
    trim_scope: Annotated[str, Opt("--trim-scope", help="Trim over each task's whole vector (global, the TIES "
                                   "and KnOTS papers) or per tensor (tensor, mergekit/peft).",
                                   metavar="global|tensor")] = "global",
    rescale: Annotated[str, Opt("--rescale", help="DARE/DELLA rescale: paper (1/keep), l1 (match L1 norm, "
                                "mergekit), none.", metavar="paper|l1|none")] = "paper",
    inner: Annotated[str, Opt("--inner", help="KnOTS: the method that merges the aligned coordinates.",
                              metavar="NAME", autocompletion=_complete_method)] = "ties",
    t: Annotated[float, Opt("--t", help="SLERP: interpolation fraction toward the second input.")] = 0.5,
    seed: Annotated[int, Opt("--seed", help="Seed of the random drops (DARE, DELLA).")] = 0,
    rank: Annotated[Optional[int], Opt("--rank", help="Write a LoRA of at most this rank (truncated SVD; "
                                       "the retained energy is reported).")] = None,
    gamma: Annotated[float, Opt("--gamma", help="Breadcrumbs: fraction of largest entries dropped.")] = 0.01,
    epsilon: Annotated[float, Opt("--epsilon", help="DELLA: spread of keep probabilities.")] = 0.15,
    for_task: Annotated[Optional[str], Opt("--for-task", help="EMR: apply this input's mask and rescaler.",
                                           metavar="NAME")] = None,
    base_acc: Annotated[Optional[str], Opt("--base-acc", help="weighted-base: eval --summary JSONL of the base.",
                                           metavar="FILE|-")] = None,
    tau: Annotated[float, Opt("--tau", help="weighted-base: softmax temperature.")] = 1.0,
    base: Annotated[Optional[str], Opt("--base", help="Base model (dir, HF id, .gguf): for full-model inputs, "
                                       "--save-model and the fingerprint check.", metavar="MODEL")] = None,
    gguf_file: Annotated[Optional[str], Opt("--gguf-file", help="GGUF file inside the --base directory.")] = None,
    name: Annotated[Optional[str], Opt("--name", help="Name of the merged adapter (metadata).")] = None,
    output: Annotated[Optional[str], Opt("-o", "--output", help="Write the adapter here (atomically); - is stdout.",
                                         metavar="FILE")] = None,
    save_peft: Annotated[Optional[str], Opt("--save-peft", help="Also write a PEFT adapter directory.",
                                            metavar="DIR")] = None,
    save_model: Annotated[Optional[str], Opt("--save-model", help="Write the merged full model (sharded "
                                             "safetensors, config and tokenizer).", metavar="DIR")] = None,
    dtype: Annotated[str, Opt("--dtype", help="Output dtype: auto (the inputs'), float32, bfloat16, float16.")] = "auto",
    list_methods: Annotated[bool, Opt("--list-methods", help="List the methods with their papers and exit.")] = False,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
):
    begin("merge", quiet, debug)
    from ..methods import all_methods

    if list_methods:
        for m in sorted(all_methods().values(), key=lambda m: m.name):
            typer.echo(f"{m.name:16} {m.pretty:28} {m.reference}")
            typer.echo(f"{'':16} {m.summary}")
        return
    if not inputs:
        raise UsageError("inputs", "no adapters given", "pass adapter files, directories, or -")
    import torch

    from .. import io
    from ..methods import Params, check_inputs, get, merge_stream, to_rank
    from ..model import fingerprint, resolve_base, save_model as write_model
    from ..updates import LowRank, Update, check_compatible, load_inputs, metadata_for, to_tensors

    m = get(method)
    if m.name == "knots":
        get(inner)
    if "-" in inputs and (weights == "-" or base_acc == "-"):
        raise UsageError("-", "stdin is named twice", "read adapters or weights from stdin, not both")
    to_blob = output is not None or not (save_peft or save_model)
    if to_blob:
        io.refuse_binary_to_tty(output)
    if save_model and not base:
        raise UsageError("--save-model", "needs the base model", "pass --base MODEL")
    out_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, 0)
    if out_dtype == 0:
        raise UsageError("--dtype", f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
    dev = pick_device(device)
    if density is not None and not (0 < density <= 1):
        raise UsageError("--density", f"{density} is outside (0, 1]", "pass a fraction such as 0.2")

    b = resolve_base(base, gguf_file) if base else None
    updates = load_inputs(list(inputs), b, allow_pickle)
    base_fp = fingerprint(b) if b else None
    check_compatible(updates, base_fp)
    names = [u.name for u in updates]
    p = Params(weights=_read_weights(weights, names) if weights else None, lam=lam, density=density,
               trim_scope=trim_scope, rescale=rescale, t=t, seed=seed, gamma=gamma, epsilon=epsilon,
               inner=inner, for_task=for_task, tau=tau, names=names)
    if m.name == "weighted-base" or (m.name == "knots" and inner == "weighted-base"):
        p.weights = _read_base_acc(base_acc, updates) if base_acc else None
    check_inputs(m, len(updates), p)
    if rank is not None and rank < 1:
        raise UsageError("--rank", f"{rank} is not a positive rank", "pass --rank 16, say")
    out_dtype = out_dtype or max((u.dtype for u in updates), key=lambda d: torch.finfo(d).bits)

    shown = {k: v for k, v in dict(weights=p.weights, **{"lambda": lam}, density=density, trim_scope=trim_scope,
                                     rescale=rescale, inner=inner, t=t, seed=seed, rank=rank, gamma=gamma,
                                     epsilon=epsilon, for_task=for_task, tau=tau).items()
             if k.replace("_", "-") in m.options or k in ("lambda", "rank") or
             (m.name == "knots" and k in ("density", "trim_scope", "rescale", "seed"))}
    meta = {"method": m.name, "params": shown, "parents": names,
            "base_model": base or _common(u.meta.get("base_model") for u in updates),
            "base_fingerprint": base_fp or _common(u.fingerprint for u in updates)}
    tasks = [u.meta.get("task") for u in updates if u.meta.get("task")]
    if tasks:
        meta["tasks"] = tasks
    out_name = name or (Path(output).name.removesuffix(".safetensors") if output and output != "-" else f"{m.name}-merge")

    stream = merge_stream(updates, m, p, dev)
    if rank is not None:
        stream = to_rank(stream, rank)
    streaming = (rank is None and m.coefficients is None and m.name != "knots"
                 and all(u.kind == "dense" for u in updates) and not save_peft and bool(to_blob) != bool(save_model))
    n_in = len(updates)
    if streaming and save_model:  # full models: one tensor at a time from the inputs into the merged model
        with io.atomic_dir(save_model) as d:
            info = write_model(b, d, stream, dev, allow_pickle, None if dtype == "auto" else out_dtype)
        log.info("merged %d inputs with %s into %s (%d tensors, %d patched, %d shards)", n_in, m.name, save_model,
                 info["tensors"], info["patched"], info["shards"])
        return
    if streaming:  # full models: one module at a time from input to output
        specs, order = _dense_specs(updates, out_dtype)
        kind_meta = {"format": "pt", "mergetool": json.dumps({**meta, "name": out_name, "kind": "dense"}, sort_keys=True)}
        with io.atomic_output(output) as fh:
            io.write_blob(fh, ((f"{mod}.delta", d.to(out_dtype)) for mod, d in stream), kind_meta, specs)
        log.info("merged %d inputs with %s into %d dense modules -> %s", n_in, m.name, len(order), output or "stdout")
        return
    merged = Update(out_name, {}, meta, out_dtype)
    for mod, r in stream:
        merged.modules[mod] = r if isinstance(r, LowRank) else _dense(r)
    if save_model:
        with io.atomic_dir(save_model) as d:
            info = write_model(b, d, iter(merged.modules.items()), dev, allow_pickle,
                               None if dtype == "auto" else out_dtype)
        log.info("wrote merged model to %s (%d tensors, %d patched, %d shards)", save_model, info["tensors"],
                 info["patched"], info["shards"])
    if save_peft:
        if merged.kind != "lora":
            raise MergetoolError("--save-peft", f"{m.name} gives dense deltas, which PEFT cannot hold",
                                 "pass --rank R to write a LoRA by truncated SVD")
        _write_peft(merged, save_peft, out_dtype)
        log.info("wrote PEFT adapter to %s", save_peft)
    if to_blob:
        with io.atomic_output(output) as fh:
            io.write_blob(fh, to_tensors(merged, out_dtype), metadata_for(merged))
    ranks = sorted({mm.rank for mm in merged.modules.values() if isinstance(mm, LowRank)})
    log.info("merged %d inputs with %s: %d modules, %s%s", n_in, m.name, len(merged.modules),
             f"LoRA rank {ranks[0]}-{ranks[-1]}" if merged.kind == "lora" and ranks else "dense",
             f" -> {output}" if output and output != "-" else "")


def _common(values):
    vals = {v for v in values if v}
    return vals.pop() if len(vals) == 1 else None


def _dense(t):
    from ..updates import Dense

    return Dense(t)


def _dense_specs(updates, out_dtype):
    order, shapes = [], {}
    for u in updates:
        for mod, m in u.modules.items():
            if mod not in shapes:
                order.append(mod)
                shapes[mod] = tuple(m.shape)
    return [(f"{mod}.delta", out_dtype, shapes[mod]) for mod in order], order


def _write_peft(merged, out_dir: str, dtype) -> None:
    from safetensors.torch import save_file

    from .. import io
    from ..updates import folded_peft_config, metadata_for, to_tensors

    with io.atomic_dir(out_dir) as d:
        cfg = folded_peft_config(merged, merged.meta.get("base_model"))
        (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        save_file(to_tensors(merged, dtype), str(d / "adapter_model.safetensors"), metadata=metadata_for(merged))
