"""``mergetool diagnose``: will these adapters merge, and why? Before a merge, and explained after it."""

from __future__ import annotations

import logging
import math
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .app import begin, command
from .common import AllowPickle, BaseModel, BatchTokens, Chat, Debug, Device, GgufFile, ModelDtype, Quiet, Seed, \
    base_input, model_dtype, progress_bar

log = logging.getLogger("mergetool")

HELP = """Diagnose which adapters will merge and which group will collapse, before merging, and explain after.

Weight space, for every pair: the parameter-conflict metrics of "Task-level model-merging collapse"
(magnitude change, sign change, conflicting magnitude change ratios; cosine) and the spectral family of
"Demystifying Mergeability" (principal-angle overlaps of column and row spaces, singular-value overlap, the
pair's effective and stable rank, spectral gap, magnitude ratio, angle, dot product), all pairs at once,
module by module, from the LoRA factors; per adapter: ‖ΔW‖_F, σ_max, effective rank.
With --base and --data: last-layer hidden states of every adapter on k examples of each task (batched),
HiddenSim, the merging difficulty score MDS, the hidden-state diameter with Theorem 1's bounds and the
exact smallest-ball radius, per merged group too; the distortion of actual merges (--merged: each against
the adapters it was merged from); the verdict for a budget (--budget); gradients (--gradients); what
explains a mergeability score (--explain, as score computes it).
With records of measured mergeability (--scores from score, --losses from merged groups): correlations,
ANOVAs with permutation p-values, the merging-loss table, Theorem 1 against the merges; --fit a sparse
linear predictor (leave-one-task-out, against every single metric with bootstrap intervals) and --predict
with it; --compare-fits compares predictors fitted per merge method; --select K --candidates POOL proposes
the group of K with the lowest worst MDS. --records FILE runs the statistics, fits and figures from
diagnose's own records, without the adapters or the model.
JSONL records (kind: pair, adapter, group, merge, stat, model, prediction, selection, comparison) on stdout;
tables on stderr; --plot DIR draws the figures.

\b
Examples:
  mergetool diagnose experts/*.safetensors > diag.jsonl
  mergetool diagnose --base BASE --data tasks.jsonl --budget 50 experts/ --plot figs/ > diag.jsonl
  mergetool merge -m ties experts/ | mergetool diagnose --base BASE --data tasks.jsonl --merged - experts/
  mergetool diagnose --base BASE --data tasks.jsonl --losses losses.jsonl --merged merges/ experts/ -o diag.jsonl
  mergetool diagnose --records diag.jsonl --losses losses.jsonl --fit ties.json --fit-method ties > stats.jsonl
  mergetool diagnose --compare-fits mean.json ties.json dare-ties.json
  mergetool diagnose --base BASE --data tasks.jsonl --select 6 --candidates more/ experts/
"""

Opt = typer.Option


@command("diagnose", help=HELP, short_help="Predict merge collapse and mergeability; explain them: JSONL.",
             no_args_is_help=True)
