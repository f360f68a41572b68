"""The examples JSONL schema (validated, with the line of each error) and few-shot contexts.

One object per line: ``id`` (unique string), ``task`` (groups examples; default ``default``), and one of:
multiple choice (``prompt``, ``choices``, ``answer``: an index), generation (``prompt``, ``target`` or
``targets``), or a passage (``text``, scored by perplexity). ``text`` beside a question is the passage a
per-example expert trains on; ``split`` (train/dev/test) marks demonstrations. Unknown fields are kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import MergetoolError



@dataclass
class Example:
    id: str
    task: str
    kind: str  # "mc", "gen" or "ppl"
    rec: dict
    context: str = ""  # few-shot prefix + prompt (after the chat template, if any)


def check_examples(rows: list[dict], src: str) -> list[Example]:
    """Validate examples JSONL (the schema above); each error names its line. An empty multiple-choice or
    generation prompt is allowed (lm-eval conditions on BOS), and so is an empty target string; empty choices,
    an empty ``targets`` list and an empty ``text`` are refused. Lone surrogates and over-long lines are
    refused by ``jsonl.read_jsonl`` already."""
    seen: set[str] = set()
    out = []
    for i, r in enumerate(rows, 1):
        where = f"{src}:{i}"
        rid = r.get("id")
        if not isinstance(rid, str) or not rid:
            raise MergetoolError(where, "missing field 'id' (a non-empty string)", "give every example a unique id")
        if rid in seen:
            raise MergetoolError(where, f"duplicate id {rid!r}", "ids must be unique")
        seen.add(rid)
        task = r.get("task", "default")
        if not isinstance(task, str):
            raise MergetoolError(where, "'task' must be a string", "name the task")
        if "choices" in r:
            ch, ans = r.get("choices"), r.get("answer")
            if not isinstance(r.get("prompt"), str):
                raise MergetoolError(where, "missing field 'prompt'", "multiple choice needs prompt, choices, answer")
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                raise MergetoolError(where, "'choices' must be a list of at least 2 non-empty strings",
                                     "fix the choices")
            if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(ch):
                raise MergetoolError(where, f"'answer' must be an index into choices (0..{len(ch) - 1})",
                                     "fix the answer")
            kind = "mc"
        elif "target" in r or "targets" in r:
            if not isinstance(r.get("prompt"), str) or ("target" in r and not isinstance(r["target"], str)):
                raise MergetoolError(where, "generation needs 'prompt' and 'target' (or 'targets', a list)",
                                     "fix the record")
            if "targets" in r:
                t = r["targets"]
                if not isinstance(t, list) or not t or not all(isinstance(x, str) for x in t):
                    raise MergetoolError(where, "'targets' must be a non-empty list of strings",
                                         "give at least one reference answer")
            kind = "gen"
        elif "text" in r:
            kind = "ppl"
        else:
            raise MergetoolError(where, "no 'choices', 'target(s)' or 'text' to evaluate",
                                 "see the examples format in the README")
        if "text" in r and (not isinstance(r["text"], str) or not r["text"]):
            raise MergetoolError(where, "'text' must be a non-empty string",
                                 "give the passage, or leave the field out")
        out.append(Example(rid, task, kind, r))
    return out


def add_contexts(examples: list[Example], pool: list[Example], shots: int, seed: int, tok=None, chat=False) -> None:
    """Few-shot prefix from ``pool`` (same task, never the example itself), drawn deterministically per
    example; optionally the chat template around the whole prompt (a tokenizer without one, or a template that
    fails on a prompt, is one error line, before any example is evaluated)."""
    if chat and not getattr(tok, "chat_template", None):
        raise MergetoolError("--chat", "the base model's tokenizer has no chat template",
                             "drop --chat, or use a base with a chat template (chat_template.jinja, or "
                             "'chat_template' in tokenizer_config.json)")
    by_task: dict[str, list[Example]] = {}
    for p in pool:
        if p.kind in ("mc", "gen"):
            by_task.setdefault(p.task, []).append(p)
    for e in examples:
        if e.kind == "ppl":
            continue
        prefix = ""
        if shots:
            cands = [p for p in by_task.get(e.task, []) if p.id != e.id]
            if len(cands) < shots:
                raise MergetoolError(e.id, f"only {len(cands)} demonstrations for task {e.task!r}, {shots} asked",
                                     "lower --shots or give a larger --shots-from pool")
            rng = random.Random(f"{seed}:{e.id}")
            for d in rng.sample(cands, shots):
                ans = d.rec["choices"][d.rec["answer"]] if d.kind == "mc" else d.rec.get("target", d.rec.get("targets", [""])[0])
                prefix += d.rec["prompt"] + ans + "\n\n"
        text = prefix + e.rec["prompt"]
        if chat:
            try:
                text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                               add_generation_prompt=True)
            except Exception as err:  # jinja's TemplateError (a template's raise_exception), a ValueError, ...
                why = (str(err).splitlines() or [""])[0][:120]
                raise MergetoolError(f"--chat: example {e.id}", f"the chat template fails on it "
                                     f"({err.__class__.__name__}: {why})",
                                     "drop --chat, or fix the tokenizer's chat template") from None
        e.context = text
