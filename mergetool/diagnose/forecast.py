"""What a fitted predictor is worth: leave-one-task-out validation against baselines, with bootstrap intervals,
and the forecasts ``--predict`` makes.

Targets: S per adapter (``score`` records), or a merged pair's normalized accuracy 1 + L/100 (the mean of its two
members' losses L, for one merge method or averaged over the methods).

**Leave one task out.** Fold t fits on the rows that do not involve task t and predicts the rows that do (a pair
is held out in the folds of both its tasks, as in the authors' code); reported: the Pearson and Spearman
correlation of all held-out predictions with the truth (pooled), each fold's correlations and their mean (the
authors' per-fold figure), the mean weight of each feature over the folds and how often it is non-zero, and how
many fold fits did not converge. The pooled figure compares each fold's forecasts without the fold's constant
term (Σ β_i (x_i − x̄_i) in the target's unit: the calibrated slopes of the raw features, from one origin for
every fold, each feature's mean over all the rows): a fold's constant is what it learned about the tasks it saw,
which is biased against the held-out task (the training mean leaves that task's effect out), and pooling those
constants makes even a metric with no information look anti-correlated with the loss. The common origin keeps
β_i·x̄_i out as well, a constant that would differ between folds with their slopes (a feature whose values sit
far from 0, such as a norm near 30, made it the largest term); a feature constant on a fold's training rows
has no slope there, and one constant on all the rows is neither a feature nor a baseline. The per-fold correlations are not touched by a constant.

**Baselines**, through the same folds on the same rows: each feature alone, and for pairs the plain cosine, as a
least-squares line y ≈ a + b·x fitted on the fold's training rows (compared as b·x, like the predictor); for S
also a plain least-squares model of the base model's knowledge (p_correct, gap, rank together). A baseline that
matches the predictor says that the predictor adds nothing over one number.

**Intervals**: task bootstrap of the held-out predictions (``resample``: pairs that share a task are dependent,
so tasks are resampled), for each figure and for the predictor's figure minus each baseline's on the same
resamples (paired; an interval above 0 says the predictor beats that baseline). The predictions are held fixed:
the interval covers which tasks were sampled, not the refitting.

**A group's worst loss from its pairs** (pair models, when the loss records hold groups of three or more): each
group is forecast from a model fitted on the pairs that share no task with it (leaving out only one task would
keep the group's other pairs in the training set), as ``--predict`` forecasts a group: the worst of its pairs'
forecasts (and their mean); against the group's measured worst member (1 + min L/100), the same for the
baselines, with intervals from resampling the groups (conditional on the task set: see ``resample``). One more
baseline knows only the group's size (its forecast: −size): the worst of more pairs' forecasts is lower whatever
they are, so groups of mixed sizes give every forecast a correlation through the size alone, and a predictor
is worth something for groups only where it beats that baseline.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np

from ..errors import MergetoolError
from . import predict
from .analysis import numeric_fields, pair_losses
from .resample import RESAMPLES, correlation_intervals, task_weights, unit_weights, weighted_corr

log = logging.getLogger("mergetool")

BASE_KNOWLEDGE = ("p_correct", "gap", "rank")
Learner = Callable[[list[dict]], Callable[[list[dict]], list[float | None]]]


def training_rows(spec: dict, rec, scores: dict | None, losses: list[dict] | None) -> tuple[list[dict], str]:
    """The rows a fit learns from (each with ``tasks``), and the target's name."""
    if spec["target"] == "score":
        if scores is None:
            raise MergetoolError("--fit", "predicting S needs --scores", "pass score records")
        rows = [{**a, "score": scores[a["adapter"]]["score"], "tasks": [a["task"]]} for a in rec.adapters
                if a["adapter"] in scores]
        return rows, "score"
    if losses is None:
        raise MergetoolError("--fit", "predicting a merge's loss needs --losses", "pass merging-loss records")
    task = {a["adapter"]: a["task"] for a in rec.adapters}
    rows, index = [], _pair_index(rec.pairs)
    for key, loss in pair_losses(losses, spec.get("method")).items():
        p = index.get(key)
        if p is not None:
            rows.append({**p, "normalized_accuracy": 1 + loss / 100,
                         "tasks": [task.get(p["a"], p["a"]), task.get(p["b"], p["b"])]})
    return rows, "normalized_accuracy"


def _pair_index(pairs: list[dict]) -> dict[tuple[str, str], dict]:
    return {tuple(sorted((p["a"], p["b"]))): p for p in pairs}


