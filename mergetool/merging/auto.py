"""``merge --method auto``: the best merge of a pool on dev examples, found by search under a budget.

A candidate is a recipe: a method, its options (density, λ, α, inner method), one weight per member, and the
members (with ``drop``, some left out). It is judged by the normalised accuracy of the collapse paper, per task
acc(merge) / acc(the task's expert alone) on the search examples (the expert's accuracy floored at one
example's worth, so a task its expert never answers still counts), and the objective is the mean or the
worst task's. Candidates are judged many at once, as rows of one batched pass (``candidates.Judge``).

The search, all of it drawn from ``seed`` so that the same inputs give the same sequence of candidates:

1. start: every method at its usual settings (task arithmetic at λ 0.3-1, TIES and DARE-TIES at two densities,
   KnOTS, Core Space, TSV, STAR, consensus TIES, RegMean at two α when the model is at hand) and the weights of
   ``weight --by base`` (the base model's accuracy on each task's search examples) and ``--by score`` (score
   records, when given) at two temperatures;
2. drop (with ``drop``): the best start without one member, members tried in the order of ``diagnose``'s
   forecast (a fitted pair model's predicted normalised accuracy, lowest first, or otherwise each member's mean
   conflicting-magnitude ratio with the others, highest first); a drop that helps is kept and the next tried;
3. refine: a population of neighbours of the best recipe (weights and λ scaled by e^{σz}, density by e^{σz},
   α moved by σz; z standard normal), σ halved after a round that finds nothing better and, once small,
   restarted at the best recipe of the next method.

The trace (``trace``) holds the run's key, the experts' and the base model's accuracies, then one line per
judged candidate (its recipe and per-task accuracies); the same command with the same trace continues a search
that was killed (a candidate already there is not judged again), and, the sequence being fixed, ends with the
same result. A larger budget on the same trace continues the search further.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import MergetoolError, UsageError
from ..methods import Params, get, merge
from ..methods.engine import OPTION_FIELDS
from ..updates import Update
from ..weights import base_softmax, softmax
from .candidates import Judge
from .data import DevData

log = logging.getLogger("mergetool")

OBJECTIVES = ("mean", "worst")
SIGMA, SIGMA_MIN = 0.3, 0.03


@dataclass(frozen=True)
class Budget:
    """How much the search may do: judged candidates, or seconds."""

    candidates: int | None = None
    seconds: float | None = None

    def spent(self, judged: int, seconds: float) -> bool:
        return (self.candidates is not None and judged >= self.candidates) or \
            (self.seconds is not None and seconds >= self.seconds)

    def left(self) -> int:
        """The most candidates the whole search may judge."""
        return self.candidates if self.candidates is not None else 1 << 62


def parse_budget(text: str) -> Budget:
    """``64`` (candidates), ``300s`` or ``10m`` (seconds)."""
    t = text.strip().lower()
    try:
        if t.endswith("s") or t.endswith("m"):
            v = float(t[:-1]) * (60 if t.endswith("m") else 1)
            if math.isfinite(v) and v > 0:
                return Budget(seconds=v)
        elif int(t) > 0:
            return Budget(candidates=int(t))
    except ValueError:
        pass
    raise UsageError("--budget", f"{text!r} is neither a number of candidates nor a time",
                     "pass 64 (candidates), 300s or 10m")


@dataclass
class Candidate:
    """A recipe: method, options (by option name), one weight per member (or none), the members (pool indices)."""

    method: str
    options: dict
    weights: list[float] | None
    members: list[int]
    stage: str = "start"

    def key(self) -> str:
        return json.dumps([self.method, sorted(self.options.items()), self.weights, self.members])

    def params(self, names: list[str]) -> Params:
        kw = {OPTION_FIELDS[k]: v for k, v in self.options.items()}
        return Params(weights=list(self.weights) if self.weights is not None else None,
                      names=[names[i] for i in self.members], **kw)

    def recipe(self, names: list[str]) -> dict:
        return {"method": self.method, "options": dict(self.options), "weights": self.weights,
                "members": [names[i] for i in self.members]}


def normalised(acc: dict[str, float], alone: dict[str, float], sizes: dict[str, int]) -> dict[str, float]:
    """acc(merge)/acc(alone) per task, the expert's accuracy floored at one example's worth (1/n)."""
    return {t: a / max(alone[t], 1.0 / sizes[t]) for t, a in acc.items()}


def objective_of(norm: dict[str, float], kind: str) -> float:
    return min(norm.values()) if kind == "worst" else sum(norm.values()) / len(norm)


@dataclass
class Search:
    """The pool, the search examples and the budget; ``run`` returns the best candidate and its record."""

    model: object
    tok: object
    updates: list[Update]
    dev: DevData
    objective: str = "mean"
    budget: Budget = field(default_factory=lambda: Budget(candidates=64))
    drop: bool = False
    population: int = 16
    seed: int = 0
    trace: str | None = None
    forecast: object = None  # a diagnose pair model (predict.Model), or None for the weight-space metric
    score_weights: list[float] | None = None  # the pool's mergeability scores S_i, for weight --by score
    norm: str = "tokens"
    batch_tokens: int | None = None
    device: torch.device = torch.device("cpu")
    regmean: bool = True  # try RegMean (needs one pass for the Grams)
    progress: object = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UsageError("--objective", f"unknown objective {self.objective!r}", "use mean or worst")
        self.names = [u.name for u in self.updates]
        self.judge = Judge(self.model, self.tok, self.dev, self.norm, self.batch_tokens)
        self.sizes = {t: len(idx) for t, idx in self.judge.of_task.items()}
        self.done: dict[str, dict] = {}
        self.order: list[str] = []
        self.asked: set[str] = set()
        self.new = 0
        self.batches = 0  # batches judged: the unit of work (a candidate's numbers come from its batch's pass)
        self.rng = random.Random(self.seed)
        self._grams = None
        self._fh = None
        self._t0 = time.perf_counter()
        self._elapsed0 = 0.0

    # -- the trace

    def run_key(self) -> str:
        doc = [[(u.name, u.digest()) for u in self.updates], sorted((e.id, e.task, json.dumps(e.rec, sort_keys=True))
                                                                    for e in self.dev.examples),
               self.objective, self.drop, self.population, self.seed, self.norm, self.regmean,
               self.score_weights, self.forecast.to_json() if self.forecast is not None else None]
        return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()[:16]

    def _open_trace(self) -> dict | None:
        """Read a trace to continue (refusing another run's), and open it for appending; the reference accuracies
        it holds, or None."""
        if self.trace is None:
            return None
        from ..jsonl import resume_records

        path = Path(self.trace)
        refs = None
        key = self.run_key()
        if path.exists() and path.stat().st_size:
            recs, cut = resume_records(path, "merge --method auto")
            if not recs or recs[0].get("kind") != "run" or recs[0].get("run") != key:
                raise MergetoolError(str(path), "is the trace of another search (other adapters, examples or "
                                     "options)", "continue it with the same command, or write a new --trace")
            cut()
            keep = [recs[0]]
            batches: dict[int, list[dict]] = {}
            for r in recs[1:]:
                if r.get("kind") == "reference":
                    refs = r
                    keep.append(r)
                elif r.get("kind") == "candidate":
                    batches.setdefault(r["batch"], []).append(r)
            for b in sorted(batches):  # a batch cut short by the kill is judged again, whole (the same pass)
                if len(batches[b]) != batches[b][0]["of"]:
                    break
                for r in batches[b]:
                    self.done[r["key"]] = r
                    self.order.append(r["key"])
                    self._elapsed0 = max(self._elapsed0, float(r.get("elapsed", 0.0)))
                keep += batches[b]
                self.batches = b + 1
            if len(keep) < len(recs):
                from ..outputs import atomic_output

                with atomic_output(str(path)) as fh:
                    fh.write("".join(json.dumps(r) + "\n" for r in keep).encode())
            self._fh = open(path, "a")
            log.info("auto: continuing %s: %d candidates judged before", path, len(self.done))
        else:
            if path.parent and not path.parent.exists():
                raise MergetoolError(str(path), "its directory does not exist", "create it first")
            self._fh = open(path, "w")
            self._write({"kind": "run", "run": key, "adapters": self.names, "objective": self.objective,
                         "tasks": self.judge.tasks, "seed": self.seed})
        return refs

    def _write(self, rec: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()

    def elapsed(self) -> float:
        return self._elapsed0 + time.perf_counter() - self._t0

    # -- judging

    def _references(self) -> dict:
        """The experts' accuracies alone (each on every task; the task's own expert is its reference) and the base
        model's, in one pass."""
        accs = self.judge.accuracies([None, *self.updates])
        alone = {t: max(a[t] for a, tt in zip(accs[1:], self.dev.tasks) if tt == t) for t in self.judge.tasks}
        return {"kind": "reference", "base": accs[0], "alone": alone, "experts": accs[1:]}

    def grams(self) -> dict:
        if self._grams is None:
            from .grams import collect

            self._grams = collect(self.model, self.tok, self.updates, self.dev, batch_tokens=self.batch_tokens)
        return self._grams

    def params(self, c: Candidate) -> Params:
        """The candidate's merge options, and for RegMean its members' Grams (one tensor still shared by the
        modules that read one input)."""
        p = c.params(self.names)
        if get(c.method).data:
            sub: dict[int, torch.Tensor] = {}
            grams = {}
            for k, G in self.grams().items():
                if id(G) not in sub:
                    sub[id(G)] = G[c.members]
                grams[k] = sub[id(G)]
            p = replace(p, stats={"grams": grams})
        return p

    def merge(self, c: Candidate, name: str | None = None) -> Update:
        return merge([self.updates[i] for i in c.members], c.method, self.params(c), self.device, name=name)

    def judge_all(self, cands: list[Candidate]) -> list[dict]:
        """The records of ``cands`` (judged now in one batched pass, or read from the trace), as many as the
        budget allows (in order)."""
        fresh, seen = [], set()
        self.new = 0  # how many of these the search had not asked for before
        for c in cands:
            k = c.key()
            self.new += k not in self.asked
            self.asked.add(k)
            if k not in self.done and k not in seen and len(self.done) + len(fresh) < self.budget.left():
                fresh.append(c)
                seen.add(k)
        for at in range(0, len(fresh), self.population):  # a batch: ``population`` candidates in one pass
            if at and self.spent():  # out of time between two batches
                break
            chunk = fresh[at:at + self.population]
            accs = self.judge.accuracies([self.merge(c) for c in chunk])
            for c, acc in zip(chunk, accs):
                norm = normalised(acc, self.alone, self.sizes)
                rec = {"kind": "candidate", "n": len(self.done), "batch": self.batches, "of": len(chunk),
                       "key": c.key(), "stage": c.stage, **c.recipe(self.names), "dev": acc, "normalised": norm,
                       "objective": objective_of(norm, self.objective), "elapsed": round(self.elapsed(), 3)}
                self.done[rec["key"]] = rec
                self.order.append(rec["key"])
                self._write(rec)
            self.batches += 1
            if self.progress:
                self.progress(len(chunk))
        return [self.done[c.key()] for c in cands if c.key() in self.done]

    def spent(self) -> bool:
        return self.budget.spent(len(self.done), self.elapsed())

    # -- the search

    def starts(self) -> list[Candidate]:
        n = len(self.updates)
        ones, everyone = [1.0] * n, list(range(n))
        out = [Candidate("task-arithmetic", {"lambda": 0.5}, ones, everyone),
               Candidate("ties", {"density": 0.2, "lambda": 1.0}, ones, everyone),
               Candidate("knots", {"inner": "ties", "density": 0.2, "lambda": 1.0}, ones, everyone),
               Candidate("mean", {"lambda": 1.0}, None, everyone),
               Candidate("dare-ties", {"density": 0.3, "lambda": 1.0, "seed": self.seed}, ones, everyone),
               Candidate("core-space", {"inner": "ties", "density": 0.2, "lambda": 1.0}, ones, everyone)]
        if self.regmean and all(u.kind == "lora" for u in self.updates):
            out += [Candidate("regmean", {"alpha": 0.9, "lambda": 1.0}, None, everyone),
                    Candidate("regmean", {"alpha": 0.5, "lambda": 1.0}, None, everyone)]
        out += [Candidate("task-arithmetic", {"lambda": lam}, ones, everyone) for lam in (0.3, 0.7, 1.0)]
        out += [Candidate("ties", {"density": 0.5, "lambda": 1.0}, ones, everyone),
                Candidate("tsv", {"lambda": 1.0}, ones, everyone),
                Candidate("star", {"lambda": 1.0}, ones, everyone),
                Candidate("consensus-ties", {"density": 0.2, "lambda": 1.0}, ones, everyone)]
        base = [self.base[t] for t in self.dev.tasks]
        for tau in (0.2, 1.0):  # weight --by base, scaled so that equal weights are task arithmetic's 1 each
            out.append(Candidate("task-arithmetic", {"lambda": 0.5}, [n * w for w in base_softmax(base, tau)],
                                 everyone))
        if self.score_weights is not None:
            for tau in (0.2, 1.0):
                out.append(Candidate("task-arithmetic", {"lambda": 0.5},
                                     [n * w for w in softmax([1 - s for s in self.score_weights], tau)], everyone))
        return out

    def neighbours(self, c: Candidate, sigma: float) -> list[Candidate]:
        out = []
        for _ in range(self.population):
            g = self.rng.gauss
            opts = dict(c.options)
            if "lambda" in opts:
                opts["lambda"] = opts["lambda"] * math.exp(sigma * g(0, 1))
            if "density" in opts:
                opts["density"] = min(1.0, max(0.02, opts["density"] * math.exp(sigma * g(0, 1))))
            if "alpha" in opts:
                opts["alpha"] = min(1.0, max(0.0, opts["alpha"] + sigma * g(0, 1)))
            w = [x * math.exp(sigma * g(0, 1)) for x in c.weights] if c.weights is not None else None
            out.append(Candidate(c.method, opts, w, list(c.members), "refine"))
        return out

    def forecast_order(self, members: list[int]) -> list[int]:
        """The members, the one forecast to merge worst first."""
        from ..diagnose.core import PAIR_METRICS
        from ..diagnose.weightspace import pair_metrics

        ups = [self.updates[i] for i in members]
        ws = pair_metrics(ups, self.device)
        n = len(members)
        if self.forecast is not None:
            rows = [{"a": i, "b": j, **{m: float(ws[m][i, j]) for m in PAIR_METRICS}}
                    for i in range(n) for j in range(i + 1, n)]
            got = self.forecast.predict(rows)
            if any(v is None for v in got):
                missing = sorted(set(self.forecast.features) - set(PAIR_METRICS))
                raise MergetoolError("--predict", "the model needs features auto does not compute "
                                     f"({', '.join(missing)})", "fit it on weight-space pair metrics only "
                                     "(diagnose --fit without --base)")
            score = [sum(v for r, v in zip(rows, got) if k in (r["a"], r["b"])) / (n - 1) for k in range(n)]
            order = sorted(range(n), key=lambda k: score[k])
        else:
            conflict = ws["conflict_magnitude_ratio"].nan_to_num(0.0)
            score = [float(conflict[k].sum()) / (n - 1) for k in range(n)]
            order = sorted(range(n), key=lambda k: -score[k])
        return [members[k] for k in order]

    def best(self) -> dict:
        return max((self.done[k] for k in self.order), key=lambda r: r["objective"])  # ties: the first

    def _as_candidate(self, rec: dict) -> Candidate:
        members = [self.names.index(n) for n in rec["members"]]
        return Candidate(rec["method"], dict(rec["options"]), rec["weights"], members, rec["stage"])

    def run(self) -> tuple[Candidate, dict, dict]:
        """The best candidate, its record, and the references (experts alone and base) on the search examples."""
        try:
            refs = self._open_trace()
            if refs is None:
                refs = self._references()
                self._write(refs)
            self.alone, self.base = refs["alone"], refs["base"]
            self.judge_all(self.starts())
            if self.drop and not self.spent():
                self._drops()
            self._refine()
        finally:
            if self._fh is not None:
                self._fh.close()
        rec = self.best()
        return self._as_candidate(rec), rec, refs

    def _drops(self) -> None:
        cur = self._as_candidate(self.best())
        while len(cur.members) > 2 and not self.spent():
            order = self.forecast_order(cur.members)[:self.population]
            cands = []
            for m in order:
                keep = [k for k, x in enumerate(cur.members) if x != m]
                w = [cur.weights[k] for k in keep] if cur.weights is not None else None
                cands.append(Candidate(cur.method, dict(cur.options), w, [cur.members[k] for k in keep], "drop"))
            recs = self.judge_all(cands)
            if not recs:
                return
            top = max(recs, key=lambda r: r["objective"])
            if top["objective"] <= self.done[cur.key()]["objective"]:
                return
            cur = self._as_candidate(top)

    def _refine(self) -> None:
        firsts: dict[str, dict] = {}  # the best record of each method, in the order of their objective
        for k in self.order:
            r = self.done[k]
            if r["method"] not in firsts or r["objective"] > firsts[r["method"]]["objective"]:
                firsts[r["method"]] = r
        queue = sorted(firsts.values(), key=lambda r: -r["objective"])
        at, sigma = 0, SIGMA
        cur = self._as_candidate(self.best())
        stalled = 0
        while not self.spent() and stalled < 3:
            recs = self.judge_all(self.neighbours(cur, sigma))
            if not recs:
                return
            stalled = stalled + 1 if self.new == 0 else 0  # nothing left to try around any start
            top = max(recs, key=lambda r: r["objective"])
            if top["objective"] > self.done[cur.key()]["objective"]:
                cur = self._as_candidate(top)
                continue
            sigma /= 2
            if sigma < SIGMA_MIN:  # restart at the next method's best (then around the best again)
                at = (at + 1) % len(queue)
                cur = self._as_candidate(queue[at]) if at else self._as_candidate(self.best())
                sigma = SIGMA


