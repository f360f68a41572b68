"""``mergetool score``: the mergeability score of every adapter in a pool, with its control and what explains
it. Parses and checks the options, calls the library (``score_run``, ``score_summary``), prints the summary."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
from .app import begin, command
from .common import (AllowPickle, BaseModel, BatchTokens, Chat, Debug, Device, GgufFile, ModelDtype, Norm, Quiet,
                     Ray, Seed, Shots, ShotsFrom, Unordered, Workers, base_input, model_dtype, pick_device,
                     progress_bar)

log = logging.getLogger("mergetool")

HELP = """Score how mergeable each adapter of a pool is: S, the fraction of random merges it survives, beside a
control.

In each of N trials an adapter is merged with M partners drawn from the pool without replacement, and the
merge is evaluated on the adapter's own data: the multiple-choice question of the example it was trained
on (--level example; defaults M=50, N=5) or its task's held-out examples (--level task; M=10, N=5). S is
the mean over trials ("Will it Merge?", eq. 1-2). Trials are shared: N random partitions of the pool into
groups of M+1, each group merged once and evaluated on every member's data, so each adapter still gets N
trials with uniformly random partners at about N·P/(M+1) merges (--independent: one merge per adapter and
trial). The control: in each trial the adapter's data is also evaluated under a merge without it (another
group of the same partition; with --independent or --partners-from its partners merged alone), so
contribution = S − control is what the adapter itself adds; off_target is what it does alone to other
adapters' data (--off-target of them); --no-control runs neither. Adapters are matched to DATA by the
example id (metadata training.example, else the name) or task. One JSONL record per adapter, written as it
completes: the score, control and contribution with their trials and merges, and what explains S (the base
model's p_correct, p_max, gap and rank on the data, the adapter's accuracy alone and Δ_trained, the training
text's perplexity and length, ‖ΔW‖_F and σ_max, the merging loss). A summary goes to stderr: S, control and
contribution with intervals that resample merges and adapters, the histogram of S against Binomial(N, p)
with a permutation test within merges, and the Spearman correlations of S and of the contribution with each
explanatory field, binned by S; --plot draws them; --summary prints them again from a records file. With
-o FILE, --resume continues a run that was interrupted (Ctrl-C, kill -9, a crash) with nothing lost or
redone.

\b
Examples:
  mergetool score --base BASE --data qa.jsonl --method knots pool/ > scores.jsonl
  mergetool score --base BASE --data qa.jsonl --trials 5 --partners 10 --method ties pool/ -o s.jsonl --resume
  mergetool score --base BASE --data tasks.jsonl --level task experts/ --plot s.png > task-scores.jsonl
  mergetool score --base BASE --data qa.jsonl --partners-from low-bin/ high/ > locality.jsonl
  mergetool score --summary scores.jsonl --plot scores.png > summary.json
  mergetool score --base BASE --data qa.jsonl pool/ | mergetool weight --by score --tau 0.2 pool/ > w.jsonl
"""

Opt = typer.Option


@command("score", help=HELP, short_help="Mergeability score of each adapter in a pool: JSONL records.",
             no_args_is_help=True)
def score_cmd(
    pool: Annotated[Optional[list[str]], typer.Argument(help="The pool: adapter files, directories, or - for stdin.",
                                                        show_default=False, metavar="ADAPTER...")] = None,
    data: Annotated[Optional[str], Opt("--data", help="Examples JSONL the adapters are scored on (split=train "
                                       "records are demonstrations and training text, not scored).",
                                       metavar="DATA.jsonl")] = None,
    base: BaseModel = None,
    gguf_file: GgufFile = None,
    method: Annotated[str, Opt("--method", "-m", help="Merge method (merge --list-methods).", metavar="NAME")] = "knots",
    inner: Annotated[str, Opt("--inner", help="KnOTS: the method that merges the aligned coordinates.",
                              metavar="NAME")] = "ties",
    density: Annotated[Optional[float], Opt("--density", help="Fraction kept by trim/drop, in (0, 1] (the method's "
                                            "default when not given).")] = None,
    trim_scope: Annotated[str, Opt("--trim-scope", help="Trim scope: global or tensor.",
                                   metavar="global|tensor")] = "global",
    rescale: Annotated[str, Opt("--rescale", help="DARE/DELLA rescale: paper, l1, none.",
                                metavar="paper|l1|none")] = "paper",
    lam: Annotated[float, Opt("--lambda", help="Scale of each merged update.")] = 1.0,
    gamma: Annotated[float, Opt("--gamma", help="Breadcrumbs: fraction of largest entries dropped.")] = 0.01,
    epsilon: Annotated[float, Opt("--epsilon", help="DELLA: spread of keep probabilities.")] = 0.15,
    trials: Annotated[Optional[int], Opt("--trials", "-N", help="Trials per adapter (default 5).")] = None,
    partners: Annotated[Optional[int], Opt("--partners", "-M", help="Partners per merge (default 50 at example "
                                           "level, 10 at task level).")] = None,
    seed: Seed("Seed of the trial plan (and of random drops).") = 0,
    level: Annotated[str, Opt("--level", help="example (an adapter per example: its answer's correctness) or "
                              "task (an adapter per task: its accuracy).", metavar="example|task")] = "example",
    independent: Annotated[bool, Opt("--independent", help="One merge per adapter and trial (no sharing); the "
                                      "control merges its partners alone.")] = False,
    no_control: Annotated[bool, Opt("--no-control", help="No control trials and no off-target evaluation (the "
                                    "paper's S alone, at about half the evaluations).")] = False,
    off_target: Annotated[Optional[int], Opt("--off-target", help="Other adapters' data each adapter is evaluated "
                                             "on alone for off_target (a seeded sample; default N, as many as its "
                                             "trials; 0: none).", metavar="K", show_default=False)] = None,
    partners_from: Annotated[Optional[list[str]], Opt("--partners-from", help="Draw partners only from these "
                                                      "adapters (files or directories; repeatable): the locality "
                                                      "experiment; their own accuracy is reported too.",
                                                      metavar="ADAPTER", show_default=False)] = None,
    norm: Norm = "tokens",
    shots: Shots = 0,
    shots_from: ShotsFrom = None,
    chat: Chat = False,
    batch_tokens: BatchTokens = None,
    merge_chunk: Annotated[int, Opt("--merge-chunk", help="Groups merged (and kept on the device) at once.")] = 8,
    output: Annotated[Optional[str], Opt("-o", "--output", help="Write records here as they complete.",
                                         metavar="FILE")] = None,
    resume: Annotated[bool, Opt("--resume", help="With -o: continue an interrupted run of the same plan.")] = False,
    plot: Annotated[Optional[str], Opt("--plot", help="Draw S, control and contribution, the histogram against the "
                                       "binomial, the Spearman table and the binned explanatory fields to this PNG.",
                                       metavar="FILE.png")] = None,
    summary: Annotated[Optional[str], Opt("--summary", help="Run nothing: summarise these score records (one run's) "
                                          "on stderr, --plot them, and write the summary as JSON to stdout or -o.",
                                          metavar="RECORDS.jsonl")] = None,
    ray: Ray = None,
    workers: Workers = None,
    unordered: Unordered = False,
    dtype: ModelDtype = "auto",
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
):
    begin("score", quiet, debug)
    if summary is not None:
        return _summary_only(summary, pool, data, base, output, plot, seed, quiet)
    from .. import score_run as run
    from ..methods import Params, check_options, get

    _check_inputs(pool, data, base, level, norm, resume, output)
    M, N = run.sizes(level, partners, trials)
    off_target = N if off_target is None else off_target
    if shots < 0 or (batch_tokens is not None and batch_tokens < 16) or merge_chunk < 1 or off_target < 0:
        raise UsageError("options", "--shots ≥ 0, --batch-tokens ≥ 16, --merge-chunk ≥ 1, --off-target ≥ 0",
                         "fix the values")
    _check_streams_and_ray(pool, data, ray, workers)
    _check_plot(plot)
    m = get(method)
    p = Params(lam=lam, density=density, trim_scope=trim_scope, rescale=rescale, seed=seed, gamma=gamma,
               epsilon=epsilon, inner=inner)
    check_options(m, p)
    torch_dtype = model_dtype(dtype)
    from ..outputs import check_output, refuse_destroying_inputs

    check_output(output)
    if m.max_inputs is not None and m.max_inputs < M + 1:
        raise UsageError("--method", f"{m.name} merges at most {m.max_inputs} adapters, a trial merges {M + 1}",
                         "choose a method for many inputs (knots, ties, mean, ...)")
    from ..model import content_digest, fingerprint, resolve_base

    b = resolve_base(base, gguf_file)
    inputs = [data, shots_from, *pool, *(partners_from or []), base_input(b)]
    for o in (output, output + ".trials" if output and output != "-" else None):
        refuse_destroying_inputs(o, inputs)
    if plot:
        refuse_destroying_inputs(plot, inputs, "--plot")
    examples, train_pool, demos = run.read_examples(data, shots_from)
    fp = fingerprint(b)
    the_pool = run.load_pool(pool, partners_from, b, fp, allow_pickle, examples, level)
    control = not no_control
    groups = run.plan_groups(the_pool, M, N, seed, independent, control)
    key = run.run_key(the_pool, examples, demos if shots else [], m, p, f"{fp}:{content_digest(b)}", level=level,
                      M=M, N=N, seed=seed, independent=independent, control=control,
                      off_target=off_target if control else 0, norm=norm, shots=shots, chat=chat, dtype=dtype,
                      device=device)
    progress = run.Progress(output, key, resume)
    names = the_pool.names
    if progress.finished and all(names[a] in progress.written for a in the_pool.scored):  # nothing to do
        log.info("%s holds the records of this run, finished: nothing to do", output)
        _report([progress.written[names[a]] for a in the_pool.scored], seed, quiet, plot)
        return
    _log_plan(len(the_pool.scored), M, N, groups, progress, not (independent or partners_from), control)
    scorer = run.scorer(b, fp, the_pool, examples, demos, m, p, key, pick_device(device), torch_dtype, shots=shots,
                        chat=chat, seed=seed, norm=norm, batch_tokens=batch_tokens, merge_chunk=merge_chunk,
                        level=level, off_target=off_target if control else 0, ray=ray, workers=workers,
                        unordered=unordered, base_name=base, gguf_file=gguf_file, device=device, dtype=dtype)
    settings = run.Settings(level, M, N, m, p, seed, control)
    records = run.run(scorer, the_pool, groups, examples, train_pool, settings, progress,
                      lambda total: progress_bar(total, quiet, "score", "merges"))
    _report(records, seed, quiet, plot)


def _check_inputs(pool, data, base, level, norm, resume, output) -> None:
    from ..score import check_level

    if not pool:
        raise UsageError("pool", "no adapters given", "pass adapter files, directories, or -")
    if not data:
        raise UsageError("--data", "no examples given", "pass --data DATA.jsonl")
    if not base:
        raise UsageError("--base", "score needs the base model", "pass --base MODEL")
    check_level(level)
    if norm not in ("tokens", "chars", "none"):
        raise UsageError("--norm", f"unknown norm {norm!r}", "use tokens, chars or none")
    if resume and (not output or output == "-"):
        raise UsageError("--resume", "needs -o FILE (a file, not stdout)", "write the records to a file to resume them")


def _check_streams_and_ray(pool, data, ray, workers) -> None:
    if "-" in pool and data == "-":
        raise UsageError("-", "stdin is named twice", "read the adapters or the examples from stdin, not both")
    if ray:
        from ..distributed import check_address

        check_address(ray)
    if workers is not None and workers < 1:
        raise UsageError("--workers", f"{workers} workers", "pass at least 1")


def _log_plan(n: int, M: int, N: int, groups, progress, shared: bool, control: bool) -> None:
    log.info("%d adapters, %d trials each with %d partners: %d merges (%d done before)%s%s", n, N, M,
             len(groups), sum(1 for g in range(len(groups)) if g in progress.groups),
             f", shared (independent: {n * N})" if shared else "",
             "; the control evaluates each adapter's data under a merge without it per trial"
             + ("" if shared else " (its partners merged alone)") if control else "")


def _check_plot(plot: str | None) -> None:
    from ..outputs import check_figure_output

    if plot and not plot.endswith(".png"):
        raise UsageError("--plot", f"{plot!r} is not a .png file", "pass --plot scores.png")
    check_figure_output(plot)


def _summary_only(path: str, pool, data, base, output, plot, seed: int, quiet: bool) -> None:
    """--summary RECORDS: the summary of committed records, on stderr, in --plot, and as JSON on stdout or -o."""
    if pool or data or base:
        raise UsageError("--summary", "summarises records and runs nothing", "drop the adapters, --data and --base")
    _check_plot(plot)
    from ..jsonl import read_jsonl, record_line
    from ..outputs import atomic_output, check_output, refuse_destroying_inputs

    check_output(output)
    refuse_destroying_inputs(output, [path])
    records = read_jsonl(path)
    for i, r in enumerate(records, 1):
        if not isinstance(r.get("adapter"), str) or not isinstance(r.get("score"), (int, float)):
            raise MergetoolError(f"{path}:{i}", "is not a score record (no 'adapter' and 'score')",
                                 "pass the records score wrote")
    summ = _report(records, seed, quiet, plot)
    with atomic_output(output) as fh:
        fh.write(record_line(_jsonable(summ), "the summary").encode("utf-8"))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return x


def _report(records: list[dict], seed: int, quiet: bool, plot: str | None) -> dict:
    """The summary (``score_summary``) on stderr, and the figure with --plot; returns it."""
    from ..score_summary import summarize

    summ = summarize(records, seed) if records else {"n": 0}
    if not quiet and records:
        _print_summary(summ)
    if plot and records:
        from ..plots import score_figure

        score_figure(records, summ, plot)
        log.info("wrote %s", plot)
    return summ


def _print_summary(s: dict) -> None:
    """The tables on stderr: S, control and contribution; the histogram and the existence test (example level);
    the Spearman table of S and of the contribution; the fields per bin of S."""
    from rich.console import Console
    from rich.table import Table

    from ..stats import format_p

    con = Console(stderr=True)
    level_pct = f"{round(100 * s['level_ci'])}%" if s.get("level_ci") else None
    t = Table(title=f"S, control and contribution of {s['n']} adapters"
              + (f" ({level_pct} intervals: adapters and the {s['merges']} merges resampled)" if level_pct else ""))
    for c in ("", "mean", "interval", "adapters"):
        t.add_column(c, justify="right" if c else "left")
    for m, v in s["means"].items():
        t.add_row(m, _fmt(v["mean"]), _interval(v["ci"]), str(v["n"]))
    con.print(t)
    c = s["means"].get("contribution") or {}
    if c.get("ci") and c["ci"][0] <= 0 <= c["ci"][1]:
        con.print("the contribution's interval covers 0: S cannot be told apart from the control (what merges "
                  "without the adapter score on its data); a high S may then only mean that such merges answer it "
                  "whoever is in them, and a test that the adapters differ may only show that their data differ")
    N = s["trials"]
    if s.get("binomial") and s["binomial"].get("n"):
        fit = s["binomial"]
        t = Table(title=f"S of {fit['n']} adapters against Binomial(N={N}, p={fit['p']:.3f})")
        t.add_column("S")
        t.add_column("adapters", justify="right")
        t.add_column("binomial", justify="right")
        for j, (o, e) in enumerate(zip(fit["observed"], fit["expected"])):
            t.add_row(f"{j / N:.2f}", str(o), f"{e:.1f}")
        con.print(t)
        disp = f"{fit['dispersion']:.2f}" if fit["dispersion"] is not None else "n/a"
        con.print(f"mean S {fit['mean']:.3f}; dispersion var(S)/binomial var = {disp}")
    ex = s.get("existence")
    if ex and ex.get("p") is not None:
        how = (f"outcomes shuffled among the members of each of {ex['merges']} merges" if ex["within"] else
               "outcomes shuffled across all merges (each merge holds one trial)")
        con.print(f"do adapters differ beyond their merges? permutation test ({how}, B={ex['permutations']}): "
                  f"p {_eq(format_p(ex['p'], ex['floor']))}")
    elif not s.get("design"):
        con.print("these records carry no merge ids (written before 2026-12): no test or interval that respects "
                  "the plan")
    t = Table(title="Spearman correlation with each field (p: permutation of the field; interval: adapters and "
              "merges resampled)")
    t.add_column("field")
    measures = list(dict.fromkeys(r["measure"] for r in s["spearman"]))
    for m in measures:
        t.add_column(f"ρ({m}) [interval]", justify="right")
        t.add_column("p", justify="right")
    t.add_column("n", justify="right")
    by = {(r["measure"], r["field"]): r for r in s["spearman"]}
    for f in s["fields"]:
        cells = []
        for m in measures:
            r = by[(m, f)]
            cells += [f"{_fmt(r['rho'])} {_interval(r['ci'])}", format_p(r["p"], r["floor"])]
        t.add_row(f, *cells, str(by[(measures[0], f)]["n"]) if measures else "")
    con.print(t)
    t = Table(title="mean ± standard error per bin of S")
    t.add_column("field")
    for row in s["bins"]:
        t.add_column(f"S {row['bin']} (n={row['n']})", justify="right")
    for f in s["bin_fields"]:
        t.add_row(f, *[f"{_fmt(row[f + '_mean'])} ± {_fmt(row[f + '_se'])}" for row in s["bins"]])
    con.print(t)


def _eq(p: str) -> str:
    """``= 0.083``, but ``≤ 0.0001`` as it stands."""
    return p if p[:1] in "<≤" else f"= {p}"


def _interval(ci) -> str:
    return "–" if not ci else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3g}"