def fit_with_baselines(spec: dict, rec, scores: dict | None, losses: list[dict] | None) -> list[dict]:
    """The ``model`` record of ``--fit``: the predictor fitted on every row, its leave-one-task-out validation,
    the baselines, and for pair models the group forecasts (see the module docstring)."""
    rows, target = training_rows(spec, rec, scores, losses)
    lam, seed, boot = spec.get("lam", 1.0), spec.get("seed", 0), spec.get("resamples", RESAMPLES)
    feats = spec.get("features") or [f for f in numeric_fields(rows) if f not in (target, "score", "jung_weight")
                                     and all(predict._ok(r.get(f)) for r in rows) and _varies(rows, f)]
    if not feats:
        raise MergetoolError("--fit", "no feature is present in every record", "compute more metrics (--base, --data)")
    rows = [r for r in rows if all(predict._ok(r.get(f)) for f in feats) and predict._ok(r.get(target))]
    m = predict.fit(rows, feats, target, lam, seed)
    m.method = spec.get("method")
    _say(m.fit, "the predictor")
    fits: list[dict] = []
    baselines = _baselines(rows, feats, target)
    o = origin(rows, {f for fs in baselines.values() for f in fs} | set(feats))
    learners: dict[str, Learner] = {"predictor": _l1(feats, target, lam, seed, fits, o)}
    learners.update({name: _ols(fs, target, o) for name, fs in baselines.items()})
    try:
        m.validation, others = _loto(rows, target, learners, fits, feats, boot, seed)
        m.baselines = [{"name": name, "model": "least squares", "features": list(baselines[name]), **others[name]}
                       for name in baselines]
    except MergetoolError as e:
        m.validation = {"skipped": e.line()}
    if target == "normalized_accuracy":
        m.groups = _group_forecasts(rows, losses, spec.get("method"), learners, baselines, boot, seed)
    return [m.to_json()]


def leave_one_task_out(rows: list[dict], features: Sequence[str], target: str, lam: float = 1.0, seed: int = 0,
                       resamples: int = RESAMPLES) -> dict:
    """The predictor's leave-one-task-out validation alone (no baselines) over rows with ``tasks``."""
    rows = [r for r in rows if all(predict._ok(r.get(f)) for f in features) and predict._ok(r.get(target))]
    fits: list[dict] = []
    return _loto(rows, target, {"predictor": _l1(features, target, lam, seed, fits, origin(rows, features))}, fits,
                 features, resamples, seed)[0]


def origin(rows: list[dict], feats) -> dict[str, float]:
    """Each feature's mean over all the rows: the one origin every fold's forecasts are measured from. Raw
    features would add β_i·x̄_i to a fold's forecasts, a constant that differs from fold to fold with the fold's
    slope and grows with how far the feature's unit is from 0 (a norm near 30), and pooling such constants is
    the artefact the folds' constants are dropped for. Computed from the features alone, never the target."""
    return {f: sum(float(r[f]) for r in rows) / len(rows) for f in feats if rows}


def _say(info: dict, what: str) -> None:
    if not info.get("converged"):
        log.warning("diagnose: %s did not converge (stopped at the step limit, %d steps)", what, info["steps"])
    if info.get("all_zero"):
        log.warning("diagnose: %s has every weight zero (the L1 penalty won): it predicts a constant; lower --l1",
                    what)


def _varies(rows: list[dict], f: str) -> bool:
    """Whether feature f takes more than one value over the rows (one that does not has no slope to learn:
    e.g. the accuracy alone of experts all kept because they answer their question)."""
    return len({float(r[f]) for r in rows if predict._ok(r.get(f))}) > 1


def _baselines(rows: list[dict], feats: Sequence[str], target: str) -> dict[str, list[str]]:
    out = {f: [f] for f in feats if _varies(rows, f)}
    if target == "normalized_accuracy" and "cosine" not in out and all(predict._ok(r.get("cosine")) for r in rows):
        out["cosine"] = ["cosine"]
    if target == "score":
        known = [f for f in BASE_KNOWLEDGE if all(predict._ok(r.get(f)) for r in rows) and _varies(rows, f)]
        if known:
            out["base_knowledge"] = known
    return out


def _l1(feats, target, lam, seed, fits: list[dict], o: dict[str, float]) -> Learner:
    """The predictor, fitted on a fold's training rows; its forecasts without their constant, from ``o``."""
    def learn(train):
        m = predict.fit(train, feats, target, lam, seed)
        fits.append({"weights": m.weights, **m.fit})
        return lambda rows: m.linear(rows, o)
    return learn