def holdout_report(model, tok, updates: list[Update], held: DevData, merged: Update, objective: str,
                   norm: str = "tokens", batch_tokens: int | None = None) -> dict:
    """The chosen merge, each expert alone and the base model on the held-out examples: per task accuracy and
    normalised accuracy, and the objective's value."""
    judge = Judge(model, tok, held, norm, batch_tokens)
    accs = judge.accuracies([None, merged, *updates])
    alone = {t: max(a[t] for a, tt in zip(accs[2:], held.tasks) if tt == t) for t in judge.tasks}
    sizes = {t: len(idx) for t, idx in judge.of_task.items()}
    nrm = normalised(accs[1], alone, sizes)
    return {"n": sizes, "base": accs[0], "alone": alone, "merged": accs[1], "normalised": nrm,
            "objective": objective_of(nrm, objective), "mean": objective_of(nrm, "mean"),
            "worst": objective_of(nrm, "worst")}


def auto_merge(model, tok, updates: list[Update], dev: DevData, *, holdout: float = 0.5, objective: str = "mean",
               budget: Budget = Budget(candidates=64), drop: bool = False, population: int = 16, seed: int = 0,
               trace: str | None = None, forecast=None, score_weights: list[float] | None = None,
               norm: str = "tokens", batch_tokens: int | None = None, device: torch.device = torch.device("cpu"),
               progress=None, **merge_kw) -> Update:
    """Split the examples (``holdout`` of each task held out, drawn with ``seed``), search on the rest, merge the
    best recipe, and judge it on the held-out part. The merged update's metadata holds the recipe (method,
    options, weights, members, the members left out) and both judgements under ``auto``."""
    from .data import holdout_split

    search_dev, held = holdout_split(dev, holdout, seed)
    s = Search(model, tok, updates, search_dev, objective=objective, budget=budget, drop=drop,
               population=population, seed=seed, trace=trace, forecast=forecast, score_weights=score_weights,
               norm=norm, batch_tokens=batch_tokens, device=device, progress=progress)
    best, rec, refs = s.run()
    merged = merge([updates[i] for i in best.members], best.method, s.params(best), device, **merge_kw)
    report = holdout_report(model, tok, updates, held, merged, objective, norm, batch_tokens) if held.examples else None
    merged.meta["auto"] = {
        "recipe": best.recipe(s.names), "pool": s.names,
        "dropped": [n for i, n in enumerate(s.names) if i not in best.members],
        "objective": objective, "judged": len(s.done), "seed": seed,
        "dev": {"n": s.sizes, "base": refs["base"], "alone": refs["alone"], "merged": rec["dev"],
                "normalised": rec["normalised"], "objective": rec["objective"]},
        "holdout": report}
    return merged
