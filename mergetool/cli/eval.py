"""``mergetool eval``: evaluate a base model, optionally with an adapter applied, on examples JSONL."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import MergetoolError, UsageError
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
FIRST_CHUNK, MAX_CHUNK, FLUSH_SECONDS = 32, 1024, 3.0
RAY_CHUNK = 256  # examples per Ray job


def _eval_on_ray(dist, address, workers, unordered, b, gguf_file, fp, device, dtype, todo, updates, run, norm,
                 max_new_tokens, batch_tokens, write, bar) -> None:
    """The same evaluation on a Ray cluster: jobs of (a chunk of examples, a share of the adapters), each worker
    with the model resident; a chunk's records are written, example by example, once all its shares are in."""
    cluster = dist.connect(address, workers, b.name, gguf_file, fp, device, dtype if dtype != "auto" else None)
    spec = dist.examples_spec(todo, run, norm=norm, max_new_tokens=max_new_tokens, batch_tokens=batch_tokens)
    ref = cluster.put_updates(updates) if updates else []
    n = len(updates)
    per = max(1, -(-n // (2 * len(cluster.actors)))) if n else 1
    shares = [list(range(s, min(n, s + per))) for s in range(0, n, per)] or [[]]
    chunks = [list(range(s, min(len(todo), s + RAY_CHUNK))) for s in range(0, len(todo), RAY_CHUNK)]
    jobs = [(spec, ref, share, ids) for ids in chunks for share in shares]
    got: dict[int, list] = {}

    def deliver(j, res):
        c = j // len(shares)
        got.setdefault(c, [None] * len(shares))[j % len(shares)] = res
        if all(x is not None for x in got[c]):
            write([todo[i] for i in chunks[c]], [r for part in got.pop(c) for r in part])
            bar(len(chunks[c]) * max(n, 1))

    cluster.run("evaluate", jobs, deliver, not unordered)


def _done_ids(path: Path, run: str) -> set[tuple]:
    """(adapter, id) pairs already written by a run of the same base and options (``run``); a last line cut by a
    crash is dropped from the file (and redone); records of another run are refused, never mixed."""
    from ..jsonl import resume_records

    ids = set()
    if path.exists():
        recs, cut = resume_records(path, "eval")
        for i, r in enumerate(recs, 1):
            if not isinstance(r.get("id"), str) or not isinstance(r.get("adapter"), (str, type(None))):
                raise MergetoolError(f"{path}:{i}", "is not an eval record (no 'id')", "resume into a file eval wrote")
            key = (r.get("adapter"), r["id"])
            if r.get("run") != run:
                raise MergetoolError(str(path), "was written by eval with another base model, other adapters "
                                     "(or other contents under their names) or other options (--norm, --shots, "
                                     "--seed, --chat, --split, --max-new-tokens)",
                                     "resume with the same adapters and options, or write to a new file")
            ids.add(key)
        cut()  # accepted: a last line cut by a crash is dropped (and redone)
    return ids


def _run_key(fp, norm, shots, shots_from, seed, chat, max_new_tokens, split, updates=()) -> str:
    """What an eval record depends on besides its example: the base, the options, and the adapters (their names
    and contents, so a file written for adapter A is not continued with B, nor with A retrained). Records with
    different keys never mix."""
    import hashlib

    doc = [fp, norm, shots, shots_from, seed, chat, max_new_tokens, split]
    if updates:
        doc.append(sorted([u.name, u.digest()] for u in updates))
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:12]


def _base_of(updates) -> str:
    """The base model named by the adapters' metadata, when --base is not given."""
    bases = {u.meta.get("base_model") for u in updates if u.meta.get("base_model")}
    if len(bases) == 1:
        return bases.pop()
    why = "the adapters name different base models" if bases else "no adapter names its base model"
    raise UsageError("--base", f"eval needs the base model; {why}", "pass --base MODEL")


class _Sink:
    """Where records go: a file opened only when the first record is ready (a run that fails before leaves no
    empty file), stdout, or nowhere (--summary to stdout collects them)."""

    def __init__(self, path: Path | None, append: bool, stdout):
        self.path, self.mode, self.fh, self.stdout = path, "a" if append else "w", None, stdout

    def write(self, text: str) -> None:
        if self.path is not None:
            if self.fh is None:
                self.fh = open(self.path, self.mode)
            self.fh.write(text)
        elif self.stdout is not None:
            self.stdout.write(text)

    def flush(self) -> None:
        target = self.fh if self.path is not None else self.stdout
        if target is not None:
            target.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


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
    if data is None:
        raise UsageError("DATA", "no examples given", "pass a JSONL file or -")
    adapters = list(adapter or [])
    if data == "-" and "-" in adapters:
        raise UsageError("-", "stdin is named twice", "read the adapter or the examples from stdin, not both")
    if norm not in ("tokens", "chars", "none"):
        raise UsageError("--norm", f"unknown norm {norm!r}", "use tokens, chars or none")
    if resume and (not output or output == "-"):
        raise UsageError("--resume", "needs -o FILE (a file, not stdout)", "write the records to a file to resume them")
    if shots < 0 or max_new_tokens < 1 or (batch_tokens is not None and batch_tokens < 16):
        raise UsageError("options", "--shots ≥ 0, --max-new-tokens ≥ 1 and --batch-tokens ≥ 16", "fix the values")
    torch_dtype = model_dtype(dtype)
    if ray:
        from ..distributed import check_address

        check_address(ray)
    out_path = Path(output) if output and output != "-" else None
    rec_path = out_path.with_name(out_path.name + ".records") if (out_path and summary) else out_path
    from ..outputs import check_output, refuse_destroying_inputs

    for o in {output, rec_path and str(rec_path)} - {None}:
        check_output(o)  # a directory, a missing directory, a closed stdout: refused before anything is read

    from .. import evaluate as ev
    from ..adapters import RowAdapters, fitting_groups
    from ..examples import add_contexts, check_examples
    from ..inputs import check_compatible, check_unique_names, load_inputs
    from ..jsonl import read_jsonl, record_line
    from ..model import content_digest, fingerprint, load_model, resolve_base

    dev = pick_device(device)
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
    if shots and not chat:  # demonstrations are drawn (and their count checked) before the model loads
        add_contexts(examples, pool, shots, seed)
    updates = load_inputs(adapters, None, allow_pickle) if adapters else []
    if not base:
        base = _base_of(updates)
    b = resolve_base(base, gguf_file)
    for o in {out_path, rec_path} - {None}:  # before the model loads: no output may destroy what is read
        refuse_destroying_inputs(o, [data, shots_from, *adapters, base_input(b)])
    fp = fingerprint(b)
    if updates:
        check_compatible(updates, fp)
        check_unique_names(updates, "their records could not be told apart")
    names = [u.name for u in updates] or [None]
    run = _run_key(f"{fp}:{content_digest(b)}", norm, shots, shots_from, seed, chat, max_new_tokens, split, updates)

    done = _done_ids(rec_path, run) if (resume and rec_path) else set()
    todo = [e for e in examples if any((n, e.id) not in done for n in names)]
    log.info("%d examples (%d done before) on %s%s", len(examples), len(examples) - len(todo), b.name,
             f" + {len(updates)} adapter{'s' if len(updates) > 1 else ''}" if updates else "")
    collected: list[dict] = []
    if todo:
        ray_mode = bool(ray)
        if ray_mode:
            from .. import distributed as dist
            from ..model import load_tokenizer

            model, tok = None, (load_tokenizer(b) if chat else None)
        else:
            model, tok = load_model(b, dev, torch_dtype)
        if chat:
            add_contexts(todo, pool, shots, seed, tok, chat)
        elif not shots:
            for e in todo:
                e.context = e.rec.get("prompt", "")
        from ..streams import StdoutText

        sink = _Sink(rec_path, resume, None if summary else StdoutText())
        bar = progress_bar(len(todo) * len(names), quiet, "eval", "examples")

        def write(chunk, results):  # example by example, every adapter's record: the order chunks cannot change
            for k, e in enumerate(chunk):
                for n, res in zip(names, results):
                    if (n, e.id) in done:
                        continue
                    rec = {"id": e.id, "task": e.task, "adapter": n, **res[k], "run": run}
                    line = record_line(rec, f"adapter {n}, example {e.id}" if n else f"example {e.id}")
                    if summary:
                        collected.append(rec)
                    sink.write(line)
            sink.flush()

        try:
            if ray_mode:
                _eval_on_ray(dist, ray, workers, unordered, b, gguf_file, fp, device, dtype, todo, updates, run,
                             norm, max_new_tokens, batch_tokens, write, bar)
            else:
                # the adapters in groups that fit the device (usually one group, applied once for the whole run)
                groups = fitting_groups(updates, dev) if updates else [[]]
                with contextlib.ExitStack() as held:
                    resident = held.enter_context(RowAdapters(model, updates)) if len(groups) == 1 else None
                    s, size = 0, FIRST_CHUNK
                    while s < len(todo):
                        chunk = todo[s:s + size]
                        t0 = time.monotonic()
                        results = []
                        for group in groups:
                            with (contextlib.nullcontext(resident) if resident is not None else
                                  RowAdapters(model, [updates[i] for i in group])) as ad:
                                results += ev.evaluate(model, tok, chunk, norm, max_new_tokens, batch_tokens, bar, ad,
                                                       [(k, range(len(chunk))) for k in (range(len(group)) or [-1])])
                        write(chunk, results)
                        s += len(chunk)
                        # records reach the disk every few seconds: a crash loses seconds of work, not the run
                        size = max(8, min(MAX_CHUNK, int(len(chunk) * FLUSH_SECONDS / max(time.monotonic() - t0, 1e-3))))
        finally:
            bar(None)
            sink.close()
    if summary:
        if rec_path is not None:  # include the records of earlier, resumed runs
            collected = [json.loads(x) for x in rec_path.read_text().splitlines() if x.strip()]
        lines = "".join(record_line(s, f"the summary of task {s.get('task')}") for s in ev.summarise(collected))
        if out_path is not None:
            from ..outputs import atomic_output

            with atomic_output(str(out_path)) as fh:
                fh.write(lines.encode())
            rec_path.unlink()
        else:
            from ..streams import write_stdout

            write_stdout(lines)
