"""The sparse linear predictor of "Demystifying Mergeability": which pairwise (or per-adapter) metrics predict
how well a merge goes, fitted and evaluated leave-one-task-out.

Features are min-max scaled to [−1, 1] with the training rows' minimum and maximum (a constant feature gets
range 1); the score is X w (no intercept: the loss is shift-invariant); w minimises −Pearson(X w, y) + λ‖w‖₁
by Adam (lr 0.01, w₀ ~ N(0, 0.1²) seeded, up to 2000 steps, stopping when the loss has not improved by 1e-5 for
100 steps); weights under 1e-3 in magnitude are then set to 0. These are the authors' code's settings (λ = 1).

The objective has no minimiser for λ > 0: −Pearson is scale-free, so the penalty always gains by shrinking w,
and the weights found are where Adam's steps (lr 0.01) hover as the weights shrink; the 1e-3 threshold makes
the zeros. mergetool keeps the authors' procedure (its weights are what their code finds) and says so: a fit
that stops at the step limit is reported as not converged, and one whose weights are all zero as constant.

Beyond the authors: the score X w has no unit, so each model is calibrated on its training rows by least
squares, prediction = a + b·(X w), which keeps every correlation (b > 0 when X w correlates positively) and
puts forecasts in the target's unit (S, or a pair's normalized accuracy 1 + L/100). Rows with a missing
feature are left out. Leave-one-task-out validation, baselines and intervals are in ``forecast``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import MergetoolError, UsageError


@dataclass
class Model:
    """A fitted predictor: the features, their training ranges, the weights, what it predicts."""

    target: str
    features: list[str]
    lo: list[float]
    hi: list[float]
    weights: list[float]
    lam: float
    intercept: float = 0.0
    slope: float = 1.0
    method: str | None = None
    fit: dict | None = None
    validation: dict | None = None
    baselines: list | None = None
    groups: dict | None = None

    def scores(self, rows: list[dict]) -> list[float | None]:
        """X w of each row (None where a feature is missing)."""
        out = []
        for r in rows:
            x = [r.get(f) for f in self.features]
            if any(not _ok(v) for v in x):
                out.append(None)
                continue
            z = [_scale1(v, a, b) for v, a, b in zip(x, self.lo, self.hi)]
            out.append(sum(w * v for w, v in zip(self.weights, z)))
        return out

    def predict(self, rows: list[dict]) -> list[float | None]:
        """The calibrated forecast a + b·(X w) of each row, in the target's unit."""
        return [None if v is None else self.intercept + self.slope * v for v in self.scores(rows)]

    def linear(self, rows: list[dict], origin: dict[str, float] | None = None) -> list[float | None]:
        """The forecast without its constant: Σ β_i (x_i − o_i) with β_i = b·2w_i/(hi_i − lo_i), the raw features'
        slopes in the target's unit, from the origin o (default 0; what leave-one-task-out pools across folds,
        from one origin for every fold: see ``forecast``). A feature that was constant on the rows fitted has no
        slope (β_i = 0): its term w_i·z_i was part of the constant."""
        beta = [self.slope * 2 * w / (h - lo) if h > lo else 0.0 for w, lo, h in zip(self.weights, self.lo, self.hi)]
        o = [(origin or {}).get(f, 0.0) for f in self.features]
        out = []
        for r in rows:
            x = [r.get(f) for f in self.features]
            out.append(None if any(not _ok(v) for v in x) else sum(b * (float(v) - c) for b, v, c in zip(beta, x, o)))
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
            if doc.get("method") is not None and not isinstance(doc["method"], str):
                raise ValueError("method must be a name")
            m = cls(doc["target"], list(doc["features"]), [num(x) for x in doc["lo"]], [num(x) for x in doc["hi"]],
                    [num(x) for x in doc["weights"]], num(doc["lam"]), num(doc.get("intercept", 0.0)),
                    num(doc.get("slope", 1.0)), doc.get("method"), doc.get("fit"), doc.get("validation"),
                    doc.get("baselines"), doc.get("groups"))
        except (KeyError, TypeError, ValueError) as e:
            raise MergetoolError(source, f"is not a diagnose model ({e})", "pass a file written by diagnose --fit") from None
        if not (len(m.features) == len(m.lo) == len(m.hi) == len(m.weights)):
            raise MergetoolError(source, "its features, ranges and weights differ in length", "refit the model")
        return m


