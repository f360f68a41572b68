"""Mergeability scores ("Will it Merge?", eq. 1-2) at the paper's scale, and what explains them.

The score of an update θ_Δ with its data (x, y): in each of N trials, merge it with M partners drawn
without replacement from the pool, apply the merge to the base, evaluate f on θ_Δ's own data;
S = (1/N) Σ_trials f. f is the correctness of the example's multiple-choice answer (example level: an
update trained on one example) or the accuracy on the task's held-out examples (task level).

Trial sharing: instead of one merge per (update, trial), draw N random partitions of the pool into groups
of M+1 (a short last group is topped up with random extra members whose trials are not counted), merge
each group once and evaluate the merge on the data of every counted member. Each update still gets N
trials, and in each its M partners are a uniformly random M-subset of the others (its group is a uniform
draw from a random permutation), at about N·P/(M+1) merges instead of N·P. Groups are merged several at a
time (KnOTS: one batched factorisation), and the merges are evaluated together, several per batch, with
the layers below the adapted ones computed once per example for the whole run. ``independent`` draws the
plain scheme: M partners per (update, trial), one merge each.

The control (beyond the paper): S counts a trial as survived when the merge answers the update's data, whoever
in the merge caused it. In each trial every update's data is also evaluated under one merge that does not hold
it (in the shared plan a group of the same partition drawn at random among those without it: no extra merge;
in the plain scheme and with ``--partners-from`` the trial's M partners merged without it), so ``control`` is
f under merges without the update, with as many trials as S, and ``contribution`` = S − control. ``off_target``:
what the update alone does to the other updates' data (a seeded sample of them).

Everything is drawn from ``seed``: the same inputs and seed give the same plan, and so the same scores.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import evaluate as ev
from .adapters import APPLY_FIX, RowAdapters
from .errors import MergetoolError, UsageError
from .examples import Example
from .methods import Method, Params, effective_params, merge_many
from .model import check_updatable
from .updates import Update, adapter_stats

LEVELS = ("example", "task")
DEFAULTS = {"example": (50, 5), "task": (10, 5)}  # (M, N): the paper's, appendix A.6


@dataclass
class Group:
    """One merge: the pool indices merged, those whose trial counts (evaluated on their data), its trial,
    members evaluated without counting (the partners of ``--partners-from``, whose accuracy is reported), and
    updates not in the merge whose data it is evaluated on for their control trial."""

    members: list[int]
    counted: list[int]
    trial: int
    watched: list[int] = field(default_factory=list)
    control: list[int] = field(default_factory=list)

    def evaluated(self) -> list[int]:
        """Whose data the merge is evaluated on."""
        return self.counted + self.watched + self.control


def plan(n_pool: int, partners: int, trials: int, seed: int, independent: bool = False,
         scored: Sequence[int] | None = None, partner_pool: Sequence[int] | None = None,
         control: bool = False) -> list[Group]:
    """The trial plan: shared partitions (the default) or independent draws. ``scored`` limits whose scores
    are measured and ``partner_pool`` where partners come from (``--partners-from``); either makes the plan
    independent, since partitions need one pool for both. With ``control``, every scored update gets a control
    trial per trial: shared, one group of the same partition without it (uniform among those; none when every
    group of the partition holds it, as a topped-up member), drawn from its own seeded stream so that the
    score's groups are those of a plan without control; independent, a group of the trial's partners alone,
    right after the trial's group."""
    rng = random.Random(seed)
    everyone = list(range(n_pool))
    scored = list(everyone if scored is None else scored)
    partner_pool = list(everyone if partner_pool is None else partner_pool)
    worst = min(len([x for x in partner_pool if x != a]) for a in scored) if scored else 0
    if partners > worst:
        raise MergetoolError("--partners", f"{partners} partners need {partners + 1} adapters to draw from, "
                             f"there are {worst + 1}", "lower --partners or give a larger pool")
    groups: list[Group] = []
    if not independent and scored == everyone and partner_pool == everyone:
        size = partners + 1
        for t in range(trials):
            perm = rng.sample(everyone, n_pool)
            partition = []
            for s in range(0, n_pool, size):
                chunk = perm[s:s + size]
                extra = rng.sample([x for x in everyone if x not in set(chunk)], size - len(chunk))
                partition.append(Group(chunk + extra, list(chunk), t))
            if control:
                pick = random.Random(f"{seed}:control:{t}")
                for a in everyone:
                    without = [g for g in partition if a not in g.members]
                    if without:
                        pick.choice(without).control.append(a)
            groups += partition
        return groups
    watch = partner_pool != everyone
    for a in scored:
        others = [x for x in partner_pool if x != a]
        for t in range(trials):
            chosen = rng.sample(others, partners)
            groups.append(Group([a] + chosen, [a], t, chosen if watch else []))
            if control:
                groups.append(Group(list(chosen), [], t, control=[a]))
    return groups