def diagnose_cmd(
    adapters: Annotated[Optional[list[str]], typer.Argument(help="Adapters: files, directories, or - for stdin "
                                                            "(with --compare-fits: model files).",
                                                            show_default=False, metavar="ADAPTER...")] = None,
    base: BaseModel = None,
    gguf_file: GgufFile = None,
    data: Annotated[Optional[str], Opt("--data", help="Examples JSONL: k held-out examples per task for hidden "
                                       "states; the adapters' data for gradients and --explain.",
                                       metavar="DATA.jsonl")] = None,
    k: Annotated[int, Opt("--k", help="Examples per task of the shared validation set.")] = 5,
    pool: Annotated[str, Opt("--pool", help="Hidden state of a prompt: its last token's, or the mean over its "
                             "tokens.", metavar="last|mean")] = "last",
    level: Annotated[str, Opt("--level", help="How adapters match data: task (an adapter per task) or example.",
                              metavar="task|example")] = "task",
    merged: Annotated[Optional[list[str]], Opt("--merged", help="Merges of the adapters (files, a pool, or -; "
                                               "repeatable): each one's distortion against the adapters it was "
                                               "merged from.", metavar="ADAPTER|-", show_default=False)] = None,
    budget: Annotated[Optional[float], Opt("--budget", help="Distortion budget D (squared hidden units) for the "
                                           "mergeability test of Corollary 1.")] = None,
    gradients: Annotated[bool, Opt("--gradients", help="Mean cross-entropy gradients on each adapter's data: "
                                   "pairwise L2, cosine, inner product.")] = False,
    grad_samples: Annotated[int, Opt("--grad-samples", help="Calibration examples per adapter.")] = 10,
    explain: Annotated[bool, Opt("--explain", help="Per adapter, what explains S: the base's p_correct, gap, "
                                 "rank; accuracy alone; Δ_trained; training-text perplexity and length.")] = False,
    scores: Annotated[Optional[str], Opt("--scores", help="score records to correlate the metrics with.",
                                         metavar="FILE")] = None,
    losses: Annotated[Optional[str], Opt("--losses", help="Merging-loss records of merged groups.",
                                         metavar="FILE")] = None,
    records: Annotated[Optional[list[str]], Opt("--records", help="Diagnose records (pair, adapter, group, merge) "
                                                "to analyse instead of adapters (repeatable).", metavar="FILE",
                                                show_default=False)] = None,
    fit: Annotated[Optional[str], Opt("--fit", help="Fit the sparse linear predictor (of S with --scores, of a "
                                      "pair's merge with --losses) and write it here.", metavar="MODEL.json")] = None,
    fit_method: Annotated[Optional[str], Opt("--fit-method", help="With --fit and --losses: the merge method "
                                             "whose pair losses to predict (default: their mean over methods).")] = None,
    features: Annotated[Optional[str], Opt("--features", help="Comma-separated features for --fit (default: "
                                           "every metric present in all records).")] = None,
    l1: Annotated[float, Opt("--l1", help="λ of the predictor's L1 penalty.")] = 1.0,
    predict: Annotated[Optional[str], Opt("--predict", help="Predict with a model from --fit.",
                                          metavar="MODEL.json")] = None,
    compare_fits: Annotated[bool, Opt("--compare-fits", help="Compare models from --fit (the positional "
                                      "arguments): top-5 metrics, overlap, sign agreement.")] = False,
    resamples: Annotated[int, Opt("--resamples", help="Bootstrap resamples of the intervals.")] = 1000,
    permutations: Annotated[int, Opt("--permutations", help="Permutations of the ANOVAs' and the Mantel tests.")] = 999,
    select: Annotated[Optional[int], Opt("--select", help="Propose a group of this many adapters with the "
                                         "lowest worst MDS.")] = None,
    candidates: Annotated[Optional[list[str]], Opt("--candidates", help="Adapters that may join the group "
                                                   "(repeatable).", metavar="ADAPTER", show_default=False)] = None,
    plot: Annotated[Optional[str], Opt("--plot", help="Write PNG figures into this directory.", metavar="DIR")] = None,
    seed: Seed("Seed of the validation and calibration draws, the fits and the resamples.") = 0,
    chat: Chat = False,
    batch_tokens: BatchTokens = None,
    output: Annotated[Optional[str], Opt("-o", "--output", help="Write the records here (atomically).",
                                         metavar="FILE")] = None,
    dtype: ModelDtype = "auto",
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
):
    begin("diagnose", quiet, debug)
    adapters = list(adapters or [])
    model_opts = [o for o, v in (("--merged", merged), ("--budget", budget is not None), ("--gradients", gradients),
                                 ("--explain", explain), ("--select", select is not None)) if v]
    _check_modes(adapters, compare_fits, records, model_opts, base, data, fit, predict, scores, losses, candidates)
    if pool not in ("last", "mean"):
        raise UsageError("--pool", f"unknown pooling {pool!r}", "use last or mean")
    if level not in ("task", "example"):
        raise UsageError("--level", f"unknown level {level!r}", "use task or example")
    if k < 1 or grad_samples < 1 or (batch_tokens is not None and batch_tokens < 16) or resamples < 0 or permutations < 0:
        raise UsageError("options", "--k, --grad-samples ≥ 1, --batch-tokens ≥ 16, --resamples and --permutations "
                         "≥ 0", "fix the values")
    if budget is not None and not (math.isfinite(budget) and budget >= 0):
        raise UsageError("--budget", f"{budget} is not a finite budget ≥ 0", "pass --budget 50, say")
    from ..diagnose.predict import check_lam

    check_lam(l1)
    if fit and not (scores or losses):
        raise UsageError("--fit", "needs measured mergeability to fit to", "pass --scores or --losses")
    if select is not None and (select < 2 or not candidates):
        raise UsageError("--select", "needs a group size ≥ 2 and --candidates", "pass --select K --candidates POOL")
    stdin_uses = sum(x == "-" for x in [*adapters, *(merged or []), *(records or []), scores, losses, data] if x)
    if stdin_uses > 1:
        raise UsageError("-", "stdin is named twice", "read one input from stdin")
    torch_dtype = model_dtype(dtype)
    from ..model import resolve_base
    from ..outputs import check_figure_output, check_output, refuse_destroying_inputs

    b = resolve_base(base, gguf_file) if base else None
    check_output(output)
    if fit:
        check_output(fit)
        if output and output != "-" and _same_file(fit, output):
            raise UsageError("--fit", f"{fit} is also -o: the model and the records would overwrite each other",
                             "write the model and the records to two files")
    check_figure_output(plot, "dir")
    inputs = [*adapters, *(merged or []), *(candidates or []), *(records or []), scores, losses, data, predict,
              b and base_input(b)]
    for opt, out in (("-o", output), ("--fit", fit), ("--plot", plot)):
        refuse_destroying_inputs(out, inputs, opt)

    from ..diagnose import run

    if compare_fits:
        return _finish(run.compare(adapters), output, quiet, None, None, None, [])
    score_recs, loss_recs, model_doc = run.read_measured(scores, losses, predict)
    spec = run.fit_spec(fit, scores, fit_method, l1, seed, resamples, features)
    if records:
        out, drawn = run.from_records(records, score_recs, loss_recs, spec, model_doc, seed, resamples, permutations)
        return _finish(out, output, quiet, fit, plot, loss_recs, drawn)
    setup = dict(level=level, k=k, pool=pool, seed=seed, batch_tokens=batch_tokens, gradients=gradients,
                 grad_samples=grad_samples, explain=explain, budget=budget, resamples=resamples,
                 permutations=permutations)
    out = run.measure(adapters, candidates, merged, b, data, chat, torch_dtype, device, allow_pickle, setup,
                      score_recs, loss_recs, spec, model_doc, select,
                      lambda total: progress_bar(total, quiet, "diagnose", "models"))
    _finish(out, output, quiet, fit, plot, loss_recs, out)


