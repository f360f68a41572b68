"""``mergetool eval``: evaluate a base model, optionally with an adapter applied, on examples JSONL."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
from .common import AllowPickle, BaseModel, Data, Debug, Device, GgufFile, Quiet, pick_device, require_data_and_base
from .app import app, begin

log = logging.getLogger("mergetool")

HELP = """Evaluate a model (and optionally an adapter) on examples; one JSONL record per example on stdout.

Multiple-choice examples (prompt, choices, answer) are scored by the log-probability of each choice
(--norm tokens: mean token log-prob, eq. 4 of "Will it Merge?"; chars: lm-eval's acc_norm; none:
lm-eval's acc), giving logprobs, p_correct, p_max, rank and gap; generation examples (prompt, target or
targets) by exact match of the normalised greedy answer (stopped at a newline) and rouge-L; text-only
examples by perplexity. --summary gives one record per task instead. An adapter is applied beside the
frozen weights (never written into them); several adapters (--adapter repeated, a pool directory, or a
stream of blobs) are evaluated together, several per batch, the layers below the ones they change
computed once per example. With -o FILE, records are written as they are made and --resume skips the
(adapter, id) pairs already there.

\b
Examples:
  mergetool eval --base BASE --summary tasks.jsonl
  mergetool merge --method knots a.safetensors b.safetensors | mergetool eval --base BASE --adapter - --summary tasks.jsonl
  mergetool eval --base BASE --adapter pool/ --summary tasks.jsonl -o pool-eval.jsonl
  mergetool eval --base model.gguf --shots 4 --norm chars qa.jsonl -o records.jsonl --resume
