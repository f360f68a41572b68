"""``mergetool merge``: merge adapters (or full models' task vectors) into one adapter or model."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .common import AllowPickle, BatchTokens, Debug, Device, Norm, Quiet, Seed, pick_device, progress_bar
from .app import begin, command

log = logging.getLogger("mergetool")

HELP = """Merge adapters into one adapter (safetensors on stdout), a PEFT directory, or a full model.

Inputs are .safetensors adapters, PEFT adapter directories, full fine-tuned model directories (their
task vectors against --base, streamed tensor by tensor), directories of adapters (a pool), or - (a
stream of concatenated blobs on stdin). Every method merges the effective updates ΔW = scale·B@A in
fp32; λ scales the result (θ = θ_base + λ·merged). DoRA adapters, modules_to_save and trained biases are
merged through their task vectors against --base (linear methods keep DoRAs exact DoRAs). Linear methods (mean, linear, task-arithmetic,
weighted-base) keep LoRAs exact (concatenated factors); knots and the subspace merges (core-space, tsv,
iso-c, iso-cts, star, cart) write an exact LoRA of rank ≤ Σ r_i from the factors; the others give dense
deltas, or a LoRA by truncated SVD with --rank.

With --data DEV.jsonl and --base, the data-aware methods read the model on each adapter's task's examples:
regmean and regmean++ (Grams of each module's inputs; an exact LoRA), fisher (diagonal Fisher), adamerging
(coefficients by entropy minimisation on the prompts), lorahub (weights by gradient-free search); and auto
searches for the best merge (method, options, weights and, with --drop, members) on part of the examples,
reports the rest held out (--holdout), and writes every candidate to --trace FILE (continued if it exists).

\b
Examples:
  mergetool merge --method knots a.safetensors b.safetensors > ab.safetensors
  mergetool merge --method mean a.safetensors b.safetensors | mergetool merge --method ties - c.safetensors -o out.safetensors
  mergetool weight --tau 0.5 < base_eval.jsonl > w.jsonl && mergetool merge --method linear --weights w.jsonl experts/
  mergetool merge --method ties --density 0.2 --base BASE ft1/ ft2/ --save-model merged/
  mergetool merge --method regmean --data dev.jsonl --base BASE experts/ > regmean.safetensors
  mergetool merge -m auto --data dev.jsonl --base BASE experts/ | mergetool eval --base BASE --adapter - t.jsonl
"""

Opt = typer.Option

# The registry's names, kept here so TAB completion need not import torch (a test checks they agree).
METHOD_NAMES = ("adamerging", "auto", "breadcrumbs", "breadcrumbs-ties", "cart", "consensus-ta", "consensus-ties",
                "core-space", "dare-linear", "dare-ties", "della", "della-linear", "emr", "fisher", "iso-c", "iso-cts",
                "karcher", "knots", "linear", "lorahub", "magnitude", "mean", "model-stock", "multislerp", "nearswap",
                "nuslerp", "ram", "regmean", "regmean++", "sce", "slerp", "star", "task-arithmetic", "ties", "tsv",
                "weighted-base")


def _complete_method(incomplete: str) -> list[str]:
    return [n for n in METHOD_NAMES if n.startswith(incomplete)]


@command("merge", help=HELP, short_help="Merge adapters into one adapter, PEFT directory or model.",
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
    inner: Annotated[str, Opt("--inner", help="KnOTS, core-space: the method that merges the aligned coordinates.",
                              metavar="NAME", autocompletion=_complete_method)] = "ties",
    t: Annotated[float, Opt("--t", help="SLERP: interpolation fraction toward the second input.")] = 0.5,
    seed: Seed("Seed of the random drops (DARE, DELLA) and of the searches (auto, lorahub, "
               "--holdout's draw).") = 0,
    rank: Annotated[Optional[int], Opt("--rank", help="Write a LoRA of at most this rank (truncated SVD; "
                                       "the retained energy is reported).")] = None,
    gamma: Annotated[float, Opt("--gamma", help="Breadcrumbs: fraction of largest entries dropped.")] = 0.01,
    epsilon: Annotated[float, Opt("--epsilon", help="DELLA: spread of keep probabilities.")] = 0.15,
    for_task: Annotated[Optional[str], Opt("--for-task", help="EMR: apply this input's mask and rescaler.",
                                           metavar="NAME")] = None,
    base_acc: Annotated[Optional[str], Opt("--base-acc", help="weighted-base: eval --summary JSONL of the base.",
                                           metavar="FILE|-")] = None,
    tau: Annotated[float, Opt("--tau", help="weighted-base: softmax temperature.")] = 1.0,
    rank_fraction: Annotated[Optional[float], Opt("--rank-fraction", help="tsv: rank kept per task as a fraction "
                                                  "of min(m, n) (default 1/n); cart: rank of each correction "
                                                  "(default 0.12).")] = None,
    common_fraction: Annotated[float, Opt("--common-fraction", help="iso-cts: share of the span given to the "
                                          "common subspace.")] = 0.8,
    eta: Annotated[float, Opt("--eta", help="star: fraction of each task's nuclear norm kept (η).")] = 0.4,
    correction: Annotated[float, Opt("--correction", help="cart: coefficient of the low-rank corrections.")] = 2.0,
    nuslerp_row_wise: Annotated[bool, Opt("--nuslerp-row-wise", help="nuslerp: interpolate each column (mergekit's "
                                          "nuslerp_row_wise) instead of each row.")] = False,
    nuslerp_flatten: Annotated[bool, Opt("--nuslerp-flatten/--no-nuslerp-flatten", help="nuslerp: interpolate each "
                                         "whole tensor as one vector (mergekit's nuslerp_flatten).")] = True,
    ram_epsilon: Annotated[float, Opt("--ram-epsilon", help="ram: |τ| above which an entry counts as changed.")] = 1e-5,
    tall_lambda: Annotated[float, Opt("--tall-lambda", help="consensus-ta/-ties: TALL mask threshold λ, "
                                      "|τ_t| > λ|τ_MTL − τ_t|.")] = 0.4,
    consensus_k: Annotated[int, Opt("--consensus-k", help="consensus-ta/-ties: keep entries at least k tasks' "
                                    "masks hold.")] = 2,
    data: Annotated[Optional[str], Opt("--data", help="Dev examples (eval's format; split=train records are "
                                       "skipped) for regmean, regmean++, fisher, adamerging, lorahub and auto; each "
                                       "adapter reads its task's (metadata task, else its name).",
                                       metavar="DEV.jsonl")] = None,
    alpha: Annotated[float, Opt("--alpha", help="regmean: scale of the Grams' off-diagonal entries.")] = 0.9,
    norm: Norm = "tokens",
    steps: Annotated[int, Opt("--steps", help="adamerging: Adam steps on the dev prompts' entropy.")] = 500,
    lr: Annotated[float, Opt("--lr", help="adamerging: Adam's learning rate.")] = 1e-3,
    granularity: Annotated[str, Opt("--granularity", help="adamerging: coefficients per task and module (layer) "
                                    "or per task (task).", metavar="layer|task")] = "layer",
    budget: Annotated[Optional[str], Opt("--budget", help="lorahub: candidates judged (default 40); auto: "
                                         "candidates (default 64) or seconds (300s, 10m).",
                                         metavar="N|SECONDS")] = None,
    population: Annotated[Optional[int], Opt("--population", help="lorahub, auto: candidates judged together, as "
                                             "rows of one pass (default lorahub 8, auto 16).")] = None,
    l1: Annotated[float, Opt("--l1", help="lorahub: weight of LoraHub's L1 penalty on the weights.")] = 0.05,
    objective: Annotated[str, Opt("--objective", help="auto: maximise the mean or the worst task's normalised "
                                  "accuracy (merged / expert alone).", metavar="mean|worst")] = "mean",
    drop: Annotated[bool, Opt("--drop", help="auto: may leave members out of the merge.")] = False,
    holdout: Annotated[float, Opt("--holdout", help="auto: fraction of each task's examples held out of the "
                                  "search and judged after it.")] = 0.5,
    trace: Annotated[Optional[str], Opt("--trace", help="auto: every candidate and its dev accuracies, as JSONL; "
                                        "an existing trace of the same search is continued.", metavar="FILE")] = None,
    predict: Annotated[Optional[str], Opt("--predict", help="auto --drop: a diagnose --fit pair model whose "
                                          "forecast orders the members to leave out.", metavar="MODEL.json")] = None,
    scores: Annotated[Optional[str], Opt("--scores", help="auto: score records; their weight --by score starts "
                                         "the search too.", metavar="FILE")] = None,
    batch_tokens: BatchTokens = None,
    base: Annotated[Optional[str], Opt("--base", help="Base model (dir, HF id, .gguf): for full-model inputs, "
                                       "--save-model, the fingerprint check and the data-aware methods.",
                                       metavar="MODEL")] = None,
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
    if list_methods:
        return _list_methods()
    if not inputs:
        raise UsageError("inputs", "no adapters given", "pass adapter files, directories, or -")
    from .. import merge_run as mr
    from ..merging import DataOptions, check_data_options, read_dev
    from ..methods import Params, check_inputs, get
    from ..methods.engine import check_options, describe, widest_dtype
    from ..model import resolve_base

    auto = method == "auto"
    m = None if auto else get(method)
    with_data = auto or m.data
    to_blob, out_dtype = _check_outputs(inputs, weights, base_acc, output, save_peft, save_model, base, dtype, rank)
    dev = pick_device(device)
    p = Params(lam=lam, density=density, trim_scope=trim_scope, rescale=rescale, t=t, seed=seed, gamma=gamma,
               alpha=alpha, epsilon=epsilon, inner=inner, for_task=for_task, tau=tau, rank_fraction=rank_fraction,
               common_fraction=common_fraction, eta=eta, correction=correction, nuslerp_row_wise=nuslerp_row_wise,
               nuslerp_flatten=nuslerp_flatten, ram_epsilon=ram_epsilon, tall_lambda=tall_lambda,
               consensus_k=consensus_k)
    if not auto:
        check_options(m, p, {opt for opt, v in (("weights", weights), ("base-acc", base_acc)) if v})  # before any input
    opts = DataOptions(norm=norm, batch_tokens=batch_tokens, steps=steps, lr=lr, granularity=granularity,
                       budget=budget, population=population, l1=l1, seed=seed, objective=objective, drop=drop,
                       holdout=holdout, trace=trace, predict=predict, scores=scores)
    given = {"weights": bool(weights), "base-acc": bool(base_acc), "density": density is not None,
             "alpha": alpha != 0.9}
    check_data_options(method, with_data, data, base, opts, given)
    examples = read_dev(data) if with_data else None

    b = resolve_base(base, gguf_file) if base else None
    updates, base_fp = mr.read_inputs(inputs, b, allow_pickle, p, weights, base_acc)
    if not auto:
        check_inputs(m, len(updates), p)
    out_name = name or (Path(output).name.removesuffix(".safetensors") if output and output != "-"
                        else f"{method}-merge")
    out_dtype = out_dtype or widest_dtype(updates)
    keep_dtype = None if dtype == "auto" else out_dtype
    if mr.streams(updates, m, with_data, rank, save_peft, to_blob, save_model):
        meta = describe(updates, m, p, rank=rank, base_model=base, base_fingerprint=base_fp)
        return mr.merge_streaming(updates, m, p, b, dev, meta, out_name, save_model, output, out_dtype, keep_dtype,
                                  allow_pickle)
    total, unit = mr.steps_of(method, steps, budget) if with_data else (0, "")
    bar = progress_bar(total, quiet, method, unit)
    t0 = time.monotonic()
    merged = mr.merge_in_memory(method, m, updates, p, dev, examples, b, opts, bar, rank=rank, name=out_name,
                                base_model=base, base_fingerprint=base_fp, dtype=out_dtype)
    bar(None)
    if auto:
        _auto_summary(merged.meta["auto"], time.monotonic() - t0)
    mr.write_outputs(merged, b, dev, save_model, save_peft, to_blob, output, allow_pickle, keep_dtype)
    log.info("merged %d inputs with %s: %d modules, %s%s", len(updates), merged.meta["method"], len(merged.modules),
             mr.kinds(merged), f" -> {output}" if output and output != "-" else "")


def _list_methods() -> None:
    from ..methods import all_methods

    for m in sorted(all_methods().values(), key=lambda m: m.name):
        typer.echo(f"{m.name:16} {m.pretty:28} {m.reference}")
        typer.echo(f"{'':16} {m.summary}")
    typer.echo(f"{'auto':16} {'Search (needs --data)':28} merge --help")
    typer.echo(f"{'':16} The best merge of the inputs on dev examples: method, options, weights, members.")


def _check_outputs(inputs, weights, base_acc, output, save_peft, save_model, base, dtype, rank) -> tuple:
    """Where the merge goes, checked before any input is read: whether it is written as a blob (a file or stdout),
    and the output dtype (None: auto, the inputs' widest)."""
    import torch

    from ..outputs import check_output
    from ..streams import refuse_binary_to_tty

    if "-" in inputs and (weights == "-" or base_acc == "-"):
        raise UsageError("-", "stdin is named twice", "read adapters or weights from stdin, not both")
    to_blob = output is not None or not (save_peft or save_model)
    if to_blob:
        refuse_binary_to_tty(output)
        check_output(output)
    if save_model and not base:
        raise UsageError("--save-model", "needs the base model", "pass --base MODEL")
    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise UsageError("--dtype", f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
    if rank is not None and rank < 1:
        raise UsageError("--rank", f"{rank} is not a positive rank", "pass --rank 16, say")
    return to_blob, dtypes[dtype]


def _auto_summary(a: dict, seconds: float) -> None:
    """The search's result on stderr: the recipe, then per task the accuracies on the examples it searched on
    (dev) and on those it never saw (held out), alone and merged, and the objective on each."""
    r = a["recipe"]
    opts = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["options"].items())
    log.info("auto: %d candidates judged (%.0f s); best %s (%s)%s", a["judged"], seconds, r["method"], opts,
             f", leaving out {', '.join(a['dropped'])}" if a["dropped"] else "")
    if r["weights"] is not None:
        log.info("auto: weights %s", ", ".join(f"{n} {w:.3f}" for n, w in zip(r["members"], r["weights"])))
    d, h = a["dev"], a["holdout"]
    log.info("%-24s %14s %14s %14s %14s", "task", "dev alone", "dev merged", "held alone", "held merged")
    for t in d["merged"]:
        held = (f"{h['alone'][t]:.3f} (n={h['n'][t]})", f"{h['merged'][t]:.3f}") if h else ("-", "-")
        log.info("%-24s %14s %14s %14s %14s", t[:24], f"{d['alone'][t]:.3f} (n={d['n'][t]})", f"{d['merged'][t]:.3f}",
                 *held)
    mean = lambda x: sum(x.values()) / len(x)  # noqa: E731
    log.info("normalised accuracy (merged/alone): dev mean %.3f worst %.3f; held out %s", mean(d["normalised"]),
             min(d["normalised"].values()),
             f"mean {h['mean']:.3f} worst {h['worst']:.3f}" if h else "none (--holdout 0)")