def _check_modes(adapters, compare_fits, records, model_opts, base, data, fit, predict, scores, losses,
                 candidates) -> None:
    """The three ways diagnose runs (compare fits; analyse records; measure adapters) and what each needs."""
    if compare_fits:
        others = [o for o, v in (("--base", base), ("--data", data), ("--records", records), ("--fit", fit),
                                 ("--predict", predict), ("--scores", scores), ("--losses", losses)) if v]
        if others or model_opts:
            raise UsageError((others + model_opts)[0], "does not go with --compare-fits",
                             "compare fits on their own: diagnose --compare-fits A.json B.json ...")
        if len(adapters) < 2:
            raise UsageError("--compare-fits", "needs two model files or more", "pass the files diagnose --fit wrote")
    elif records:
        if adapters or base or data or model_opts or candidates:
            raise UsageError("--records", "analyses records instead of adapters: adapters, --base, --data and "
                             "what needs them do not go with it", "pass the adapters or the records, not both")
    elif not adapters:
        raise UsageError("adapters", "no adapters given", "pass adapter files, directories, or - (or --records FILE)")
    if bool(base) != bool(data) and (base or data):
        raise UsageError("--base" if data else "--data", "hidden states need both --base and --data", "pass both")
    if model_opts and not base and not records:
        raise UsageError(model_opts[0], "needs the model's hidden states", "pass --base MODEL --data DATA.jsonl")


def _same_file(a: str, b: str) -> bool:
    import os

    try:
        return os.path.samefile(a, b) if os.path.exists(a) and os.path.exists(b) else \
            os.path.realpath(a) == os.path.realpath(b)
    except OSError:
        return False


def _finish(out: list[dict], output, quiet: bool, fit, plot, losses, drawn: list[dict]) -> None:
    """Write the records (and the fitted model), print the tables, draw the figures."""
    from ..diagnose import run, tables

    run.write_records(out, output, fit)
    if not quiet:
        _print(tables.tables(out))
    if plot:
        log.info("wrote %d figures into %s", run.draw(drawn, losses, plot), plot)


def _print(items) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=True)
    if not con.is_terminal:  # a log file: wide lines rather than cells cut to "…"
        con = Console(stderr=True, width=160)
    for it in items:
        if isinstance(it, str):
            con.print(it)
            continue
        t = Table(title=it.title)
        for c in it.columns:
            t.add_column(c)
        for row in it.rows:
            t.add_row(*row)
        con.print(t)
        if it.note:
            con.print(it.note)
