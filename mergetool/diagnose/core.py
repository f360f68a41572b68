"""diagnose as a library call: from updates (and a base model with data) to records of kind ``pair``,
``adapter``, ``group``, ``stat``, ``model``, ``prediction`` and ``selection``.

Which parts run depends on what is given: the weight-space metrics always; the representation metrics with
a model and data (``Setup.model``); gradients with ``gradients``; what explains S with ``explain``; the
statistics with scores or losses; the predictor with ``fit`` or ``predict``; task selection with
``select``. Everything a record holds is computed over the adapters given, so HiddenSim and MDS (relative to
their group) are those of that group.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import MergetoolError
from ..updates import Update, adapter_stats
from . import analysis, predict, representation as rep, spectral, weightspace as ws

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
    S), and the options of each part."""

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
    merged: Update | None = None
    budget: float | None = None
    device: torch.device = torch.device("cpu")


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def task_of(u: Update) -> str:
    return u.meta.get("task") or u.name


def diagnose(updates: list[Update], s: Setup, candidates: Sequence[Update] = (), scores: dict | None = None,
             losses: list[dict] | None = None, fit: dict | None = None, model: predict.Model | None = None,
             select: int | None = None, progress=None) -> list[dict]:
    """Every record diagnose writes (see the module docstring). ``fit``: {"target": "score" (S per adapter) or
    "pair" (a merged pair's normalized accuracy 1 + L/100), "method": ..., "features": [...] or None, "lam": ...}."""
    names = [u.name for u in updates]
    n = len(updates)
    analysis.check_joins(scores, losses, names, names + [c.name for c in candidates if c.name not in set(names)],
                         s.model is not None)
    wsm = ws.pair_metrics(updates, s.device)
    wsm.update(spectral.pair_spectra(updates, wsm, s.device))
    adapters = [{"kind": "adapter", "adapter": u.name, "task": task_of(u), **adapter_stats(u)} for u in updates]
    pairs = [{"kind": "pair", "a": names[i], "b": names[j], **{m: _f(wsm[m][i, j]) for m in PAIR_METRICS}}
             for i in range(n) for j in range(i + 1, n)]
    for i, a in enumerate(adapters):
        for m in ("cosine", "sign_change_ratio", "magnitude_change_ratio", "conflict_magnitude_ratio"):
            vals = [float(wsm[m][i, j]) for j in range(n) if j != i and not math.isnan(float(wsm[m][i, j]))]
            a[f"mean_{m}"] = sum(vals) / len(vals) if vals else None
    groups: list[dict] = []
    geo, everyone = None, list(updates) + [c for c in candidates if c.name not in set(names)]
    if s.model is not None:
        geo, group = _representations(everyone, n, s, adapters, pairs, progress)
        groups.append(group)
        if s.gradients:
            _gradients(updates, s, pairs)
        if s.explain:
            _explain(updates, s, adapters)
    out = pairs + adapters + groups
    if scores is not None:
        metrics = [m for m in _numeric(adapters) if m not in ("score",)]
        out += analysis.score_stats(adapters, scores, metrics)
    if losses is not None:
        out += analysis.loss_table(losses) + analysis.anovas(losses)
        bypair = {tuple(sorted((p["a"], p["b"]))): p for p in pairs}
        out += analysis.pair_stats(losses, bypair, [m for m in PAIR_METRICS + HIDDEN_PAIR + GRAD_PAIR
                                                    if any(p.get(m) is not None for p in pairs)])
        if geo is not None:
            out += analysis.mds_stats(losses, _group_mds(geo, losses, everyone))
    if fit is not None:
        out += _fit(fit, adapters, pairs, scores, losses)
    if model is not None:
        out += _predictions(model, adapters, pairs, names)
    if select is not None:
        if geo is None:
            raise MergetoolError("--select", "needs hidden states", "pass --base and --data")
        res = rep.select(geo, list(range(n)), list(range(n, len(everyone))), [task_of(u) for u in everyone],
                         select, [u.name for u in everyone])
        out.append({"kind": "selection", **res})
    return out


def _predictions(model: predict.Model, adapters: list[dict], pairs: list[dict], names: list[str]) -> list[dict]:
    """The fitted model on new records: S per adapter, or a pair's normalized accuracy per pair; and, for a pair
    model on three or more adapters, the group of all of them, forecast from its pairs (the mean, and the worst
    pair, which the collapse paper finds drives a group's collapse). Records that lack a feature the model needs
    get ``null`` and a note; when none has them all, the run stops and says which are missing."""
    rows = adapters if model.target == "score" else pairs  # S per adapter, or a pair's normalized accuracy
    if not rows:
        raise MergetoolError("--predict", f"a model of {model.target} needs "
                             f"{'adapters' if model.target == 'score' else 'two adapters or more'}", "pass more adapters")
    got = model.predict(rows)
    if all(v is None for v in got):
        missing = sorted({f for f in model.features for r in rows if r.get(f) is None})
        raise MergetoolError("--predict", "no record has every feature the model needs "
                             f"(missing: {', '.join(missing)})", "compute them as when fitting (--base and --data for the hidden states, --gradients)")
    if any(v is None for v in got):
        log.warning("diagnose: %d of %d records lack a feature of the model: their predictions are null",
                    sum(v is None for v in got), len(got))
    out = []
    for r, v in zip(rows, got):
        key = {"adapter": r["adapter"]} if "adapter" in r else {"a": r["a"], "b": r["b"]}
        out.append({"kind": "prediction", **key, "target": model.target, "predicted": v})
    if model.target != "score" and len(names) >= 3 and all(v is not None for v in got):
        worst = min(range(len(rows)), key=lambda i: got[i])
        out.append({"kind": "prediction", "group": ",".join(sorted(names)), "target": model.target,
                    "predicted": sum(got) / len(got), "from": "mean of its pairs",
                    "worst_pair": {"a": rows[worst]["a"], "b": rows[worst]["b"], "predicted": got[worst]}})
    return out


