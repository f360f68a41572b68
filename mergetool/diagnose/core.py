"""diagnose as a library call: ``measure`` goes from updates (and a base model with data) to records of kind
``pair``, ``adapter``, ``group`` and ``merge``; ``analyze`` goes from such records (measured now, or read back
from a file) and measured mergeability to records of kind ``stat``, ``model`` and ``prediction``; ``diagnose``
does both, and task selection (``selection``).

Which parts run depends on what is given: the weight-space metrics always; the representation metrics with
a model and data (``Setup.model``): the group of all the adapters, each merged group of the loss records and
of the merges given (``Setup.merged``), and each merge's distortion; gradients with ``gradients``; what
explains S with ``explain``; the statistics with scores or losses; the predictor with ``fit`` or ``predict``;
task selection with ``select``. HiddenSim and MDS are relative to the adapters they are computed over: those
of ``pair`` and ``adapter`` records to all the adapters given, a ``group`` record's to its members.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import MergetoolError
from ..updates import Update, adapter_stats
from . import analysis, forecast, predict, representation as rep, spectral, weightspace as ws

log = logging.getLogger("mergetool")

CONFLICTS = ("magnitude_change_ratio", "sign_change_ratio", "sign_change_ratio_strict", "conflict_magnitude_ratio",
             "conflict_magnitude_ratio_strict", "cosine", "cosine_global", "l2_distance")
PAIR_METRICS = CONFLICTS + spectral.NAMES
HIDDEN_PAIR = ("hidden_distance", "hidden_distance2", "hidden_sim")
GRAD_PAIR = ("grad_l2", "grad_cosine", "grad_dot")
EXPLAIN = ("gap", "rank", "p_correct", "p_max", "delta_trained", "perplexity", "length", "base_accuracy", "finetuned")


@dataclass
class Setup:
    """What diagnose may use beyond the updates: a model with data (representations, gradients, what explains
    S), and the options of each part. ``merged``: merges of some of the updates, in chunks (each chunk is loaded,
    measured and dropped before the next, so many merges fit in memory a chunk at a time)."""

    model: object = None
    tok: object = None
    examples: list = field(default_factory=list)
    train_pool: list = field(default_factory=list)
    level: str = "task"
    k: int = 5
    pool: str = "last"
    seed: int = 0
    batch_tokens: int | None = None
    gradients: bool = False
    grad_samples: int = 10
    explain: bool = False
    merged: Iterable[list[Update]] = ()
    budget: float | None = None
    resamples: int = 1000
    permutations: int = 999
    device: torch.device = torch.device("cpu")


@dataclass
class Records:
    """The measured records of one diagnosis: what ``analyze`` reads."""

    pairs: list[dict] = field(default_factory=list)
    adapters: list[dict] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    merges: list[dict] = field(default_factory=list)

    def all(self) -> list[dict]:
        return self.pairs + self.adapters + self.groups + self.merges


def load_model_data(s: Setup, base, data: str, chat: bool, dtype) -> None:
    """Fill ``s`` with the base model and the examples of DATA: the held-out ones (hidden states, gradients,
    what explains S) and the split=train ones (training texts), each with its context (the prompt, or the chat
    template around it)."""
    from ..examples import add_contexts, check_examples
    from ..jsonl import read_jsonl
    from ..model import load_model

    exs = check_examples(read_jsonl(data), "<stdin>" if data == "-" else data)
    s.examples = [e for e in exs if e.rec.get("split") != "train"]
    s.train_pool = [e for e in exs if e.rec.get("split") == "train"]
    if not s.examples:
        raise MergetoolError(data, "has no held-out examples (all are split=train)", "give held-out examples")
    s.model, s.tok = load_model(base, s.device, dtype)
    if chat:
        add_contexts(s.examples, s.train_pool, 0, s.seed, s.tok, chat)
    else:
        for e in s.examples:
            e.context = e.rec.get("prompt", "")


MERGED_BYTES = 1 << 30  # bytes of merged files loaded at once


def merged_files(paths: list[str]) -> list[str]:
    """The files (or PEFT directories, or ``-``) of ``--merged``: a pool stands for its members."""
    from ..inputs import is_pool, pool_members

    return [m for p in paths for m in (pool_members(p) if p != "-" and is_pool(p) else [p])]


def merged_chunks(files: list[str], base=None, fingerprint: str | None = None, allow_pickle: bool = False,
                  budget: int = MERGED_BYTES) -> Iterator[list[Update]]:
    """The merges in ``files`` (``merged_files``), loaded a chunk at a time: files are taken in order until
    they pass ``budget`` bytes, so hundreds of dense merges are measured without holding them all. Each chunk is
    checked against the base's fingerprint."""
    import os

    from ..inputs import check_compatible, load_inputs

    def load(chunk):
        got = load_inputs(chunk, base, allow_pickle)
        check_compatible(got, fingerprint)
        return got

    chunk, size = [], 0
    for f in files:
        n = os.path.getsize(f) if f != "-" and os.path.isfile(f) else budget
        if chunk and size + n > budget:
            yield load(chunk)
            chunk, size = [], 0
        chunk.append(f)
        size += n
    if chunk:
        yield load(chunk)


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def task_of(u: Update) -> str:
    return u.meta.get("task") or u.name


