"""The sparse linear predictor of "Demystifying Mergeability": which pairwise (or per-adapter) metrics predict
how well a merge goes, fitted and evaluated leave-one-task-out.

Features are min-max scaled to [−1, 1] with the training rows' minimum and maximum (a constant feature gets
range 1); the prediction is X w (no intercept: the loss is shift-invariant); w minimises
−Pearson(X w, y) + λ‖w‖₁ by Adam (lr 0.01, w₀ ~ N(0, 0.1²) seeded, up to 2000 steps, stopping when the loss
has not improved by 1e-5 for 100 steps); weights under 1e-3 in magnitude are then set to 0. These are the
authors' code's settings (λ = 1). Leave-one-task-out: for each task t, fit on the rows that do not involve t
and predict the rows that do; report each fold's Pearson and Spearman correlations and the correlation of all
held-out predictions together. Rows with a missing feature are left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import MergetoolError


@dataclass
class Model:
    """A fitted predictor: the features, their training ranges, the weights, what it predicts."""

    target: str
    features: list[str]
    lo: list[float]
    hi: list[float]
    weights: list[float]
    lam: float
    validation: dict | None = None

    def predict(self, rows: list[dict]) -> list[float | None]:
        out = []
        for r in rows:
            x = [r.get(f) for f in self.features]
            if any(v is None or not math.isfinite(v) for v in x):
                out.append(None)
                continue
            z = [_scale1(v, a, b) for v, a, b in zip(x, self.lo, self.hi)]
            out.append(sum(w * v for w, v in zip(self.weights, z)))
        return out

    def to_json(self) -> dict:
        return {"kind": "model", **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict, source: str) -> "Model":
        def num(x) -> float:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"{x!r} is not a finite number")
            return float(x)

        try:
            if not isinstance(doc, dict) or doc.get("kind") != "model":
                raise KeyError("kind")
            if doc["target"] not in ("score", "normalized_accuracy"):
                raise ValueError(f"unknown target {doc['target']!r}")
            if not isinstance(doc["features"], list) or not all(isinstance(f, str) for f in doc["features"]):
                raise ValueError("features must be names")
            m = cls(doc["target"], list(doc["features"]), [num(x) for x in doc["lo"]], [num(x) for x in doc["hi"]],
                    [num(x) for x in doc["weights"]], num(doc["lam"]), doc.get("validation"))
        except (KeyError, TypeError, ValueError) as e:
            raise MergetoolError(source, f"is not a diagnose model ({e})", "pass a file written by diagnose --fit") from None
        if not (len(m.features) == len(m.lo) == len(m.hi) == len(m.weights)):
            raise MergetoolError(source, "its features, ranges and weights differ in length", "refit the model")
        return m


def _scale1(v: float, lo: float, hi: float) -> float:
    span = hi - lo if hi > lo else 1.0
    return 2 * (v - lo) / span - 1


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / ((a.pow(2).sum() * b.pow(2).sum()).sqrt() + 1e-8)


def fit_weights(X: torch.Tensor, y: torch.Tensor, lam: float = 1.0, steps: int = 2000, lr: float = 0.01,
                patience: int = 100, tol: float = 1e-5, seed: int = 0) -> list[float]:
    """argmin_w −Pearson(Xw, y) + λ‖w‖₁ (X already scaled), by Adam with early stopping."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(X.shape[1], generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best, since = float("inf"), 0
    for _ in range(steps):
        opt.zero_grad()
        loss = -_pearson(X @ w, y) + lam * w.abs().sum()
        loss.backward()
        opt.step()
        v = float(loss.detach())
        if v < best - tol:
            best, since = v, 0
        else:
            since += 1
            if since >= patience:
                break
    out = w.detach()
    out[out.abs() < 1e-3] = 0
    return out.tolist()


def fit(rows: list[dict], features: Sequence[str], target: str, lam: float = 1.0, seed: int = 0) -> Model:
    """Fit on every complete row."""
    X, y = _matrix(rows, features, target)
    lo, hi = X.min(0).values.tolist(), X.max(0).values.tolist()
    Z = torch.tensor([[_scale1(v, a, b) for v, a, b in zip(r, lo, hi)] for r in X.tolist()], dtype=torch.float64)
    return Model(target, list(features), lo, hi, fit_weights(Z, y, lam, seed=seed), lam)


def _matrix(rows: list[dict], features: Sequence[str], target: str):
    keep = [r for r in rows if all(_ok(r.get(f)) for f in features) and _ok(r.get(target))]
    if len(keep) < 3:
        raise MergetoolError("--fit", f"{len(keep)} rows have every feature and the target {target!r}",
                             "give more records (or fewer features)")
    X = torch.tensor([[float(r[f]) for f in features] for r in keep], dtype=torch.float64)
    y = torch.tensor([float(r[target]) for r in keep], dtype=torch.float64)
    return X, y


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def leave_one_task_out(rows: list[dict], features: Sequence[str], target: str, tasks_of: str = "tasks",
                       lam: float = 1.0, seed: int = 0) -> dict:
    """Fold t: fit on the rows whose ``tasks_of`` (a list of task names) does not contain t, predict those that
    do. Returns each fold's correlations, the correlations of all held-out predictions, and the mean weights
    with how often each feature is used."""
    from ..stats import correlate

    rows = [r for r in rows if all(_ok(r.get(f)) for f in features) and _ok(r.get(target))]
    tasks = sorted({t for r in rows for t in r[tasks_of]})
    if len(tasks) < 2:
        raise MergetoolError("--fit", f"leave-one-task-out needs at least 2 tasks, the records have {len(tasks)}",
                             "give records of more tasks")
    folds, pred, truth, weights = [], [], [], []
    for t in tasks:
        train = [r for r in rows if t not in r[tasks_of]]
        val = [r for r in rows if t in r[tasks_of]]
        if len(train) < 3 or not val:
            continue
        m = fit(train, features, target, lam, seed)
        p = m.predict(val)
        y = [float(r[target]) for r in val]
        c = correlate(p, y)
        folds.append({"task": t, "n_train": len(train), "n_val": len(val), "pearson": c["pearson"],
                      "spearman": c["spearman"]})
        pred += p
        truth += y
        weights.append(m.weights)
    allc = correlate(pred, truth)
    k = len(weights)
    return {"folds": folds, "pearson": allc["pearson"], "pearson_p": allc["pearson_p"],
            "spearman": allc["spearman"], "spearman_p": allc["spearman_p"], "n": allc["n"],
            "mean_weights": {f: sum(w[i] for w in weights) / k for i, f in enumerate(features)} if k else {},
            "nonzero_frequency": {f: sum(w[i] != 0 for w in weights) / k for i, f in enumerate(features)} if k else {}}
