"""The dev examples a data-aware merge reads: each adapter's task's examples (matched by metadata ``task``, else
the adapter's name, as ``score`` matches at task level), checked, and split into the part a search sees and
the part it is judged on."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import MergetoolError
from ..examples import Example
from ..scoring import Item, encode_choices
from ..score import match
from ..updates import Update

MIN_EXAMPLES = 2  # per task: one example is no estimate of a task (nor of its Gram, Fisher or accuracy)


@dataclass
class DevData:
    """Examples, and per adapter the indices of its task's examples and the task's name."""

    examples: list[Example]
    of: list[list[int]]
    tasks: list[str]

    def subset(self, keep: set[int]) -> "DevData":
        """The same adapters on the examples in ``keep`` only (indices renumbered)."""
        order = sorted(keep)
        new = {old: k for k, old in enumerate(order)}
        return DevData([self.examples[i] for i in order], [[new[i] for i in idx if i in new] for idx in self.of],
                       self.tasks)


def dev_data(updates: list[Update], examples: list[Example], method: str, kinds=("mc", "gen", "ppl"),
             minimum: int = MIN_EXAMPLES, matched: bool = True) -> DevData:
    """Each adapter's task's examples; an adapter whose task has no examples, a task with fewer than ``minimum``
    examples, or examples of a kind the method cannot use are errors that name them. Not ``matched`` (LoraHub,
    which composes adapters for a task none of them was trained on): every adapter reads all the examples, as one
    task named after the tasks they hold."""
    if matched:
        of = match(updates, examples, "task")
        tasks = [examples[idx[0]].task for idx in of]
    else:
        of = [list(range(len(examples)))] * len(updates)
        tasks = [",".join(dict.fromkeys(e.task for e in examples))] * len(updates)
    for u, idx, task in zip(updates, of, tasks):
        if len(idx) < minimum:
            raise MergetoolError(u.name, f"task {task!r} has {len(idx)} dev example{'s' * (len(idx) != 1)}; "
                                 f"{method} needs at least {minimum} per task", "give more examples of that task")
        bad = next((examples[i] for i in idx if examples[i].kind not in kinds), None)
        if bad is not None:
            what = {"mc": "multiple choice", "gen": "generation", "ppl": "passage (text only)"}[bad.kind]
            raise MergetoolError(bad.id, f"is a {what} example, which {method} cannot use",
                                 "give multiple-choice" + (" or generation" if "gen" in kinds else "") + " examples")
    return DevData(examples, of, tasks)


def holdout_split(dev: DevData, fraction: float, seed: int) -> tuple[DevData, DevData]:
    """(search, held out): per task, ``fraction`` of its examples (rounded, drawn with ``seed``) held out; each side
    keeps at least ``MIN_EXAMPLES`` search examples and one held-out example (when ``fraction`` > 0)."""
    search: set[int] = set()
    held: set[int] = set()
    for task in dict.fromkeys(dev.tasks):
        idx = sorted(dev.of[dev.tasks.index(task)], key=lambda i: dev.examples[i].id)
        random.Random(f"{seed}:{task}").shuffle(idx)
        k = round(fraction * len(idx))
        k = max(k, 1) if fraction > 0 else 0
        if len(idx) - k < MIN_EXAMPLES:
            raise MergetoolError(task, f"{len(idx)} examples leave {len(idx) - k} to search on after --holdout "
                                 f"{fraction}; the search needs at least {MIN_EXAMPLES} per task",
                                 "give more examples of that task, or a smaller --holdout")
        held.update(idx[:k])
        search.update(idx[k:])
    return dev.subset(search), dev.subset(held)


def answer_text(e: Example) -> str:
    """What the model is trained to produce for an example: the right choice, the target, or the passage."""
    r = e.rec
    if e.kind == "mc":
        return r["choices"][r["answer"]]
    if e.kind == "gen":
        return r.get("target") if isinstance(r.get("target"), str) else r["targets"][0]
    return r["text"]


def answer_items(tok, examples: list[Example]) -> list[Item]:
    """(context tokens, [answer tokens]) per example, split as lm-eval splits a continuation (a passage is
    conditioned on the prefix token)."""
    return encode_choices(tok, [(e.context if e.kind != "ppl" else "", [answer_text(e)]) for e in examples])


def sequence_items(tok, examples: list[Example]) -> list[Item]:
    """Each example's whole sequence (context and answer) as one item with no choices: what the model reads when
    it was trained on the example."""
    return [(ctx + cont[0], []) for ctx, cont in answer_items(tok, examples)]