def diagnose(updates: list[Update], s: Setup, candidates: Sequence[Update] = (), scores: dict | None = None,
             losses: list[dict] | None = None, fit: dict | None = None, model: predict.Model | None = None,
             select: int | None = None, progress=None) -> list[dict]:
    """Every record diagnose writes (see the module docstring): ``measure``, then ``analyze``, then ``select``."""
    names = [u.name for u in updates]
    analysis.check_joins(scores, losses, names, names + [c.name for c in candidates if c.name not in set(names)],
                         s.model is not None)
    rec, geo, everyone = measure(updates, s, candidates, losses, progress)
    out = rec.all() + analyze(rec, scores, losses, fit, model, seed=s.seed, resamples=s.resamples,
                              permutations=s.permutations)
    if select is not None:
        if geo is None:
            raise MergetoolError("--select", "needs hidden states", "pass --base and --data")
        n = len(updates)
        res = rep.select(geo, list(range(n)), list(range(n, len(everyone))), [task_of(u) for u in everyone],
                         select, [u.name for u in everyone])
        out.append({"kind": "selection", **res})
    return out


def measure(updates: list[Update], s: Setup, candidates: Sequence[Update] = (), losses: list[dict] | None = None,
            progress=None) -> tuple[Records, rep.Geometry | None, list[Update]]:
    """The metric records of ``updates``: every pair (weight space; with a model, hidden states and gradients),
    every adapter, and with a model the groups and merges (see the module docstring). Also the hidden-state
    geometry (None without a model) and the updates it covers (the candidates after the updates)."""
    names = [u.name for u in updates]
    n = len(updates)
    wsm = ws.pair_metrics(updates, s.device)
    wsm.update(spectral.pair_spectra(updates, wsm, s.device))
    adapters = [{"kind": "adapter", "adapter": u.name, "task": task_of(u), **adapter_stats(u)} for u in updates]
    pairs = [{"kind": "pair", "a": names[i], "b": names[j], **{m: _f(wsm[m][i, j]) for m in PAIR_METRICS}}
             for i in range(n) for j in range(i + 1, n)]
    for i, a in enumerate(adapters):
        for m in ("cosine", "sign_change_ratio", "magnitude_change_ratio", "conflict_magnitude_ratio"):
            vals = [float(wsm[m][i, j]) for j in range(n) if j != i and not math.isnan(float(wsm[m][i, j]))]
            a[f"mean_{m}"] = sum(vals) / len(vals) if vals else None
    rec = Records(pairs, adapters)
    geo, everyone = None, list(updates) + [c for c in candidates if c.name not in set(names)]
    if s.model is not None:
        geo = _representations(everyone, n, s, rec, losses, progress)
        if s.gradients:
            _gradients(updates, s, pairs)
        if s.explain:
            _explain(updates, s, adapters)
    return rec, geo, everyone


def analyze(rec: Records, scores: dict | None = None, losses: list[dict] | None = None, fit: dict | None = None,
            model: predict.Model | None = None, seed: int = 0, resamples: int = 1000,
            permutations: int = 999) -> list[dict]:
    """The statistics, the fitted predictor and the predictions over measured records (``measure``'s, or read
    back by ``records.read_records``)."""
    out: list[dict] = []
    if scores is not None:
        metrics = [m for m in analysis.numeric_fields(rec.adapters) if m not in ("score",)]
        out += analysis.score_stats(rec.adapters, scores, metrics)
    if losses is not None:
        out += analysis.loss_table(losses) + analysis.anovas(losses, seed, permutations)
        bypair = {tuple(sorted((p["a"], p["b"]))): p for p in rec.pairs}
        out += analysis.pair_stats(losses, bypair, pair_features(rec.pairs), seed, permutations)
        out += analysis.mds_stats(losses, rec.groups)
        if rec.merges:
            out += analysis.theorem_stats(losses, rec.merges, rec.groups, rec.pairs, pair_features(rec.pairs),
                                          PAIR_METRICS, seed, resamples)
    if fit is not None:
        out += forecast.fit_with_baselines(fit, rec, scores, losses)
    if model is not None:
        out += forecast.predictions(model, rec)
    return out


def pair_features(pairs: list[dict]) -> list[str]:
    """The pair metrics present in some pair record, in their order."""
    return [m for m in PAIR_METRICS + HIDDEN_PAIR + GRAD_PAIR if any(p.get(m) is not None for p in pairs)]


