"""The library entry of the data-aware merges: run the model on the dev examples for the statistics a method
needs (``statistics``), then merge from them like any other method (``merge_with_data``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..errors import MergetoolError, UsageError
from ..examples import Example, check_examples
from ..jsonl import read_jsonl
from ..methods import Method, Params, get, merge
from ..updates import Update
from .data import DevData, dev_data


@dataclass
class DataOptions:
    """How the statistics are gathered and the search runs (no part of any merge formula)."""

    norm: str = "tokens"  # multiple choice: the score a prediction maximises (as eval's --norm)
    batch_tokens: int | None = None
    steps: int = 500  # adamerging: Adam steps (the paper's 500)
    lr: float = 1e-3  # adamerging: Adam's learning rate (the paper's)
    granularity: str = "layer"  # adamerging: one coefficient per task and module (layer) or per task (task)
    init: float = 0.3  # adamerging: every coefficient's start (the paper's prior)
    budget: str | None = None  # lorahub: candidates (default 40, LoraHub's example); auto: candidates or seconds
    population: int | None = None  # lorahub (default 8), auto (16): candidates judged in one pass
    l1: float = 0.05  # lorahub: LoraHub's L1 penalty on the weights
    seed: int = 0
    objective: str = "mean"  # auto
    drop: bool = False  # auto
    holdout: float = 0.5  # auto
    trace: str | None = None  # auto
    predict: str | None = None  # auto: a diagnose pair model
    scores: str | None = None  # auto: score records
    progress: Callable[[int], None] | None = None


# Which data options each method reads (an option given to another method would be ignored, so it is refused).
OWNERS = {"steps": ("adamerging",), "lr": ("adamerging",), "granularity": ("adamerging",),
          "budget": ("lorahub", "auto"), "population": ("lorahub", "auto"), "l1": ("lorahub",),
          "objective": ("auto",), "drop": ("auto",), "holdout": ("auto",), "trace": ("auto",), "predict": ("auto",),
          "scores": ("auto",), "alpha": ("regmean", "regmean++"), "norm": ("fisher", "adamerging", "auto")}
DATA_METHODS = ("regmean", "regmean++", "fisher", "adamerging", "lorahub", "auto")


def check_data_options(method: str, with_data: bool, data: str | None, base: str | None, opts: DataOptions,
                       given: dict[str, bool]) -> None:
    """Every data option checked before any input is read: what the method needs, ranges, and options that
    another method would ignore (``given``: merge options set on the command line, by name)."""
    import math

    from .auto import OBJECTIVES, parse_budget

    if with_data:
        if not data:
            raise UsageError("--data", f"{method} merges from dev examples", "pass --data DEV.jsonl")
        if not base:
            raise UsageError("--base", f"{method} runs the base model on the dev examples", "pass --base MODEL")
    elif data:
        raise UsageError("--data", f"{method} does not read data", f"drop --data, or choose {', '.join(DATA_METHODS)}")
    default = DataOptions()
    set_ = {k: getattr(opts, k) != getattr(default, k) for k in OWNERS if hasattr(opts, k)}
    set_.update(given)
    for opt, owners in OWNERS.items():
        if set_.get(opt) and method not in owners:
            raise UsageError(f"--{opt}", f"{method} does not take --{opt}, so it would be ignored",
                             f"drop it (it is for {', '.join(owners)})")
    if method == "auto":
        for opt in ("weights", "base-acc", "density"):
            if given.get(opt):
                raise UsageError(f"--{opt}", "auto chooses the method, its options and the weights itself",
                                 "drop it, or merge with a method of your choice")
    if opts.norm not in ("tokens", "chars", "none"):
        raise UsageError("--norm", f"unknown norm {opts.norm!r}", "use tokens, chars or none")
    if opts.steps < 0 or not (math.isfinite(opts.lr) and opts.lr > 0):
        raise UsageError("--steps/--lr", "need --steps ≥ 0 and a finite --lr > 0", "pass --steps 500 --lr 1e-3")
    if opts.granularity not in ("layer", "task"):
        raise UsageError("--granularity", f"unknown granularity {opts.granularity!r}", "use layer or task")
    if opts.population is not None and opts.population < 1:
        raise UsageError("--population", f"{opts.population} is not a positive count", "pass --population 16")
    if not (math.isfinite(opts.l1) and opts.l1 >= 0):
        raise UsageError("--l1", f"{opts.l1} is not a finite number ≥ 0", "pass --l1 0.05")
    if opts.objective not in OBJECTIVES:
        raise UsageError("--objective", f"unknown objective {opts.objective!r}", "use mean or worst")
    if not (math.isfinite(opts.holdout) and 0 <= opts.holdout < 1):
        raise UsageError("--holdout", f"{opts.holdout} is outside [0, 1)", "pass a fraction such as 0.5")
    if opts.budget is not None:
        b = parse_budget(opts.budget)
        if method == "lorahub" and b.candidates is None:
            raise UsageError("--budget", "lorahub's budget counts candidates", "pass a number such as 40")


def read_dev(src: str) -> list[Example]:
    """The dev examples (``split: train`` records left out), each prompted as eval prompts it (0-shot)."""
    exs = [e for e in check_examples(read_jsonl(src), "<stdin>" if src == "-" else src)
           if e.rec.get("split") != "train"]
    if not exs:
        raise MergetoolError(src, "holds no dev examples (every record is split=train)", "pass dev examples")
    for e in exs:
        e.context = e.rec.get("prompt", "")
    return exs


def _regmean(model, tok, updates, dev, p, opts):
    from .grams import regmean_grams

    return regmean_grams(model, tok, updates, dev, opts.batch_tokens)


def _regmean_pp(model, tok, updates, dev, p, opts):
    from .grams import regmean_pp_grams

    return regmean_pp_grams(model, tok, updates, dev, p.alpha, opts.batch_tokens)


def _fisher(model, tok, updates, dev, p, opts):
    from .fisher import fisher_diagonals

    return fisher_diagonals(model, tok, updates, dev, opts.norm, opts.batch_tokens)


def _adamerging(model, tok, updates, dev, p, opts):
    from .adamerging import adamerging_coefficients

    return adamerging_coefficients(model, tok, updates, dev, opts.steps, opts.lr, opts.granularity, opts.init,
                                   opts.norm, opts.batch_tokens, opts.progress)


def _lorahub(model, tok, updates, dev, p, opts):
    from .lorahub import lorahub_weights

    return lorahub_weights(model, tok, updates, dev, int(opts.budget or 40), opts.population or 8, opts.l1, opts.seed,
                           opts.norm, opts.batch_tokens, opts.progress)


# method -> what gathers its statistics: (model, tok, updates, dev, params, options) -> Params.stats; and the
# kinds of example each can read
COLLECTORS: dict[str, Callable] = {"regmean": _regmean, "regmean++": _regmean_pp, "fisher": _fisher,
                                   "adamerging": _adamerging, "lorahub": _lorahub}
KINDS = {"regmean": ("mc", "gen", "ppl"), "regmean++": ("mc", "gen", "ppl"), "fisher": ("mc", "gen", "ppl"),
         "adamerging": ("mc",), "lorahub": ("mc", "gen", "ppl"), "auto": ("mc", "gen")}


def statistics(method: Method | str, model, tok, updates: list[Update], dev: DevData, p: Params,
               opts: DataOptions) -> dict:
    """What ``method`` learns from the dev examples (Grams, Fisher diagonals, coefficients)."""
    m = get(method) if isinstance(method, str) else method
    if m.name not in COLLECTORS:
        raise UsageError("--method", f"{m.name} does not read data", "drop --data, or choose a data-aware method")
    return COLLECTORS[m.name](model, tok, updates, dev, p, opts)


def merge_with_data(updates: list[Update], method: Method | str, p: Params, dev: DevData, model, tok,
                    opts: DataOptions, device: torch.device, **merge_kw) -> Update:
    """``statistics`` then ``methods.merge`` from them; the metadata also says what data the merge read (tasks,
    examples per task) and what the gathering found (AdaMerging's entropy, LoraHub's best value)."""
    m = get(method) if isinstance(method, str) else method
    stats = statistics(m, model, tok, updates, dev, p, opts)
    merged = merge(updates, m, replace(p, stats=stats), device, **merge_kw)
    if "coefficients" in stats:  # learned per task and module: written whole
        merged.meta["params"]["coefficients"] = stats["coefficients"]
    merged.meta["data"] = {"tasks": {t: len(idx) for t, idx in zip(dev.tasks, dev.of)}, "norm": opts.norm,
                           **stats.get("info", {})}
    return merged


def merge_on_data(method: str, updates: list[Update], examples: list[Example], p: Params, base, opts: DataOptions,
                  device: torch.device, progress=None, **merge_kw) -> Update:
    """The whole data-aware merge as ``merge`` runs it: match the examples to the adapters (checked before the
    model loads), read the search's inputs (a pair model, score records), load the model, merge (``auto``: search
    first)."""
    from ..model import load_model

    dev = dev_data(updates, examples, method, KINDS[method], matched=method != "lorahub")
    opts = replace(opts, progress=progress)
    if method != "auto":
        model, tok = load_model(base, device)
        return merge_with_data(updates, method, p, dev, model, tok, opts, device, **merge_kw)
    from .auto import auto_merge, parse_budget
    from .data import holdout_split

    holdout_split(dev, opts.holdout, opts.seed)  # refused here, before the model loads, if it leaves too few
    forecast = _pair_model(opts.predict) if opts.predict else None
    score_weights = None
    if opts.scores:
        from ..weights import score_values

        s = score_values(opts.scores)
        missing = [u.name for u in updates if u.name not in s]
        if missing:
            raise MergetoolError(opts.scores, f"no score for adapter {missing[0]!r}", "score every adapter first")
        score_weights = [s[u.name] for u in updates]
    model, tok = load_model(base, device)
    return auto_merge(model, tok, updates, dev, holdout=opts.holdout, objective=opts.objective,
                      budget=parse_budget(opts.budget or "64"), drop=opts.drop, population=opts.population or 16,
                      seed=opts.seed, trace=opts.trace, forecast=forecast, score_weights=score_weights, norm=opts.norm,
                      batch_tokens=opts.batch_tokens, device=device, progress=progress, **merge_kw)


def _pair_model(src: str):
    """A diagnose --fit model of a merged pair's normalised accuracy."""
    import json
    from pathlib import Path

    from ..diagnose.predict import Model

    try:
        doc = json.loads(Path(src).read_text())
    except (OSError, ValueError) as e:
        raise MergetoolError(src, f"cannot read the model ({e.__class__.__name__})",
                             "pass diagnose --fit's file") from None
    m = Model.from_json(doc, src)
    if m.target != "normalized_accuracy":
        raise MergetoolError(src, f"predicts {m.target}, not a merged pair's normalised accuracy",
                             "fit a pair model: diagnose --fit with --losses of merged pairs")
    return m
