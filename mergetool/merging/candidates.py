"""Many merged candidates judged on the dev examples in one batched pass each: the per-row engine puts candidate
k on the rows of its job, and the layers below the adapted ones run once per example for all candidates (and
are kept for the whole search). ``auto`` judges candidates by accuracy, ``lorahub`` by the answers' loss."""

from __future__ import annotations

from ..adapters import RowAdapters, fitting_groups
from ..evaluate import evaluate
from ..scoring import choice_loglikelihoods
from ..updates import Update
from .data import DevData, answer_items


class Judge:
    """A resident model and dev examples; ``accuracies`` and ``answer_losses`` of many updates at once."""

    def __init__(self, model, tok, dev: DevData, norm: str = "tokens", batch_tokens: int | None = None):
        self.model, self.tok, self.dev, self.norm, self.batch_tokens = model, tok, dev, norm, batch_tokens
        self.device = next(model.parameters()).device
        self.tasks = list(dict.fromkeys(dev.tasks))
        self.of_task = {t: dev.of[dev.tasks.index(t)] for t in self.tasks}
        self.every = sorted({i for idx in dev.of for i in idx})
        self._cache: dict = {}
        self._answer_cache: dict = {}
        self._answers = None

    def _groups(self, updates: list[Update]):
        for group in fitting_groups(updates, self.device):
            with RowAdapters(self.model, [updates[i] for i in group]) as ad:
                yield group, ad

    def accuracies(self, updates: list[Update | None]) -> list[dict[str, float]]:
        """Each update's accuracy on every task's examples (None: the base model)."""
        out: list[dict[str, float]] = []
        real = [u for u in updates if u is not None]
        results: dict[int, list[dict]] = {}
        if len(real) < len(updates):
            results[-1] = evaluate(self.model, self.tok, self.dev.examples, self.norm, batch_tokens=self.batch_tokens,
                                   jobs=[(-1, self.every)], cache=self._cache)[0]
        at = 0
        for group, ad in self._groups(real):
            res = evaluate(self.model, self.tok, self.dev.examples, self.norm, batch_tokens=self.batch_tokens,
                           adapters=ad, jobs=[(k, self.every) for k in range(len(group))], cache=self._cache)
            for k, r in enumerate(res):
                results[at + k] = r
            at += len(group)
        k = 0
        for u in updates:
            recs = results[-1] if u is None else results[k]
            k += u is not None
            correct = dict(zip(self.every, (r["correct"] for r in recs)))
            out.append({t: sum(correct[i] for i in idx) / len(idx) for t, idx in self.of_task.items()})
        return out

    def answer_losses(self, updates: list[Update]) -> list[float]:
        """Each update's mean cross-entropy over all the answer tokens of the dev examples (what a causal LM's
        loss is on one batch of them), as LoraHub's search minimises."""
        if self._answers is None:
            self._answers = answer_items(self.tok, self.dev.examples)
        out: list[float] = []
        for group, ad in self._groups(updates):
            lls = choice_loglikelihoods(self.model, self._answers, [(k, self.every) for k in range(len(group))], ad,
                                        self.batch_tokens, cache=self._answer_cache)
            for per in lls:
                s = sum(x[0][0] for x in per)
                n = sum(x[0][1] for x in per)
                out.append(-s / max(n, 1))
        return out