MODEL_BYTES = 16 * 2**20  # a fitted model is a few kilobytes; larger files are not models


def read_model(path: str) -> Model:
    """A model file written by ``diagnose --fit``, read in bounded memory: a file over MODEL_BYTES is refused
    before it is read."""
    import json
    import os

    try:
        size = os.stat(path).st_size
        if size > MODEL_BYTES:
            raise MergetoolError(path, f"is not a diagnose model ({size:,} bytes; a fitted model is a few kilobytes)",
                                 "pass the file diagnose --fit wrote")
        with open(path, "rb") as f:
            raw = f.read(MODEL_BYTES + 1)
        if len(raw) > MODEL_BYTES:  # grew while we looked, or a device
            raise MergetoolError(path, "is not a diagnose model (larger than 16 MiB)", "pass the file diagnose --fit wrote")
        doc = json.loads(raw)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MergetoolError(path, f"cannot read the model ({e.__class__.__name__})", "pass --fit's file") from None
    return Model.from_json(doc, path)


def _scale1(v: float, lo: float, hi: float) -> float:
    span = hi - lo if hi > lo else 1.0
    return 2 * (v - lo) / span - 1


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / ((a.pow(2).sum() * b.pow(2).sum()).sqrt() + 1e-8)


LR, STEPS, PATIENCE, TOL, THRESHOLD = 0.01, 2000, 100, 1e-5, 1e-3
LAM_MAX = 1e150  # above it λ² overflows Adam's second moment: the weights could not move


def check_lam(lam: float) -> None:
    """Refuse a λ the optimiser cannot use: negative, not finite, or so large that its square (Adam's second
    moment of the penalty's gradient) overflows, which would leave the weights where they started."""
    if not (math.isfinite(lam) and 0 <= lam <= LAM_MAX):
        raise UsageError("--l1", f"{lam} is not a λ the optimiser can use (a finite λ in [0, {LAM_MAX:g}]: "
                             "Adam squares the penalty's gradient)", "pass --l1 1 (the authors' λ)")


def fit_weights(X: torch.Tensor, y: torch.Tensor, lam: float = 1.0, steps: int = STEPS, lr: float = LR,
                patience: int = PATIENCE, tol: float = TOL, seed: int = 0) -> tuple[list[float], dict]:
    """argmin_w −Pearson(Xw, y) + λ‖w‖₁ (X already scaled), by Adam with early stopping; the weights and how
    the fit went: ``steps``, ``converged`` (stopped by the plateau rule before the step limit), ``loss``."""
    check_lam(lam)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(X.shape[1], generator=g, dtype=torch.float64) * 0.1).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    best, since, step, converged = float("inf"), 0, 0, False
    for step in range(1, steps + 1):
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
                converged = True
                break
    out = w.detach()
    out[out.abs() < THRESHOLD] = 0
    return out.tolist(), {"steps": step, "converged": converged, "loss": best, "all_zero": bool((out == 0).all())}


def fit(rows: list[dict], features: Sequence[str], target: str, lam: float = 1.0, seed: int = 0) -> Model:
    """Fit on every complete row, then calibrate a + b·(X w) on the same rows by least squares."""
    X, y = _matrix(rows, features, target)
    lo, hi = X.min(0).values.tolist(), X.max(0).values.tolist()
    Z = torch.tensor([[_scale1(v, a, b) for v, a, b in zip(r, lo, hi)] for r in X.tolist()], dtype=torch.float64)
    w, info = fit_weights(Z, y, lam, seed=seed)
    a, b = calibrate((Z @ torch.tensor(w, dtype=torch.float64)).tolist(), y.tolist())
    return Model(target, list(features), lo, hi, w, lam, a, b, fit={**info, "n": len(y)})


def calibrate(score: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y ≈ a + b·score (b = 0, a = mean y for a constant score)."""
    n = len(y)
    ms, my = sum(score) / n, sum(y) / n
    sxx = sum((s - ms) ** 2 for s in score)
    b = sum((s - ms) * (t - my) for s, t in zip(score, y)) / sxx if sxx > 1e-300 else 0.0
    return my - b * ms, b


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