def _ols(feats: Sequence[str], target: str, o: dict[str, float]) -> Learner:
    """A least-squares model with an intercept on ``feats`` (a plain line for one feature); its forecasts
    without the intercept, from ``o``. A feature constant on the fold's training rows is left out of that
    fold's fit (it would only split the intercept with it, and its share would come back as a constant)."""
    def learn(train):
        used = [f for f in feats if _varies(train, f)]
        X = np.array([[1.0] + [float(r[f]) for f in used] for r in train])
        y = np.array([float(r[target]) for r in train])
        beta = np.linalg.lstsq(X, y, rcond=None)[0]
        return lambda rows: [float(sum(b * (float(r[f]) - o[f]) for b, f in zip(beta[1:], used))) for r in rows]
    return learn


def _loto(rows, target, learners: dict[str, Learner], fits: list[dict], feats, boot: int, seed: int):
    tasks = sorted({t for r in rows for t in r["tasks"]})
    if len(tasks) < 2:
        raise MergetoolError("--fit", f"leave-one-task-out needs at least 2 tasks, the records have {len(tasks)}",
                             "give records of more tasks")
    entries: dict[str, list[tuple[int, float, float]]] = {k: [] for k in learners}
    folds = []
    for t in tasks:
        train = [r for r in rows if t not in r["tasks"]]
        val = [i for i, r in enumerate(rows) if t in r["tasks"]]
        if len(train) < 3 or not val:
            continue
        fold = {"task": t, "n_train": len(train), "n_val": len(val)}
        for name, learn in learners.items():
            got = learn(train)([rows[i] for i in val])
            truth = [float(rows[i][target]) for i in val]
            entries[name] += [(i, p, y) for i, p, y in zip(val, got, truth) if p is not None]
            if name == "predictor":
                fold["pearson"] = weighted_corr(np.array(got, float), np.array(truth), np.ones(len(val), int), "pearson")
                fold["spearman"] = weighted_corr(np.array(got, float), np.array(truth), np.ones(len(val), int), "spearman")
        folds.append(fold)
    if not folds:
        raise MergetoolError("--fit", "no task leaves enough rows to fit on", "give records of more tasks")
    weights = task_weights([r["tasks"] for r in rows], boot, seed)
    res = correlation_intervals(entries["predictor"], weights, {k: v for k, v in entries.items() if k != "predictor"})
    others = res.pop("others")
    for name, o in others.items():
        o.update(_fold_means(entries[name], rows, tasks, target))
    k = len(fits)
    val = {"folds": folds, **res, **_fold_means(entries["predictor"], rows, tasks, target),
           "bootstrap": {"unit": "task", "resamples": boot},
           "mean_weights": {f: sum(x["weights"][i] for x in fits) / k for i, f in enumerate(feats)},
           "nonzero_frequency": {f: sum(x["weights"][i] != 0 for x in fits) / k for i, f in enumerate(feats)},
           "fits_not_converged": sum(not x["converged"] for x in fits),
           "fits_all_zero": sum(x["all_zero"] for x in fits)}
    if val["fits_not_converged"]:
        log.warning("diagnose: %d of %d leave-one-task-out fits did not converge", val["fits_not_converged"], k)
    return val, others


def _fold_means(entries, rows, tasks, target) -> dict:
    """The mean over folds of each fold's correlations (the authors' per-fold figure)."""
    out = {}
    for kind in ("pearson", "spearman"):
        vals = []
        for t in tasks:
            es = [(p, y) for i, p, y in entries if t in rows[i]["tasks"]]
            if es:
                r = weighted_corr(np.array([p for p, _ in es]), np.array([y for _, y in es]), np.ones(len(es), int), kind)
                if r is not None:
                    vals.append(r)
        out[f"fold_{kind}_mean"] = sum(vals) / len(vals) if vals else None
    return out


# the baseline of a group's worst loss that knows only the group's size: the worst of more pairs' forecasts is
# lower whatever the forecasts are, so any predictor correlates with the worst loss through the size alone
SIZE = "group size alone"