"""

Opt = typer.Option
CHUNK = 256


def _done_ids(path: Path) -> set[tuple]:
    """(adapter, id) pairs already written; a last line cut by a crash is dropped from the file (and redone)."""
    ids = set()
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            path.write_text(text)
        for line in text.splitlines():
            try:
                r = json.loads(line)
                ids.add((r.get("adapter"), r["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut by a crash is redone
    return ids


@app.command("eval", help=HELP, short_help="Evaluate a model or adapter on examples: JSONL records.",
             no_args_is_help=True)
def eval_cmd(
    data: Data = None,
    base: BaseModel = None,
    gguf_file: GgufFile = None,
    adapter: Annotated[Optional[list[str]], Opt("--adapter", help="Adapter(s) to evaluate: a file (one or several "
                                                "blobs), PEFT dir, pool directory, or - for stdin; repeatable.",
                                                metavar="ADAPTER|-", show_default=False)] = None,
    summary: Annotated[bool, Opt("--summary", help="One record per task: n, accuracy, rouge_l, perplexity.")] = False,
    norm: Annotated[str, Opt("--norm", help="Multiple-choice score: tokens (mean token log-prob), chars "
                             "(lm-eval acc_norm) or none (lm-eval acc).", metavar="tokens|chars|none")] = "tokens",
    shots: Annotated[int, Opt("--shots", help="k-shot demonstrations per example (same task, never itself).")] = 0,
    shots_from: Annotated[Optional[str], Opt("--shots-from", help="Pool of demonstrations (default: the records "
                                             "with split=train in DATA).", metavar="FILE")] = None,
    split: Annotated[Optional[str], Opt("--split", help="Evaluate only records of this split (default: all but "
                                        "split=train).")] = None,
    chat: Annotated[bool, Opt("--chat", help="Wrap each prompt in the tokenizer's chat template.")] = False,
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", help="Generation length for exact match.")] = 32,
    batch_tokens: Annotated[int, Opt("--batch-tokens", help="Tokens per scoring batch.")] = 8192,
    seed: Annotated[int, Opt("--seed", help="Seed of the demonstration draw.")] = 0,
    output: Annotated[Optional[str], Opt("-o", "--output", help="Write records here as they are made.",
                                         metavar="FILE")] = None,
    resume: Annotated[bool, Opt("--resume", help="With -o: skip the examples already in FILE.")] = False,
    dtype: Annotated[str, Opt("--dtype", help="Model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16.")]
    = "auto",
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
):
    begin("eval", quiet, debug)
    require_data_and_base("eval", data, base)
    adapters = list(adapter or [])
    if data == "-" and "-" in adapters:
        raise UsageError("-", "stdin is named twice", "read the adapter or the examples from stdin, not both")
    if norm not in ("tokens", "chars", "none"):
        raise UsageError("--norm", f"unknown norm {norm!r}", "use tokens, chars or none")
    if resume and not output:
        raise UsageError("--resume", "needs -o FILE", "write the records to a file to resume them")
    if shots < 0 or max_new_tokens < 1 or batch_tokens < 16:
        raise UsageError("options", "--shots ≥ 0, --max-new-tokens ≥ 1 and --batch-tokens ≥ 16", "fix the values")
    import torch

    from .. import evaluate as ev
    from ..adapters import RowAdapters
    from ..examples import add_contexts, check_examples
    from ..inputs import check_compatible, load_inputs
    from ..io import read_jsonl
    from ..model import fingerprint, load_model, resolve_base

    dev = pick_device(device)
    torch_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, 0)
    if torch_dtype == 0:
        raise UsageError("--dtype", f"unknown dtype {dtype!r}", "use auto, float32 or bfloat16")
    rows = read_jsonl(data)
    examples = check_examples(rows, "<stdin>" if data == "-" else data)
    pool = examples
    if shots_from:
        pool = check_examples(read_jsonl(shots_from), shots_from)
    elif shots:
        pool = [e for e in examples if e.rec.get("split") == "train"]
    examples = [e for e in examples if (e.rec.get("split") == split if split else e.rec.get("split") != "train")]
    if not examples:
        raise MergetoolError(data, "no examples to evaluate after the split filter", "check --split")
    b = resolve_base(base, gguf_file)
    updates = load_inputs(adapters, b, allow_pickle) if adapters else []
    if updates:
        check_compatible(updates, fingerprint(b))
        names = [u.name for u in updates]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise MergetoolError(dup, "two adapters share this name, so their records could not be told apart",
                                 "rename one (metadata 'name') or evaluate them separately")
    names = [u.name for u in updates] or [None]

    out_path = Path(output) if output else None
    rec_path = out_path.with_name(out_path.name + ".records") if (out_path and summary) else out_path
    done = _done_ids(rec_path) if (resume and rec_path) else set()
    todo = [e for e in examples if any((n, e.id) not in done for n in names)]
    model, tok = load_model(b, dev, torch_dtype)
    if shots or chat:
        add_contexts(todo, pool, shots, seed, tok, chat)
    else:
        for e in todo:
            e.context = e.rec.get("prompt", "")
    log.info("%d examples (%d done before) on %s%s", len(examples), len(examples) - len(todo), b.name,
             f" + {len(updates)} adapter{'s' if len(updates) > 1 else ''}" if updates else "")

    fh = None
    if rec_path is not None:
        if rec_path.parent and not rec_path.parent.exists():
            raise MergetoolError(str(rec_path), "its directory does not exist", "create it first")
        fh = open(rec_path, "a" if resume else "w")
    sink = fh if fh is not None else (None if summary else sys.stdout)
    collected: list[dict] = []
    bar = _progress(len(todo) * len(names), quiet)
    which = list(range(len(updates))) or [-1]
    try:
        with RowAdapters(model, updates) as ad:
            for s in range(0, len(todo), CHUNK):
                chunk = todo[s:s + CHUNK]
                results = ev.evaluate(model, tok, chunk, norm, max_new_tokens, batch_tokens, bar, ad, which)
                for n, res in zip(names, results):
                    for e, r in zip(chunk, res):
                        if (n, e.id) in done:
                            continue
                        rec = {"id": e.id, "task": e.task, "adapter": n, **r}
                        if summary:
                            collected.append(rec)
                        if sink is not None:
                            sink.write(json.dumps(rec) + "\n")
                if sink is not None:
                    sink.flush()
    finally:
        bar(None)
        if fh is not None:
            fh.close()
    if summary:
        if rec_path is not None:  # include the records of earlier, resumed runs
            collected = [json.loads(x) for x in rec_path.read_text().splitlines() if x.strip()]
        lines = "".join(json.dumps(s) + "\n" for s in ev.summarise(collected))
        if out_path is not None:
            tmp = out_path.with_name(out_path.name + ".tmp")
            tmp.write_text(lines)
            os.replace(tmp, out_path)
            rec_path.unlink()
        else:
            sys.stdout.write(lines)
            sys.stdout.flush()


def _progress(total: int, quiet: bool):
    """A progress bar of examples done on stderr when it is a terminal (not with --quiet); a no-op otherwise,
    so pipes and logs stay clean."""
    if quiet or not sys.stderr.isatty() or total == 0:
        return lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TextColumn("examples"),
                 TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    task = p.add_task("eval", total=total)
    p.start()

    def step(n):
        if n is None:
            p.stop()
        else:
            p.advance(task, n)

    return step
