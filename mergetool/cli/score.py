"""``mergetool score``: the mergeability score of every adapter in a pool, with what explains it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
from .app import begin, command
from .common import (AllowPickle, BaseModel, BatchTokens, Chat, Debug, Device, GgufFile, ModelDtype, Norm, Quiet,
                     Ray, Seed, Shots, ShotsFrom, Unordered, Workers, model_dtype, pick_device, progress_bar)

log = logging.getLogger("mergetool")

HELP = """Score how mergeable each adapter of a pool is: S, the fraction of random merges it survives.

In each of N trials an adapter is merged with M partners drawn from the pool without replacement, and the
merge is evaluated on the adapter's own data: the multiple-choice question of the example it was trained
on (--level example; defaults M=50, N=5) or its task's held-out examples (--level task; M=10, N=5). S is
the mean over trials ("Will it Merge?", eq. 1-2). Trials are shared: N random partitions of the pool into
groups of M+1, each group merged once and evaluated on every member's data, so each adapter still gets N
trials with uniformly random partners at about N·P/(M+1) merges (--independent: one merge per adapter and
trial). Adapters are matched to DATA by the example id (metadata training.example, else the name) or task.
One JSONL record per adapter, written as it completes: the score and its trials, and what explains it
(the base model's p_correct, p_max, gap and rank on the data, the adapter's accuracy alone and Δ_trained,
the training text's perplexity and length, ‖ΔW‖_F and σ_max, the merging loss). A summary goes to stderr:
the histogram of S against Binomial(N, p) with a χ² test, and Spearman correlations of S with each
explanatory field, binned by S; --plot draws them. With -o FILE, --resume continues a run that was
interrupted (Ctrl-C, kill -9, a crash) with nothing lost or redone.

\b
Examples:
  mergetool score --base BASE --data qa.jsonl --method knots pool/ > scores.jsonl
  mergetool score --base BASE --data qa.jsonl --trials 5 --partners 10 --method ties pool/ -o s.jsonl --resume
  mergetool score --base BASE --data tasks.jsonl --level task experts/ --plot s.png > task-scores.jsonl
  mergetool score --base BASE --data qa.jsonl --partners-from low-bin/ high/ > locality.jsonl
  mergetool score --base BASE --data qa.jsonl pool/ | mergetool weight --by score --tau 0.2 pool/ > w.jsonl
"""

Opt = typer.Option
EXPLAIN = ("gap", "rank", "p_correct", "p_max", "delta_trained", "perplexity", "length", "norm_f", "sigma_max",
           "effective_rank",
           "base_accuracy", "finetuned")


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
    independent: Annotated[bool, Opt("--independent", help="One merge per adapter and trial (no sharing).")] = False,
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
    plot: Annotated[Optional[str], Opt("--plot", help="Draw the histogram against the binomial and the binned "
                                       "explanatory fields to this PNG.", metavar="FILE.png")] = None,
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
    from ..methods import Params, check_options, get
    from ..score import DEFAULTS, check_level

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
    M, N = DEFAULTS[level]
    M = M if partners is None else partners
    N = N if trials is None else trials
    if M < 1 or N < 1:
        raise UsageError("--partners", "--partners and --trials must be at least 1", "pass positive counts")
    if shots < 0 or (batch_tokens is not None and batch_tokens < 16) or merge_chunk < 1:
        raise UsageError("options", "--shots ≥ 0, --batch-tokens ≥ 16, --merge-chunk ≥ 1", "fix the values")
    if "-" in pool and data == "-":
        raise UsageError("-", "stdin is named twice", "read the adapters or the examples from stdin, not both")
    if ray:
        from ..distributed import check_address

        check_address(ray)
    if workers is not None and workers < 1:
        raise UsageError("--workers", f"{workers} workers", "pass at least 1")
    if plot and not plot.endswith(".png"):
        raise UsageError("--plot", f"{plot!r} is not a .png file", "pass --plot scores.png")
    m = get(method)
    p = Params(lam=lam, density=density, trim_scope=trim_scope, rescale=rescale, seed=seed, gamma=gamma,
               epsilon=epsilon, inner=inner)
    check_options(m, p)
    torch_dtype = model_dtype(dtype)
    from ..outputs import check_output, refuse_overwriting_inputs

    check_output(output)
    refuse_overwriting_inputs(output, [data, shots_from, *pool, *(partners_from or [])])
    if m.max_inputs is not None and m.max_inputs < M + 1:
        raise UsageError("--method", f"{m.name} merges at most {m.max_inputs} adapters, a trial merges {M + 1}",
                         "choose a method for many inputs (knots, ties, mean, ...)")

    from ..examples import add_contexts, check_examples
    from ..inputs import check_compatible, load_inputs
    from ..jsonl import read_jsonl
    from ..model import content_digest, fingerprint, load_model, load_tokenizer, resolve_base
    from .. import score as sc

    src = "<stdin>" if data == "-" else data
    everything = check_examples(read_jsonl(data), src)
    examples = [e for e in everything if e.rec.get("split") != "train"]
    train_pool = [e for e in everything if e.rec.get("split") == "train"]
    if not examples:
        raise MergetoolError(src, "has no examples to score on (all are split=train)", "give held-out examples")
    b = resolve_base(base, gguf_file)
    fp = fingerprint(b)
    updates = sorted(load_inputs(list(pool), b, allow_pickle), key=lambda u: u.name)
    extra = load_inputs(list(partners_from), b, allow_pickle) if partners_from else []
    check_compatible(updates + extra, fp)
    names = [u.name for u in updates]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise MergetoolError(dup, "two adapters of the pool share this name", "rename one (metadata 'name')")
    everyone = updates + sorted((u for u in extra if u.name not in set(names)), key=lambda u: u.name)
    scored = list(range(len(updates)))
    partner_pool = ([i for i, u in enumerate(everyone) if u.name in {x.name for x in extra}] if partners_from
                    else None)
    data_of = sc.match(everyone, examples, level)
    groups = sc.plan(len(everyone), M, N, seed, independent or bool(partners_from),
                     scored if partners_from else None, partner_pool)
    key = _plan_key(everyone, examples, level, m, p, M, N, seed, independent, norm, shots, chat,
                    f"{fp}:{content_digest(b)}", partner_pool)

    out_path = Path(output) if output and output != "-" else None
    state = _State(out_path, key, resume)
    written = state.written
    todo_groups = [g for g in range(len(groups)) if g not in state.groups]
    need_explain = [a for a in scored if names[a] not in written and a not in state.explained]
    if state.finished and all(names[a] in written for a in scored):  # resumed after its end: nothing to do
        log.info("%s holds the records of this run, finished: nothing to do", output)
        _report([written[names[a]] for a in scored], N, level, quiet, plot)
        return
    log.info("%d adapters, %d trials each with %d partners: %d merges (%d done before)%s", len(updates), N, M,
             len(groups), len(groups) - len(todo_groups),
             "" if independent or partners_from else f", shared (independent: {len(updates) * N})")

    dev = pick_device(device)
    if ray:
        from .. import distributed as dist

        tok = load_tokenizer(b) if chat else None
    else:
        model, tok = load_model(b, dev, torch_dtype)
    if shots or chat:
        pool_demo = check_examples(read_jsonl(shots_from), shots_from) if shots_from else train_pool
        add_contexts(examples, pool_demo, shots, seed, tok, chat)
    else:
        for e in examples:
            e.context = e.rec.get("prompt", "")
    if ray:  # the same jobs, on the cluster's workers (each with the model resident)
        cluster = dist.connect(ray, workers, base, gguf_file, fp, device, dtype if dtype != "auto" else None)
        spec = dist.examples_spec(examples, key, data_of=data_of, method=m.name, params=p, norm=norm,
                                  batch_tokens=batch_tokens, merge_chunk=merge_chunk)
        scorer = dist.RayScorer(cluster, spec, cluster.put_updates(everyone), merge_chunk, not unordered)
    else:
        scorer = sc.Scorer(model, tok, everyone, examples, data_of, m, p, dev, norm, batch_tokens, merge_chunk)
    from ..streams import StdoutText

    sink = state.open(StdoutText())
    try:
        if need_explain:
            texts = [sc.training_text(everyone[a], examples, data_of[a], level, train_pool) for a in need_explain]
            for a, rec in scorer.explain(need_explain, texts).items():
                state.explained[a] = rec
                state.log({"kind": "explain", "adapter": a, "fields": rec})
        per: dict[int, list] = {a: [None] * N for a in scored}
        watched: dict[int, list[float]] = {a: [] for a in scored}
        for g, res in state.groups.items():
            _collect(groups[g], res, per, watched)
        records: list[dict] = []

        def emit_ready():
            for a in scored:
                if names[a] in written or any(v is None for v in per[a]):
                    continue
                e = examples[data_of[a][0]]
                rec = sc.record(names[a], e.task, level, e.id if level == "example" else None, per[a], M, m, p,
                                seed, state.explained[a], watched[a] if partners_from else None)
                rec["run"] = key  # the plan's key: --resume tells this run's records from another's
                sink.write(json.dumps(rec) + "\n")
                sink.flush()
                written[names[a]] = rec

        def done(g, res):
            state.groups[g] = res
            state.log({"kind": "group", "group": g, "results": {str(a): v for a, v in res.items()}})
            _collect(groups[g], res, per, watched)
            emit_ready()

        emit_ready()
        bar = progress_bar(len(todo_groups), quiet, "score", "merges")
        try:
            scorer.run_groups(groups, todo_groups, done, bar)
        finally:
            bar(None)
        records = [written[n] for n in names if n in written]
    finally:
        state.close(sink)
    state.finish()
    _report(records, N, level, quiet, plot)


def _report(records: list[dict], N: int, level: str, quiet: bool, plot: str | None) -> None:
    """The summary table on stderr, and the figure with --plot."""
    _summary(records, N, level, quiet)
    if plot:
        from ..plots import score_figure

        score_figure(records, N, level, EXPLAIN, plot)
        log.info("wrote %s", plot)


def _collect(group, res: dict[int, float], per: dict[int, list], watched: dict[int, list[float]]) -> None:
    for a in group.counted:
        per[a][group.trial] = res[a]
    if group.watched:
        watched[group.counted[0]].append(sum(res[w] for w in group.watched) / len(group.watched))


def _plan_key(everyone, examples, level, m, p, M, N, seed, independent, norm, shots, chat, fp, partner_pool) -> str:
    """What a run's results depend on (the adapters' contents and the base's weights included); --resume refuses
    a file written by a run with another."""
    from ..methods import effective_params

    doc = {"adapters": [[u.name, u.meta, u.digest()] for u in everyone], "examples": [e.id for e in examples], "level": level,
           "method": m.name, "params": effective_params(m, p), "M": M, "N": N, "seed": seed,
           "independent": independent, "norm": norm, "shots": shots, "chat": chat, "base": fp,
           "partners_from": partner_pool}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    """A run's progress beside its output: ``FILE.trials`` holds the plan's key, then one line per finished
    merge group and per explained adapter, flushed as they finish; ``FILE`` holds the finished records, each
    with the plan's key (``run``). --resume reads both, refuses another plan's files, drops a last line cut by
    a crash, and finds a finished run (its records, no ``.trials`` file) with nothing left to do."""

    def __init__(self, out: Path | None, key: str, resume: bool):
        self.out, self.key = out, key
        self.side = out.with_name(out.name + ".trials") if out else None
        self.groups: dict[int, dict[int, float]] = {}
        self.explained: dict[int, dict] = {}
        self.written: dict[str, dict] = {}
        self.finished = False
        self.fh = None
        if out is None:
            return
        if out.parent and not out.parent.exists():
            raise MergetoolError(str(out), "its directory does not exist", "create it first")
        if not resume:
            return
        from ..jsonl import resume_records

        cuts = []
        if self.side.exists():
            lines, cut = resume_records(self.side, "score")
            cuts.append(cut)
            if not lines or lines[0].get("key") != key:
                raise MergetoolError(str(self.side), "was written by a run with other adapters, data or options",
                                     "resume with the same command, or start afresh without --resume")
            for i, r in enumerate(lines[1:], 2):
                try:
                    if r["kind"] == "group":
                        self.groups[int(r["group"])] = {int(a): float(v) for a, v in r["results"].items()}
                    else:
                        self.explained[int(r["adapter"])] = dict(r["fields"])
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise MergetoolError(f"{self.side}:{i}", "is not a line score wrote", "start afresh without "
                                         "--resume") from None
        if out.exists():
            recs, cut = resume_records(out, "score")
            cuts.append(cut)
            for i, r in enumerate(recs, 1):
                if not isinstance(r.get("adapter"), str):
                    raise MergetoolError(f"{out}:{i}", "is not a score record (no 'adapter')",
                                         "resume into a file score wrote")
                self.written[r["adapter"]] = r
            if any(r.get("run") != key for r in self.written.values()):
                raise MergetoolError(str(out), "holds records of a run with other adapters, data or options",
                                     "resume with the same command, or start afresh without --resume")
            # a finished run removes its .trials file: its records, all of this plan, are complete
            self.finished = bool(self.written) and not self.side.exists()
        for cut in cuts:  # accepted: lines cut by a crash are dropped (and redone)
            cut()

    def open(self, stdout):
        if self.out is None:
            return stdout
        fresh = not self.side.exists() or not (self.groups or self.explained)
        self.fh = open(self.side, "w" if fresh else "a")
        if fresh:
            self.log({"kind": "plan", "key": self.key})
        return open(self.out, "a" if self.written else "w")

    def log(self, obj: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(obj) + "\n")
            self.fh.flush()

    def close(self, sink) -> None:
        if self.fh is not None:
            self.fh.close()
            sink.close()

    def finish(self) -> None:
        if self.side is not None and self.side.exists():
            self.side.unlink()




def _summary(records: list[dict], trials: int, level: str, quiet: bool) -> None:
    """The histogram of S against the binomial null, and S's correlations with each explanatory field, binned."""
    if quiet or not records:
        return
    from rich.console import Console
    from rich.table import Table

    from ..stats import binned, binomial_fit, correlate, format_p

    con = Console(stderr=True)
    scores = [r["score"] for r in records]
    if level == "example":
        fit = binomial_fit(scores, trials)
        t = Table(title=f"S of {fit['n']} adapters against Binomial(N={trials}, p={fit['p']:.3f})")
        t.add_column("S")
        t.add_column("adapters", justify="right")
        t.add_column("binomial", justify="right")
        for j, (o, e) in enumerate(zip(fit["observed"], fit["expected"])):
            t.add_row(f"{j / trials:.2f}", str(o), f"{e:.1f}")
        con.print(t)
        test = (f"χ²={fit['chi2']:.2f}, dof={fit['dof']}, p={format_p(fit['p_value'])}" if fit["chi2"] is not None
                else "χ² test: too few bins")
        disp = f"{fit['dispersion']:.2f}" if fit["dispersion"] is not None else "n/a"
        con.print(f"mean S {fit['mean']:.3f}; {test}; dispersion var(S)/binomial var = {disp}")
    else:
        con.print(f"mean S {sum(scores) / len(scores):.3f} over {len(scores)} adapters")
    fields = [f for f in EXPLAIN if any(r.get(f) is not None for r in records)]
    t = Table(title="Spearman correlation of S with each field")
    for c in ("field", "rho", "p", "n"):
        t.add_column(c, justify="right" if c != "field" else "left")
    for f in fields:
        c = correlate(scores, [r.get(f) for r in records])
        t.add_row(f, _fmt(c["spearman"]), format_p(c["spearman_p"]), str(c["n"]))
    con.print(t)
    rows = binned(records, "score", fields, trials)
    t = Table(title="mean ± standard error per bin of S")
    t.add_column("field")
    for row in rows:
        t.add_column(f"S {row['bin']} (n={row['n']})", justify="right")
    for f in fields:
        t.add_row(f, *[f"{_fmt(row[f + '_mean'])} ± {_fmt(row[f + '_se'])}" for row in rows])
    con.print(t)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3g}"
