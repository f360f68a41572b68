"""Merge weights: the weights JSONL that ``merge --weights`` reads and ``weight`` writes, the base model's
accuracy per task and the mergeability scores that ``weighted-base`` and ``weight`` read, and the rules that
turn them into weights.

Weights JSONL: one ``{"adapter": NAME, "weight": w}`` per line, ``w`` a finite number, each adapter once.

Base-accuracy weighting ("Will it Merge?", section 6): with s_i = 1 − Acc_base(t_i), the base model's
error on adapter i's task, w_i = softmax(s_i / τ): tasks the base knows least weigh most, and a small τ
sharpens the weighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO, Iterable

from .errors import MergetoolError, UsageError
from .jsonl import read_jsonl


def _finite(x, where: str, what: str) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        raise MergetoolError(where, f"{what} must be a finite number, got {x!r}", "fix the record")
    return float(x)


def read_weights(src: str, names: list[str]) -> list[float]:
    """One weight per input adapter, in the order of ``names``, from a weights JSONL file (or ``-``)."""
    rows = read_jsonl(src)
    by: dict[str, float] = {}
    for i, r in enumerate(rows, 1):
        where = f"{'<stdin>' if src == '-' else src}:{i}"
        if not isinstance(r.get("adapter"), str) or "weight" not in r:
            raise MergetoolError(where, "a weight record needs 'adapter' (string) and 'weight' (number)",
                                 'write {"adapter": NAME, "weight": w}')
        if r["adapter"] in by:
            raise MergetoolError(where, f"adapter {r['adapter']!r} has a second weight",
                                 "give each adapter one weight")
        by[r["adapter"]] = _finite(r["weight"], where, "'weight'")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise MergetoolError("--weights", f"two inputs are named {dup!r}, so weights by name are ambiguous",
                             "rename the adapters (metadata 'name')")
    missing = [n for n in names if n not in by]
    if missing:
        raise MergetoolError(src, f"no weight for {', '.join(missing[:3])}", "give one weight per input adapter")
    extra = [n for n in by if n not in names]
    if extra:
        raise MergetoolError(src, f"weight for unknown adapter {extra[0]!r}", f"inputs are {', '.join(names[:5])}")
    return [by[n] for n in names]


def write_weights(pairs: Iterable[tuple[str, float]], fh: IO[str]) -> None:
    from .jsonl import record_line

    for name, w in pairs:
        fh.write(record_line({"adapter": name, "weight": w}, f"the weight of {name}"))


@dataclass
class BaseAccuracy:
    """The base model's accuracy per task, and the adapters whose rows the file held instead."""

    by_task: dict[str, float]
    others: dict[str, set[str]]
    source: str

    def of(self, keys: list[tuple[str, str]]) -> list[float]:
        """The accuracy of each ``(adapter name, task)``; a task without a base row is an error that names the
        adapter (and, when the file holds rows of other adapters for that task, says so)."""
        out = []
        for adapter, task in keys:
            if task not in self.by_task:
                seen = self.others.get(task)
                why = f"no base-model row (adapter null) for task {task!r} of adapter {adapter!r}"
                if seen:
                    why += f"; the file has rows for adapter {sorted(seen)[0]!r} only"
                raise MergetoolError(self.source, why, "evaluate the base model on every task first (eval --summary)")
            out.append(self.by_task[task])
        return out


def base_accuracy(src: str) -> BaseAccuracy:
    """The base model's accuracy per task, from ``eval --summary`` records (``task``, ``accuracy``) or
    per-example ``eval`` records (``task``, ``correct``), keeping only the base model's rows (``adapter``
    null): a file of another model's rows is never taken silently."""
    rows = read_jsonl(src)
    name = "<stdin>" if src == "-" else src
    summary: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    others: dict[str, set[str]] = {}
    for i, r in enumerate(rows, 1):
        where = f"{name}:{i}"
        task = r.get("task")
        if not isinstance(task, str):
            raise MergetoolError(where, "needs 'task' (a string)", "pass eval --summary records or eval records")
        if r.get("adapter") is not None:
            others.setdefault(task, set()).add(str(r["adapter"]))
            continue
        if "accuracy" in r:
            acc = _finite(r["accuracy"], where, "'accuracy'")
            if not 0 <= acc <= 1:
                raise MergetoolError(where, f"'accuracy' {acc} is outside [0, 1]", "pass eval --summary records")
            if task in summary:
                raise MergetoolError(where, f"a second base accuracy for task {task!r}", "keep one row per task")
            summary[task] = acc
        elif "correct" in r:
            c = r["correct"]
            if isinstance(c, bool) or c not in (0, 1):
                raise MergetoolError(where, f"'correct' must be 0 or 1, got {c!r}", "pass eval records")
            k = counts.setdefault(task, [0, 0])
            k[0] += int(c)
            k[1] += 1
        else:
            raise MergetoolError(where, "has neither 'accuracy' nor 'correct'",
                                 "pass eval --summary records or eval records of the base model")
    for task, (k, n) in counts.items():
        if task in summary:
            raise MergetoolError(name, f"task {task!r} has both a summary and per-example records",
                                 "pass one kind of record")
        summary[task] = k / n
    return BaseAccuracy(summary, others, name)