def _group_forecasts(rows, losses, method, learners: dict[str, Learner], baselines, boot: int, seed: int) -> dict | None:
    """Each group of three or more, forecast from the pairs that share no task with it (module docstring)."""
    task_of = {}
    for r in rows:
        task_of[r["a"]], task_of[r["b"]] = r["tasks"]
    by_pair = {tuple(sorted((r["a"], r["b"]))): r for r in rows}
    groups = _group_worst(losses, method)
    units, forecasts = [], {**{name: [] for name in learners}, SIZE: []}
    for g, (members, worst) in groups.items():
        keys = [tuple(sorted((a, b))) for i, a in enumerate(members) for b in members[i + 1:]]
        if not all(k in by_pair for k in keys):
            continue
        ts = {task_of[a] for a in members}
        train = [r for r in rows if not ts & set(r["tasks"])]
        if len(train) < 3:
            continue
        units.append((g, 1 + worst / 100))
        for name, learn in learners.items():
            got = learn(train)([by_pair[k] for k in keys])
            forecasts[name].append(min(got) if all(v is not None for v in got) else None)
        forecasts[SIZE].append(-float(len(members)))
    if len(units) < 3:
        return None
    weights = unit_weights(len(units), boot, seed)

    def entries(name):
        return [(i, f, y) for i, ((_, y), f) in enumerate(zip(units, forecasts[name])) if f is not None]

    res = correlation_intervals(entries("predictor"), weights, {k: entries(k) for k in forecasts if k != "predictor"})
    others = res.pop("others")
    return {"n_groups": len(units), "forecast": "the worst of the group's pairs' forecasts",
            "measured": "1 + the group's worst member loss / 100",
            "holdout": "each group from a model fitted on the pairs that share no task with it",
            "bootstrap": {"unit": "group (conditional on the task set)", "resamples": boot},
            "predictor": res, "baselines": [{"name": k, "features": list(baselines.get(k, ())), **others[k]}
                                            for k in [*baselines, SIZE]]}


def _group_worst(losses: list[dict] | None, method: str | None) -> dict[str, tuple[list[str], float]]:
    """Per merged group of three or more: its members and its worst member loss (for ``method``, or each
    member's loss averaged over the methods first)."""
    per: dict[str, dict[str, list[float]]] = {}
    members: dict[str, list[str]] = {}
    for r in losses or []:
        if len(r["adapters"]) >= 3 and r["loss"] is not None and (method is None or r["method"] == method):
            members[r["group"]] = r["adapters"]
            per.setdefault(r["group"], {}).setdefault(r["adapter"], []).append(r["loss"])
    return {g: (members[g], min(sum(v) / len(v) for v in m.values())) for g, m in per.items()
            if len(m) == len(set(members[g]))}


def predictions(model: predict.Model, rec) -> list[dict]:
    """The fitted model on new records: S per adapter, or a pair's normalized accuracy per pair; and, for a pair
    model on three or more adapters, the group of all of them, forecast from its pairs (the mean, and the worst
    pair, which the collapse paper finds drives a group's collapse). Records that lack a feature the model needs
    get ``null`` and a note; when none has them all, the run stops and says which are missing."""
    rows = rec.adapters if model.target == "score" else rec.pairs
    if not rows:
        raise MergetoolError("--predict", f"a model of {model.target} needs "
                             f"{'adapters' if model.target == 'score' else 'two adapters or more'}", "pass more adapters")
    got = model.predict(rows)
    if all(v is None for v in got):
        missing = sorted({f for f in model.features for r in rows if r.get(f) is None})
        raise MergetoolError("--predict", "no record has every feature the model needs "
                             f"(missing: {', '.join(missing)})",
                             "compute them as when fitting (--base and --data for the hidden states, --gradients)")
    if any(v is None for v in got):
        log.warning("diagnose: %d of %d records lack a feature of the model: their predictions are null",
                    sum(v is None for v in got), len(got))
    out = []
    for r, v in zip(rows, got):
        key = {"adapter": r["adapter"]} if model.target == "score" else {"a": r["a"], "b": r["b"]}
        out.append({"kind": "prediction", **key, "target": model.target, "method": model.method, "predicted": v})
    names = [a["adapter"] for a in rec.adapters]
    if model.target != "score" and len(names) >= 3 and all(v is not None for v in got):
        worst = min(range(len(rows)), key=lambda i: got[i])
        out.append({"kind": "prediction", "group": ",".join(sorted(names)), "target": model.target,
                    "method": model.method, "predicted": sum(got) / len(got), "from": "mean of its pairs",
                    "worst_pair": {"a": rows[worst]["a"], "b": rows[worst]["b"], "predicted": got[worst]}})
    return out