def match(pool: list[Update], examples: list[Example], level: str) -> list[list[int]]:
    """The examples each adapter is scored on: at example level the example it was trained on (its
    metadata's ``training.example``, else its name, is an example id); at task level its task's examples
    (metadata ``task``, else its name). An adapter that matches nothing is an error that names it."""
    out = []
    by_id = {e.id: i for i, e in enumerate(examples)}
    by_task: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_task.setdefault(e.task, []).append(i)
    for u in pool:
        if level == "example":
            key = (u.meta.get("training") or {}).get("example") or u.meta.get("example") or u.name
            if key not in by_id:
                raise MergetoolError(u.name, f"matches no example id in the data (looked for {key!r})",
                                     "score an adapter trained on one example of DATA, or use --level task")
            out.append([by_id[key]])
        else:
            key = u.meta.get("task") or u.name
            if key not in by_task:
                raise MergetoolError(u.name, f"matches no task in the data (looked for {key!r})",
                                     "give DATA with that task's examples, or name the adapter after its task")
            out.append(by_task[key])
    return out


@dataclass
class Scorer:
    """A resident base model, a pool and its data, and how to merge: runs trial groups and explanations."""

    model: object
    tok: object
    pool: list[Update]
    examples: list[Example]
    data_of: list[list[int]]
    method: Method
    params: Params
    device: torch.device
    norm: str = "tokens"
    batch_tokens: int | None = None
    merge_chunk: int = 8
    level: str = "example"
    off_target: int = 0  # other updates' data each update is evaluated on alone (a seeded sample)
    seed: int = 0
    cache: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=lambda: {"merge": 0.0, "evaluate": 0.0})  # where the time goes
    _base: dict = field(default_factory=dict)  # example index -> the base model's result

    def __post_init__(self) -> None:  # every trial runs updates beside the weights: refused before any is written
        check_updatable(self.model, APPLY_FIX)

    @staticmethod
    def _value(results: list[dict]) -> float:
        return sum(r["correct"] for r in results) / len(results)

    def _evaluate(self, adapters: RowAdapters | None, jobs: list[tuple[int, list[int]]]) -> list[dict[int, dict]]:
        """Each job's results by example index; an example asked for twice (two updates of one task) once."""
        jobs = [(k, sorted(set(idx))) for k, idx in jobs]
        res = ev.evaluate(self.model, self.tok, self.examples, self.norm, batch_tokens=self.batch_tokens,
                          adapters=adapters, jobs=jobs, cache=self.cache)
        return [dict(zip(idx, r)) for (_, idx), r in zip(jobs, res)]

    def _merge(self, groups: list[Group], chunk: list[int]) -> list[Update]:
        """The chunk's merges; a merge that fails (NaN or Inf) is named by its group's adapters."""
        try:
            return merge_many([[self.pool[i] for i in groups[g].members] for g in chunk], self.method, self.params,
                              self.device, names=[f"group-{g}" for g in chunk])
        except MergetoolError as e:
            for g in chunk:  # which group: each merged alone (only on this failing path)
                try:
                    merge_many([[self.pool[i] for i in groups[g].members]], self.method, self.params, self.device)
                except MergetoolError:
                    names = [self.pool[i].name for i in groups[g].members]
                    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
                    raise MergetoolError(f"the merge of {shown}", f"{e.why} (in {e.what})",
                                         "find the adapter that overflows (merge a few of them by hand), "
                                         "or change the method's options") from None
            raise

    def run_groups(self, groups: list[Group], ids: list[int], done: Callable[[int, dict[int, float]], None],
                   progress: Callable[[int], None] | None = None) -> None:
        """Merge and evaluate the groups ``ids``, ``merge_chunk`` at a time; ``done(gid, {update: f})`` as each
        chunk finishes, f the update's correctness or accuracy on its own data under the group's merge, for the
        counted, the watched and the control updates (``Group.evaluated``)."""
        for s in range(0, len(ids), self.merge_chunk):
            chunk = ids[s:s + self.merge_chunk]
            t0 = time.perf_counter()
            merged = self._merge(groups, chunk)
            t1 = time.perf_counter()
            jobs = [(k, [i for a in groups[g].evaluated() for i in self.data_of[a]]) for k, g in enumerate(chunk)]
            with RowAdapters(self.model, merged) as ad:
                res = self._evaluate(ad, jobs)
            del merged
            self.seconds["merge"] += t1 - t0
            self.seconds["evaluate"] += time.perf_counter() - t1
            for k, g in enumerate(chunk):
                done(g, {a: self._value([res[k][i] for i in self.data_of[a]]) for a in groups[g].evaluated()})
            if progress:
                progress(len(chunk))

    def _off_target_sets(self, a: int) -> list[tuple[int, ...]]:
        """The other updates' data ``a`` is evaluated on alone: distinct data sets of other updates, disjoint
        from its own, that the base model gets wrong (example level; at task level every other task), a seeded
        sample of ``off_target`` of them (the same on every worker and resume)."""
        own = set(self.data_of[a])
        sets = sorted({tuple(sorted(d)) for b, d in enumerate(self.data_of) if b != a and not own & set(d)})
        if self.level == "example":
            sets = [d for d in sets if self._value([self._base[i] for i in d]) == 0]
        rng = random.Random(f"{self.seed}:off-target:{a}")
        return rng.sample(sets, min(self.off_target, len(sets)))

    def explain(self, which: list[int], texts: list[str | None]) -> dict[int, dict]:
        """What the paper uses to explain S, per adapter: the base model's p_correct, p_max, gap (Δ_base) and
        rank on its data (means over a task's examples), its accuracy alone (``finetuned``, with the base's
        ``base_accuracy``) and Δ_trained = p_correct(alone) − p_correct(base); its training text's perplexity
        under the base and length in tokens; ‖ΔW‖_F, σ_max(ΔW) and the effective rank (``adapter_stats``).
        With ``off_target`` > 0: ``off_target``, the mean over a sample of other updates' data sets of f alone
        − f of the base (example level: sets the base gets wrong, so the fraction of those questions it answers
        alone; task level: its accuracy change on other tasks), with ``off_target_n`` sets."""
        from .scoring import loglikelihoods

        everyone = range(len(self.data_of)) if self.off_target else which
        missing = sorted({i for a in everyone for i in self.data_of[a]} - set(self._base))
        if missing:
            self._base.update(self._evaluate(None, [(-1, missing)])[0])
        base = self._base
        sets = {a: self._off_target_sets(a) if self.off_target else [] for a in which}
        out: dict[int, dict] = {}
        for s in range(0, len(which), 256):
            part = which[s:s + 256]
            with RowAdapters(self.model, [self.pool[a] for a in part]) as ad:
                alone = self._evaluate(ad, [(k, self.data_of[a] + [i for d in sets[a] for i in d])
                                            for k, a in enumerate(part)])
            for k, a in enumerate(part):
                b = [base[i] for i in self.data_of[a]]
                mine = [alone[k][i] for i in self.data_of[a]]
                mc = [r for r in b if "p_correct" in r]
                rec = {"finetuned": self._value(mine), "base_accuracy": self._value(b)}
                for f in ("p_correct", "p_max", "gap", "rank"):
                    rec[f] = sum(r[f] for r in mc) / len(mc) if mc else None
                trained = [r["p_correct"] for r in mine if "p_correct" in r]
                rec["delta_trained"] = (sum(trained) / len(trained) - rec["p_correct"]) if mc else None
                if self.off_target:
                    shifts = [self._value([alone[k][i] for i in d]) - self._value([base[i] for i in d])
                              for d in sets[a]]
                    rec["off_target"] = sum(shifts) / len(shifts) if shifts else None
                    rec["off_target_n"] = len(shifts)
                out[a] = rec
        have = [a for a, t in zip(which, texts) if t]
        if have:
            pairs = ev.passages(self.tok, [texts[which.index(a)] for a in have])
            for a, (s, n) in zip(have, loglikelihoods(self.model, pairs, self.batch_tokens)):
                out[a].update(perplexity=math.exp(-s / max(n, 1)), length=n)
        for a in which:
            out[a].setdefault("perplexity", None)
            out[a].setdefault("length", None)
            out[a].update(adapter_stats(self.pool[a]))
        return out