def base_softmax(acc: list[float], tau: float) -> list[float]:
    """w_i = softmax((1 − acc_i) / τ) ("Will it Merge?" section 6, eq. 6's weights)."""
    return softmax([1.0 - a for a in acc], tau)


def softmax(s: list[float], tau: float) -> list[float]:
    """w_i = exp(s_i / τ) / Σ_j exp(s_j / τ), computed as exp((s_i − max s) / τ) / Σ_j …: the largest term is
    exactly 1 and the others in [0, 1], so no τ > 0 overflows (a tiny τ gives the arg-max, ties shared; dividing
    first made inf − inf = NaN at τ = 1e-320)."""
    if not (math.isfinite(tau) and tau > 0):
        raise UsageError("--tau", f"{tau} is not a positive finite temperature", "pass --tau 0.5, say")
    top = max(s)
    e = [math.exp((x - top) / tau) for x in s]
    z = sum(e)
    return [x / z for x in e]


def score_records(src: str) -> dict[str, dict]:
    """``score`` records by adapter, each checked: an ``adapter`` name, a finite ``score`` in [0, 1], one record
    per adapter."""
    out: dict[str, dict] = {}
    name = "<stdin>" if src == "-" else src
    for i, r in enumerate(read_jsonl(src), 1):
        where = f"{name}:{i}"
        if not isinstance(r.get("adapter"), str) or "score" not in r:
            raise MergetoolError(where, "a score record needs 'adapter' and 'score'", "pass mergetool score records")
        s = _finite(r["score"], where, "'score'")
        if not 0 <= s <= 1:
            raise MergetoolError(where, f"'score' {s} is outside [0, 1]", "pass mergetool score records")
        if r["adapter"] in out:
            raise MergetoolError(where, f"adapter {r['adapter']!r} has a second score", "keep one record per adapter")
        out[r["adapter"]] = {**r, "score": s}
    return out


def score_values(src: str) -> dict[str, float]:
    """Each adapter's mergeability score S from ``score`` records (``adapter``, ``score``)."""
    return {a: r["score"] for a, r in score_records(src).items()}


def make_weights(src: str, by: str, tau: float, normalize: str,
                 adapters: list[tuple[str, str]] | None = None) -> list[tuple[str, float]]:
    """Merge weights from records: ``by="base"``: s_i = 1 − Acc_base(task of i) from eval records of the base
    model ("Will it Merge?" section 6); ``by="score"``: s_i = 1 − S_i from score records, so less mergeable
    adapters weigh more. w = softmax(s / τ), then ``normalize``: ``sum`` (the weights sum to 1) or ``max`` (the
    largest is 1). ``adapters`` ((name, task) pairs) names the outputs; without them, every task (by base) or
    every scored adapter (by score) in the records gets a weight."""
    if by not in ("base", "score"):
        raise UsageError("--by", f"unknown basis {by!r}", "use base or score")
    if normalize not in ("sum", "max"):
        raise UsageError("--normalize", f"unknown normalisation {normalize!r}", "use sum or max")
    if by == "base":
        acc = base_accuracy(src)
        keys = adapters if adapters is not None else [(t, t) for t in acc.by_task]
        if not keys:
            raise MergetoolError(acc.source, "holds no base-model rows (adapter null)", "pass eval records of the base")
        s = [1.0 - a for a in acc.of(keys)]
    else:
        scores = score_values(src)
        keys = adapters if adapters is not None else [(n, n) for n in scores]
        missing = [n for n, _ in keys if n not in scores]
        if missing:
            raise MergetoolError(src, f"no score for adapter {missing[0]!r}", "score every adapter first")
        s = [1.0 - scores[n] for n, _ in keys]
    w = softmax(s, tau)
    if normalize == "max":
        top = max(w)
        w = [x / top for x in w]
    return [(n, x) for (n, _), x in zip(keys, w)]
