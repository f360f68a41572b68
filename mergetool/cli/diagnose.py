"""``mergetool diagnose``: will these adapters merge, and why? Before a merge, and explained after it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
from .app import begin, command
from .common import AllowPickle, BaseModel, BatchTokens, Chat, Debug, Device, GgufFile, ModelDtype, Quiet, Seed, \
    model_dtype, pick_device, progress_bar

log = logging.getLogger("mergetool")

HELP = """Diagnose which adapters will merge and which group will collapse, before merging, and explain after.

Weight space, for every pair: the parameter-conflict metrics of "Task-level model-merging collapse"
(magnitude change, sign change, conflicting magnitude change ratios; cosine), all pairs at once, streamed
module by module (LoRA inner products from the factors); per adapter: ‖ΔW‖_F, σ_max, effective rank.
With --base and --data: last-layer hidden states of every adapter on k examples of each task (batched),
HiddenSim, the merging difficulty score MDS, the hidden-state diameter with Theorem 1's bounds and the
exact smallest-ball radius, the distortion of an actual merge (--merged), the verdict for a budget
(--budget); gradients (--gradients); what explains a mergeability score (--explain, as score computes it).
With records of measured mergeability (--scores from score, --losses from merged groups): correlations with
p-values, ANOVAs, the merging-loss table; --fit a sparse linear predictor (leave-one-task-out) and
--predict with it; --select K --candidates POOL proposes the group of K with the lowest worst MDS.
JSONL records (kind: pair, adapter, group, stat, model, prediction, selection) on stdout; tables on
stderr; --plot DIR draws the figures.