def training_text(u: Update, examples: list[Example], data: list[int], level: str,
                  train_pool: list[Example]) -> str | None:
    """The text the adapter was trained on, as far as the data says: at example level the example's passage
    (``text``); at task level the task's ``split: train`` records (text, or prompt + answer), joined."""
    if level == "example":
        t = examples[data[0]].rec.get("text")
        return t if isinstance(t, str) and t else None
    task = examples[data[0]].task
    parts = []
    for e in train_pool:
        if e.task != task:
            continue
        r = e.rec
        if isinstance(r.get("text"), str):
            parts.append(r["text"])
        elif e.kind == "mc":
            parts.append(r["prompt"] + r["choices"][r["answer"]])
        elif e.kind == "gen":
            parts.append(r["prompt"] + (r.get("target") or r["targets"][0]))
    return "\n\n".join(parts) or None


def record(name: str, task: str, level: str, example: str | None, trials: list[tuple[float, int]],
           control: list[tuple[float, int]] | None, partners: int, method: Method, params: Params, seed: int,
           explained: dict, partner_values: list[float] | None = None) -> dict:
    """One score record: the contract fields (adapter, task, score, trials, partners, method, per_trial,
    finetuned, merging_loss, seed), what explains S, and the control. ``trials`` and ``control`` are (f, merge)
    per trial in trial order, ``control`` None without the control; the merges' ids (``trial_merges``,
    ``control_merges``) let the statistics resample merges, the unit the outcomes of a run share."""
    per_trial = [v for v, _ in trials]
    s = sum(per_trial) / len(per_trial)
    ft = explained.get("finetuned")
    loss = (sum((v / ft - 1) * 100 for v in per_trial) / len(per_trial)) if ft else None
    rec = {"adapter": name, "task": task, "level": level, "score": s, "trials": len(per_trial),
           "partners": partners, "method": method.name, "params": effective_params(method, params),
           "per_trial": per_trial, "trial_merges": [g for _, g in trials], "finetuned": ft, "merging_loss": loss,
           "seed": seed}
    if example is not None:
        rec["example"] = example
    ctl = [v for v, _ in control or []]
    rec["control"] = sum(ctl) / len(ctl) if ctl else None
    rec["control_trials"] = len(ctl)
    rec["contribution"] = s - rec["control"] if ctl else None
    rec["control_per_trial"] = ctl
    rec["control_merges"] = [g for _, g in control or []]
    rec.update({k: v for k, v in explained.items() if k != "finetuned"})
    rec.setdefault("off_target", None)
    rec.setdefault("off_target_n", 0)
    if partner_values is not None:
        rec["partner_accuracy"] = sum(partner_values) / len(partner_values) if partner_values else None
    return rec


def check_level(level: str) -> None:
    if level not in LEVELS:
        raise UsageError("--level", f"unknown level {level!r}", "use example or task")
