"""``mergetool eval``: evaluate a base model, optionally with an adapter applied, on examples JSONL."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .common import (AllowPickle, BaseModel, BatchTokens, Chat, Data, Debug, Device, GgufFile, ModelDtype, Norm, Quiet,
                     Ray, Seed, Shots, ShotsFrom, Unordered, Workers, base_input, model_dtype, pick_device, progress_bar)
from .app import begin, command

log = logging.getLogger("mergetool")

HELP = """Evaluate a model (and optionally an adapter) on examples; one JSONL record per example on stdout.

Multiple-choice examples (prompt, choices, answer) are scored by the log-probability of each choice
(--norm tokens: mean token log-prob, eq. 4 of "Will it Merge?"; chars: lm-eval's acc_norm; none:
lm-eval's acc), giving logprobs, p_correct, p_max, rank and gap; generation examples (prompt, target or
targets) by exact match of the normalised greedy answer (stopped at a newline) and rouge-L; text-only
examples by perplexity. Inputs longer than the model are cut from the left, as lm-eval cuts them.
--summary gives one record per task instead. An adapter is applied beside the
frozen weights (never written into them); several adapters (--adapter repeated, a pool directory, or a
stream of blobs) are evaluated together, several per batch, the layers below the ones they change
computed once per example. With -o FILE, records are written as they are made and --resume skips the
(adapter, id) pairs already there (a file written with other adapters or options is refused).

\b
Examples:
  mergetool eval --base BASE --summary tasks.jsonl
  mergetool merge --method knots a.safetensors b.safetensors | mergetool eval --base BASE --adapter - --summary tasks.jsonl
  mergetool eval --base BASE --adapter pool/ --summary tasks.jsonl -o pool-eval.jsonl
  mergetool eval --base model.gguf --shots 4 --norm chars qa.jsonl -o records.jsonl --resume
"""

Opt = typer.Option


@command("eval", help=HELP, short_help="Evaluate a model or adapter on examples: JSONL records.",
             no_args_is_help=True)
def eval_cmd(
    data: Data = None,
    base: BaseModel = None,
    gguf_file: GgufFile = None,
    adapter: Annotated[Optional[list[str]], Opt("--adapter", help="Adapter(s) to evaluate: a file (one or several "
                                                "blobs), PEFT dir, pool directory, or - for stdin; repeatable.",
                                                metavar="ADAPTER|-", show_default=False)] = None,
    summary: Annotated[bool, Opt("--summary", help="One record per task: n, accuracy, rouge_l, perplexity.")] = False,
    norm: Norm = "tokens",
    shots: Shots = 0,
    shots_from: ShotsFrom = None,
    split: Annotated[Optional[str], Opt("--split", help="Evaluate only records of this split (default: all but "
                                        "split=train).")] = None,
    chat: Chat = False,
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", help="Generation length for exact match.")] = 32,
    batch_tokens: BatchTokens = None,
    seed: Seed("Seed of the demonstration draw.") = 0,
    output: Annotated[Optional[str], Opt("-o", "--output", help="Write records here as they are made.",
                                         metavar="FILE")] = None,
    resume: Annotated[bool, Opt("--resume", help="With -o: skip the examples already in FILE.")] = False,
    dtype: ModelDtype = "auto",
    ray: Ray = None,
    workers: Workers = None,
    unordered: Unordered = False,
    device: Device = "auto",
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
):
    begin("eval", quiet, debug)
    adapters = list(adapter or [])
    _check_options(data, adapters, norm, resume, output, shots, max_new_tokens, batch_tokens)
    torch_dtype = model_dtype(dtype)
    if ray:
        from ..distributed import check_address

        check_address(ray)
    out_path = Path(output) if output and output != "-" else None
    rec_path = out_path.with_name(out_path.name + ".records") if (out_path and summary) else out_path
    from ..outputs import check_output, refuse_destroying_inputs

    for o in {output, rec_path and str(rec_path)} - {None}:
        check_output(o)  # a directory, a missing directory, a closed stdout: refused before anything is read

    from .. import eval_run as er
    from ..inputs import load_inputs
    from ..model import content_digest, fingerprint, load_model, resolve_base

    dev = pick_device(device)
    examples, pool = er.read_examples(data, split, shots, shots_from, seed, chat)
    given = resolve_base(base, gguf_file) if base else None  # a full model's task vector is taken against it
    updates = load_inputs(adapters, given, allow_pickle) if adapters else []
    b = given or resolve_base(base or er.base_of(updates), gguf_file)
    for o in {out_path, rec_path} - {None}:  # before the model loads: no output may destroy what is read
        refuse_destroying_inputs(o, [data, shots_from, *adapters, base_input(b)])
    fp = fingerprint(b)
    er.check_adapters(updates, fp)
    names = [u.name for u in updates] or [None]
    run = er.run_key(f"{fp}:{content_digest(b)}", norm, shots, shots_from, seed, chat, max_new_tokens, split,
                     updates, f"{dtype} {device}", examples, pool)
    done = er.done_ids(rec_path, run) if (resume and rec_path) else set()
    todo = [e for e in examples if any((n, e.id) not in done for n in names)]
    log.info("%d examples (%d done before) on %s%s", len(examples), len(examples) - len(todo), b.name,
             f" + {len(updates)} adapter{'s' if len(updates) > 1 else ''}" if updates else "")
    records = er.Records(rec_path, resume, not summary, names, done, run, summary)
    if todo:
        tok = er.set_contexts(todo, pool, shots, seed, chat, b)
        if not ray:
            model, tok = load_model(b, dev, torch_dtype)
        bar = progress_bar(len(todo) * len(names), quiet, "eval", "examples")
        try:
            if ray:
                er.evaluate_on_ray(ray, workers, unordered, b, gguf_file, fp, device, dtype, todo, updates, run,
                                   norm, max_new_tokens, batch_tokens, records, bar)
            else:
                er.evaluate_here(model, tok, todo, updates, dev, norm, max_new_tokens, batch_tokens, records, bar)
        finally:
            bar(None)
            records.close()
    if summary:
        er.write_summary(records.collected, rec_path, out_path)


def _check_options(data, adapters, norm, resume, output, shots, max_new_tokens, batch_tokens) -> None:
    if data is None:
        raise UsageError("DATA", "no examples given", "pass a JSONL file or -")
    if data == "-" and "-" in adapters:
        raise UsageError("-", "stdin is named twice", "read the adapter or the examples from stdin, not both")
    if norm not in ("tokens", "chars", "none"):
        raise UsageError("--norm", f"unknown norm {norm!r}", "use tokens, chars or none")
    if resume and (not output or output == "-"):
        raise UsageError("--resume", "needs -o FILE (a file, not stdout)", "write the records to a file to resume them")
    if shots < 0 or max_new_tokens < 1 or (batch_tokens is not None and batch_tokens < 16):
        raise UsageError("options", "--shots ≥ 0, --max-new-tokens ≥ 1 and --batch-tokens ≥ 16", "fix the values")