def _representations(everyone: list[Update], n: int, s: Setup, rec: Records, losses, progress) -> rep.Geometry:
    """Hidden states of every adapter and candidate on k examples of each task, batched; the pair and adapter
    fields they give, the group of all the adapters, each merged group (of the loss records and of the merges)
    and each merge's distortion, a chunk of merges at a time."""
    from ..adapters import RowAdapters
    from ..scoring import final_hidden

    tasks = [task_of(u) for u in everyone]
    blocks = rep.validation_set(s.examples, tasks, s.k, s.seed)
    missing = [t for t, idx in blocks.items() if not idx]
    if missing:
        raise MergetoolError("--data", f"has no held-out examples of task {missing[0]!r}",
                             "give DATA with examples of every adapter's task (or name adapters after tasks)")
    order, at = [], {}
    for t, idx in blocks.items():  # the inputs, task by task; at[t]: where task t's lie
        at[t] = list(range(len(order), len(order) + len(idx)))
        order += idx
    seqs = [s.tok(s.examples[i].context or s.examples[i].rec.get("prompt") or s.examples[i].rec.get("text", ""),
                  add_special_tokens=False).input_ids for i in order]
    with RowAdapters(s.model, everyone) as ad:
        states = final_hidden(s.model, seqs, [(i, range(len(seqs))) for i in range(len(everyone))], ad,
                              s.batch_tokens)
    if progress:
        progress(len(everyone))
    H = torch.stack([rep.pooled(st, s.pool) for st in states])  # [models, X, d]
    geo = rep.Geometry(H, at)
    names = [u.name for u in everyone]
    dist, d2 = geo.distances(range(n), tasks[:n])
    sim, degenerate = rep.hidden_sim(dist)
    m = rep.mds(sim)
    t1 = rep.theorem1(d2, H.shape[-1], names[:n])
    k = 0
    for i in range(n):
        rec.adapters[i]["mds"] = m[i]
        rec.adapters[i]["mean_hidden_sim"] = (float(sim[i].sum()) - 1) / max(n - 1, 1)
        rec.adapters[i]["jung_weight"] = t1["jung_weights"][names[i]]
        for j in range(i + 1, n):
            rec.pairs[k].update(hidden_distance=float(dist[i, j]), hidden_distance2=float(d2[i, j]),
                                hidden_sim=float(sim[i, j]))
            k += 1
    index = {x: i for i, x in enumerate(names)}
    groups: dict[frozenset, dict] = {}

    def group(members: list[int], name: str | None) -> dict:
        key = frozenset(members)
        if key not in groups:
            groups[key] = rep.group_record(geo, members, names, tasks, name or ",".join(sorted(names[i] for i in members)))
            groups[key].update(k=s.k, pool=s.pool)
        return groups[key]

    everybody = group(list(range(n)), None)
    if s.budget is not None:
        everybody.update(rep.verdict(s.budget, everybody))
    for r in losses or []:
        if all(a in index for a in r["adapters"]) and len(set(r["adapters"])) >= 2:
            group([index[a] for a in r["adapters"]], r["group"])
    for chunk in s.merged:
        owners = []
        for u in chunk:
            parents = u.meta.get("parents") or names[:n]
            unknown = [p for p in parents if p not in index]
            if unknown:
                raise MergetoolError(u.name, f"was merged from {', '.join(unknown)}, not among the adapters diagnosed",
                                     "diagnose the adapters it was merged from (or pass --candidates)")
            owners.append([index[p] for p in dict.fromkeys(parents)])
        jobs = [(j, [x for t in dict.fromkeys(tasks[i] for i in members) for x in at[t]]) for j, members in enumerate(owners)]
        with RowAdapters(s.model, chunk) as ad:
            got = final_hidden(s.model, seqs, jobs, ad, s.batch_tokens)
        for u, members, (_, rows), st in zip(chunk, owners, jobs, got):
            g = group(members, None)
            delta = rep.distortion(rep.pooled(st, s.pool), H[members][:, rows])
            rec.merges.append(rep.merge_record(u, g, dict(zip((names[i] for i in members), delta)), s.budget))
        if progress:
            progress(len(chunk))
    rec.groups.extend(groups.values())
    return geo


def _gradients(updates, s: Setup, pairs):
    import random

    from ..score import match
    from .gradients import mean_gradients, pair_gradient_metrics

    data = []
    for u, idx in zip(updates, match(updates, s.examples, s.level)):
        rng = random.Random(f"{s.seed}:{u.name}")
        data.append([s.examples[i] for i in (rng.sample(idx, s.grad_samples) if len(idx) > s.grad_samples else idx)])
    G, _ = mean_gradients(s.model, s.tok, updates, data)
    g = pair_gradient_metrics(G)
    n = len(updates)
    k = 0
    for i in range(n):
        for j in range(i + 1, n):
            pairs[k].update({m: _f(g[m][i, j]) for m in GRAD_PAIR})
            k += 1


def _explain(updates, s: Setup, adapters):
    from ..methods import Params, get
    from ..score import Scorer, match, training_text

    data = match(updates, s.examples, s.level)
    sc = Scorer(s.model, s.tok, updates, s.examples, data, get("mean"), Params(), s.device,
                batch_tokens=s.batch_tokens)
    texts = [training_text(u, s.examples, d, s.level, s.train_pool) for u, d in zip(updates, data)]
    got = sc.explain(list(range(len(updates))), texts)
    for i, a in enumerate(adapters):
        a.update({k: got[i].get(k) for k in EXPLAIN})