def _representations(everyone, n, s: Setup, adapters, pairs, progress):
    """Hidden states of every adapter (and candidate, and --merged) on k examples of each task, batched."""
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
    models = list(everyone) + ([s.merged] if s.merged is not None else [])
    with RowAdapters(s.model, models) as ad:
        states = final_hidden(s.model, seqs, [(i, range(len(seqs))) for i in range(len(models))], ad,
                              s.batch_tokens, progress)
    H = torch.stack([rep.pooled(st, s.pool) for st in states])  # [models, X, d]
    geo = rep.Geometry(H[:len(everyone)], at)
    names = [u.name for u in everyone[:n]]
    dist, d2 = geo.distances(range(n), tasks[:n])
    sim, degenerate = rep.hidden_sim(dist)
    m = rep.mds(sim)
    t1 = rep.theorem1(d2, H.shape[-1], names)
    k = 0
    for i in range(n):
        adapters[i]["mds"] = m[i]
        adapters[i]["mean_hidden_sim"] = (float(sim[i].sum()) - 1) / max(n - 1, 1)
        adapters[i]["jung_weight"] = t1["jung_weights"][names[i]]
        for j in range(i + 1, n):
            pairs[k].update(hidden_distance=float(dist[i, j]), hidden_distance2=float(d2[i, j]),
                            hidden_sim=float(sim[i, j]))
            k += 1
    group = {"kind": "group", "adapters": names, "tasks": sorted(set(tasks[:n])), "k": s.k, "pool": s.pool,
             "n_inputs": sum(len(blocks[t]) for t in set(tasks[:n])), "degenerate": degenerate, **t1}
    if s.merged is not None:
        x = [i for t in set(tasks[:n]) for i in at[t]]
        delta = rep.distortion(H[-1][x], H[:n][:, x])
        for i in range(n):
            adapters[i]["distortion"] = delta[i]
        worst = max(range(n), key=delta.__getitem__)
        group.update(merged=s.merged.name, distortion_max=delta[worst], distortion_argmax=names[worst],
                     distortion_excess=delta[worst] - t1["meb_radius2"])
    if s.budget is not None:
        group.update(rep.verdict(s.budget, t1))
        if s.merged is not None:
            group["met"] = group["distortion_max"] <= s.budget
    return geo, group


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


def _group_mds(geo, losses, everyone) -> dict[str, dict[str, float | None]]:
    """MDS of each member of each merged group (of three or more) whose members were all diagnosed."""
    index = {u.name: i for i, u in enumerate(everyone)}
    out = {}
    for r in losses:
        g = r["group"]
        if g in out or len(r["adapters"]) < 3 or not all(a in index for a in r["adapters"]):
            continue
        members = [index[a] for a in r["adapters"]]
        d, _ = geo.distances(members, [task_of(everyone[i]) for i in members])
        out[g] = dict(zip(r["adapters"], rep.mds(rep.hidden_sim(d)[0])))
    return out


def _numeric(rows: list[dict]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k, v in r.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    return [k for k in keys if any(r.get(k) is not None for r in rows)]


def _fit(spec: dict, adapters, pairs, scores, losses) -> list[dict]:
    """Fit the predictor of S (per adapter, joined with --scores) or of a pair's merge (1 + pair loss / 100, per
    --losses and one method), evaluated leave-one-task-out, then on every row."""
    if spec["target"] == "score":
        if scores is None:
            raise MergetoolError("--fit", "predicting S needs --scores", "pass score records")
        rows = [{**a, "score": scores[a["adapter"]]["score"], "tasks": [a["task"]]} for a in adapters
                if a["adapter"] in scores]
        target = "score"
    else:
        if losses is None:
            raise MergetoolError("--fit", "predicting a merge's loss needs --losses", "pass merging-loss records")
        method = spec.get("method")
        bypair: dict[tuple, list[float]] = {}
        for r in losses:
            if len(r["adapters"]) == 2 and r["loss"] is not None and (method is None or r["method"] == method):
                bypair.setdefault(tuple(sorted(r["adapters"])), []).append(r["loss"])
        task = {a["adapter"]: a["task"] for a in adapters}
        rows = [{**p, "normalized_accuracy": 1 + sum(bypair[k]) / len(bypair[k]) / 100, "tasks": [task[p["a"]], task[p["b"]]]}
                for p in pairs for k in [tuple(sorted((p["a"], p["b"])))] if k in bypair]
        target = "normalized_accuracy"
    feats = spec.get("features") or [f for f in _numeric(rows) if f not in (target, "score", "jung_weight")
                                     and all(isinstance(r.get(f), (int, float)) for r in rows)]
    if not feats:
        raise MergetoolError("--fit", "no feature is present in every record", "compute more metrics (--base, --data)")
    m = predict.fit(rows, feats, target, spec.get("lam", 1.0), spec.get("seed", 0))
    try:
        m.validation = predict.leave_one_task_out(rows, feats, target, "tasks", spec.get("lam", 1.0), spec.get("seed", 0))
    except MergetoolError as e:
        m.validation = {"skipped": e.line()}
    return [m.to_json()]