\b
Examples:
  mergetool diagnose experts/*.safetensors > diag.jsonl
  mergetool diagnose --base BASE --data tasks.jsonl --budget 50 experts/ --plot figs/ > diag.jsonl
  mergetool diagnose --base BASE --data qa.jsonl --explain --scores scores.jsonl --fit s.model.json pool/
  mergetool merge -m ties experts/ | mergetool diagnose --base BASE --data tasks.jsonl --merged - experts/
  mergetool diagnose --base BASE --data tasks.jsonl --select 6 --candidates more/ experts/
"""

Opt = typer.Option


@command("diagnose", help=HELP, short_help="Predict merge collapse and mergeability; explain them: JSONL.",
             no_args_is_help=True)
def diagnose_cmd(
    adapters: Annotated[Optional[list[str]], typer.Argument(help="Adapters: files, directories, or - for stdin.",
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
    merged: Annotated[Optional[str], Opt("--merged", help="A merge of the adapters: measure its distortion.",
                                         metavar="ADAPTER|-")] = None,
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
    fit: Annotated[Optional[str], Opt("--fit", help="Fit the sparse linear predictor (of S with --scores, of a "
                                      "pair's merge with --losses) and write it here.", metavar="MODEL.json")] = None,
    fit_method: Annotated[Optional[str], Opt("--fit-method", help="With --fit and --losses: the merge method "
                                             "whose pair losses to predict (default: all).")] = None,
    features: Annotated[Optional[str], Opt("--features", help="Comma-separated features for --fit (default: "
                                           "every metric present in all records).")] = None,
    l1: Annotated[float, Opt("--l1", help="λ of the predictor's L1 penalty.")] = 1.0,
    predict: Annotated[Optional[str], Opt("--predict", help="Predict with a model from --fit.",
                                          metavar="MODEL.json")] = None,
    select: Annotated[Optional[int], Opt("--select", help="Propose a group of this many adapters with the "
                                         "lowest worst MDS.")] = None,
    candidates: Annotated[Optional[list[str]], Opt("--candidates", help="Adapters that may join the group "
                                                   "(repeatable).", metavar="ADAPTER", show_default=False)] = None,
    plot: Annotated[Optional[str], Opt("--plot", help="Write PNG figures into this directory.", metavar="DIR")] = None,
    seed: Seed("Seed of the validation and calibration draws.") = 0,
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
    if not adapters:
        raise UsageError("adapters", "no adapters given", "pass adapter files, directories, or -")
    if bool(base) != bool(data) and (base or data):
        raise UsageError("--base" if data else "--data", "hidden states need both --base and --data", "pass both")
    needs_model = [o for o, v in (("--merged", merged), ("--budget", budget is not None), ("--gradients", gradients),
                                  ("--explain", explain), ("--select", select is not None)) if v]
    if needs_model and not base:
        raise UsageError(needs_model[0], "needs the model's hidden states", "pass --base MODEL --data DATA.jsonl")
    if pool not in ("last", "mean"):
        raise UsageError("--pool", f"unknown pooling {pool!r}", "use last or mean")
    if level not in ("task", "example"):
        raise UsageError("--level", f"unknown level {level!r}", "use task or example")
    if k < 1 or grad_samples < 1 or (batch_tokens is not None and batch_tokens < 16):
        raise UsageError("options", "--k, --grad-samples ≥ 1 and --batch-tokens ≥ 16", "fix the values")
    if budget is not None and not (math.isfinite(budget) and budget >= 0):
        raise UsageError("--budget", f"{budget} is not a finite budget ≥ 0", "pass --budget 50, say")
    if not (math.isfinite(l1) and l1 >= 0):
        raise UsageError("--l1", f"{l1} is not a finite λ ≥ 0", "pass --l1 1")
    if fit and not (scores or losses):
        raise UsageError("--fit", "needs measured mergeability to fit to", "pass --scores or --losses")
    if select is not None and (select < 2 or not candidates):
        raise UsageError("--select", "needs a group size ≥ 2 and --candidates", "pass --select K --candidates POOL")
    stdin_uses = sum(x == "-" for x in [*adapters, merged, scores, losses, data] if x)
    if stdin_uses > 1:
        raise UsageError("-", "stdin is named twice", "read one input from stdin")
    torch_dtype = model_dtype(dtype)
    from ..outputs import check_output

    check_output(output)
    if fit:
        check_output(fit)

    from ..diagnose import core
    from ..diagnose.analysis import check_joins, read_losses
    from ..diagnose.predict import Model
    from ..inputs import check_compatible, load_inputs
    from ..outputs import atomic_output
    from ..jsonl import read_jsonl
    from ..weights import score_records
    from ..model import fingerprint, resolve_base

    model_doc = None
    if predict:
        try:
            model_doc = Model.from_json(json.loads(Path(predict).read_text()), predict)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise MergetoolError(predict, f"cannot read the model ({e.__class__.__name__})", "pass --fit's file") from None
    score_recs = score_records(scores) if scores else None
    loss_recs = read_losses(losses) if losses else None
    b = resolve_base(base, gguf_file) if base else None
    fp = fingerprint(b) if b else None
    updates = load_inputs(list(adapters), b, allow_pickle)
    cands = load_inputs(list(candidates), b, allow_pickle) if candidates else []
    merged_u = None
    if merged:
        got = load_inputs([merged], b, allow_pickle)
        if len(got) != 1:
            raise MergetoolError(merged, f"holds {len(got)} adapters", "pass one merged adapter")
        merged_u = got[0]
    check_compatible(updates + cands + ([merged_u] if merged_u else []), fp)
    names = [u.name for u in updates]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise MergetoolError(dup, "two adapters share this name", "rename one (metadata 'name')")
    if len(updates) < 2:
        raise UsageError("adapters", "diagnose compares adapters: give at least two", "pass more adapters")
    if select is not None and select > len(updates) + len(cands):
        raise UsageError("--select", f"a group of {select} from {len(updates) + len(cands)} adapters", "lower --select")
    check_joins(score_recs, loss_recs, names, names + [c.name for c in cands], b is not None)

    dev = pick_device(device)
    setup = core.Setup(level=level, k=k, pool=pool, seed=seed, batch_tokens=batch_tokens, gradients=gradients,
                       grad_samples=grad_samples, explain=explain, merged=merged_u, budget=budget, device=dev)
    if b is not None:
        from ..examples import add_contexts, check_examples
        from ..model import load_model

        exs = check_examples(read_jsonl(data), "<stdin>" if data == "-" else data)
        setup.examples = [e for e in exs if e.rec.get("split") != "train"]
        setup.train_pool = [e for e in exs if e.rec.get("split") == "train"]
        if not setup.examples:
            raise MergetoolError(data, "has no held-out examples (all are split=train)", "give held-out examples")
        setup.model, setup.tok = load_model(b, dev, torch_dtype)
        if chat:
            add_contexts(setup.examples, setup.train_pool, 0, seed, setup.tok, chat)
        else:
            for e in setup.examples:
                e.context = e.rec.get("prompt", "")
    fit_spec = None
    if fit:
        fit_spec = {"target": "score" if scores else "pair", "method": fit_method, "lam": l1, "seed": seed,
                    "features": [f.strip() for f in features.split(",") if f.strip()] if features else None}
    bar = progress_bar(len(updates) + len(cands) + (1 if merged_u else 0), quiet, "diagnose", "inputs")
    try:
        records = core.diagnose(updates, setup, cands, score_recs, loss_recs, fit_spec, model_doc, select, bar)
    finally:
        bar(None)
    clean = [_json_safe(r) for r in records]
    if fit:
        with atomic_output(fit) as fh:
            fh.write(json.dumps(next(r for r in clean if r["kind"] == "model"), indent=2).encode())
    if output:
        with atomic_output(output) as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in clean).encode())
    else:
        from ..streams import write_stdout

        write_stdout("".join(json.dumps(r) + "\n" for r in clean))
    if not quiet:
        _tables(clean)
    if plot:
        _plots(clean, Path(plot), loss_recs)


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _fmt(x) -> str:
    return "–" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def _tables(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(stderr=True)
    pairs = [r for r in records if r["kind"] == "pair"]
    cols = [c for c in ("magnitude_change_ratio", "sign_change_ratio", "conflict_magnitude_ratio", "cosine",
                        "hidden_sim", "grad_cosine") if any(p.get(c) is not None for p in pairs)]
    t = Table(title=f"pairs ({len(pairs)})")
    for c in ["a", "b", *cols]:
        t.add_column(c.replace("_ratio", "").replace("_", " "), justify="left" if c in "ab" else "right")
    for p in pairs[:40]:
        t.add_row(p["a"], p["b"], *[_fmt(p.get(c)) for c in cols])
    con.print(t)
    if len(pairs) > 40:
        con.print(f"(… {len(pairs) - 40} more pairs in the records)")
    ads = [r for r in records if r["kind"] == "adapter"]
    cols = [c for c in ("norm_f", "sigma_max", "effective_rank", "mds", "mean_hidden_sim", "distortion", "gap",
                        "p_correct", "finetuned") if any(a.get(c) is not None for a in ads)]
    t = Table(title="adapters")
    for c in ["adapter", *cols]:
        t.add_column(c, justify="left" if c == "adapter" else "right")
    for a in ads:
        t.add_row(a["adapter"], *[_fmt(a.get(c)) for c in cols])
    con.print(t)
    for g in (r for r in records if r["kind"] == "group"):
        con.print(f"group of {g['n_models']} on {g['n_inputs']} inputs (d = {g['hidden_dim']}): Δ² = "
                  f"{_fmt(g['diameter2'])} {tuple(g['diameter_pair'] or ())}; every merge's distortion ≥ Δ²/4 = "
                  f"{_fmt(g['lower_bound'])}, ≥ r² = {_fmt(g['meb_radius2'])} (smallest ball); the paper's bound "
                  f"d/(2(d+1))·Δ² = {_fmt(g['upper_bound_paper'])}, Jung's (N−1)/(2N)·Δ² = {_fmt(g['upper_bound_jung'])}")
        if "distortion_max" in g:
            con.print(f"merge {g['merged']}: distortion {_fmt(g['distortion_max'])} (worst for {g['distortion_argmax']})")
        if "verdict" in g:
            con.print(f"budget {_fmt(g['budget'])}: paper's test {'passes' if g['mergeable_paper'] else 'fails'}; "
                      f"verdict {g['verdict']}" + (f"; measured merge {'meets' if g['met'] else 'misses'} it"
                                                   if "met" in g else ""))
    stats = [r for r in records if r["kind"] == "stat" and r["test"] in ("correlation", "anova1", "anova2")]
    if stats:
        t = Table(title="statistics")
        for c in ("test", "x", "y", "where", "r / F", "p", "ρ", "p(ρ)", "n"):
            t.add_column(c)
        for s in stats:
            if s["test"] == "correlation":
                t.add_row("corr", s["x"], s["y"], str(s.get("method") or s.get("group") or ""), _fmt(s["pearson"]),
                          _fmt(s["pearson_p"]), _fmt(s["spearman"]), _fmt(s["spearman_p"]), str(s["n"]))
            elif s["test"] == "anova1":
                t.add_row("anova", s["factor"], "loss", "", _fmt(s["F"]), _fmt(s["p_value"]), "", "", str(s["n"]))
            else:
                for f in s.get("factors", []):
                    if isinstance(s.get(f), dict):
                        t.add_row("anova2", f, "loss", "given the other", _fmt(s[f]["F"]), _fmt(s[f]["p_value"]), "",
                                  "", str(s.get("n")))
        con.print(t)
    for m in (r for r in records if r["kind"] == "model"):
        v = m.get("validation") or {}
        nz = {f: round(w, 4) for f, w in zip(m["features"], m["weights"]) if w}
        con.print(f"predictor of {m['target']}: weights {nz}; leave-one-task-out Pearson {_fmt(v.get('pearson'))} "
                  f"(p {_fmt(v.get('pearson_p'))}), Spearman {_fmt(v.get('spearman'))}, n {v.get('n')}"
                  + (f"; {v['skipped']}" if "skipped" in v else ""))
    for s in (r for r in records if r["kind"] == "selection"):
        con.print(f"selected {s['group']}: worst MDS {_fmt(s['worst_mds_before'])} -> {_fmt(s['worst_mds_after'])} "
                  f"({'; '.join(str(x) for x in s['steps']) or 'no change lowers it'})")


def _plots(records: list[dict], d: Path, losses: list[dict] | None) -> None:
    """HiddenSim heatmap (the collapse paper's Figure 1), each pair metric against the pair's merging loss
    (Figure 2), each metric's mean per bin of S (Figure 3)."""
    from ..plots import bars, heatmap, scatters

    d.mkdir(parents=True, exist_ok=True)
    ads = [r["adapter"] for r in records if r["kind"] == "adapter"]
    pairs = [r for r in records if r["kind"] == "pair"]
    if any(p.get("hidden_sim") is not None for p in pairs):
        at = {a: i for i, a in enumerate(ads)}
        m = [[1.0 if i == j else 0.0 for j in range(len(ads))] for i in range(len(ads))]
        for p in pairs:
            m[at[p["a"]]][at[p["b"]]] = m[at[p["b"]]][at[p["a"]]] = p["hidden_sim"]
        heatmap(ads, m, "HiddenSim", d / "hidden_sim.png")
    if losses:
        loss: dict[tuple, list[float]] = {}
        for r in losses:
            if len(r["adapters"]) == 2 and r["loss"] is not None:
                loss.setdefault((r["method"], tuple(sorted(r["adapters"]))), []).append(r["loss"])
        by = {tuple(sorted((p["a"], p["b"]))): p for p in pairs}
        pts = [(by[k], sum(v) / len(v)) for (_, k), v in loss.items() if k in by and len(v) == 2]
        metrics = [m for m in ("magnitude_change_ratio", "sign_change_ratio", "conflict_magnitude_ratio", "cosine",
                               "hidden_sim", "grad_cosine") if any(p.get(m) is not None for p, _ in pts)]
        corr = {r["x"]: r for r in records if r["kind"] == "stat" and r.get("y") == "pair_loss"}
        if pts and metrics:
            scatters([(m, [p.get(m) for p, _ in pts], [y for _, y in pts],
                       f"{m} (Pearson p {_fmt(corr.get(m, {}).get('pearson_p'))})") for m in metrics],
                     "pair merging loss", d / "metrics_vs_loss.png")
    binned = next((r for r in records if r["kind"] == "stat" and r["test"] == "binned"), None)
    corr = [r for r in records if r["kind"] == "stat" and r["test"] == "correlation" and r["y"] == "score"]
    if binned:
        for c in corr[:12]:
            if binned["bins"] and f"{c['x']}_mean" in binned["bins"][0]:
                bars(binned["bins"], c["x"], f"{c['x']} by S (Spearman {_fmt(c['spearman'])})", d / f"bins_{c['x']}.png")
    log.info("wrote figures into %s", d)
