"""An eval run around the engine (``evaluate.py``): the examples it reads (the split, the demonstrations), what its
records depend on (the run key), the records a file already holds (``--resume``), and the examples evaluated
chunk by chunk, in one process or on a Ray cluster, into records written as they are made. ``cli/eval.py``
parses and checks the options, calls these and writes the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path
from collections.abc import Callable

from .errors import MergetoolError, UsageError
from .examples import Example, add_contexts, check_examples
from .jsonl import read_jsonl, record_line
from .updates import Update

FIRST_CHUNK, MAX_CHUNK, FLUSH_SECONDS = 32, 1024, 3.0
RAY_CHUNK = 256  # examples per Ray job


def read_examples(data: str, split: str | None, shots: int, shots_from: str | None, seed: int,
                  chat: bool) -> tuple[list[Example], list[Example]]:
    """The examples to evaluate (those of ``split``; by default all but split=train) and the pool of
    demonstrations (``shots_from``, else DATA's split=train records). Without --chat the demonstrations are
    drawn (and their count checked) here, before the model loads."""
    examples = check_examples(read_jsonl(data), "<stdin>" if data == "-" else data)
    pool = examples
    if shots_from:
        pool = check_examples(read_jsonl(shots_from), shots_from)
    elif shots:
        pool = [e for e in examples if e.rec.get("split") == "train"]
    examples = [e for e in examples if (e.rec.get("split") == split if split else e.rec.get("split") != "train")]
    if not examples:
        raise MergetoolError(data, "no examples to evaluate after the split filter", "check --split")
    if shots and not chat:
        add_contexts(examples, pool, shots, seed)
    return examples, pool


def base_of(updates: list[Update]) -> str:
    """The base model named by the adapters' metadata, when --base is not given."""
    bases = {u.meta.get("base_model") for u in updates if u.meta.get("base_model")}
    if len(bases) == 1:
        return bases.pop()
    why = "the adapters name different base models" if bases else "no adapter names its base model"
    raise UsageError("--base", f"eval needs the base model; {why}", "pass --base MODEL")


def check_adapters(updates: list[Update], fp: str) -> None:
    """The adapters fit the base (``fp``: its fingerprint), and their names tell their records apart."""
    from .inputs import check_compatible, check_unique_names

    if updates:
        check_compatible(updates, fp)
        check_unique_names(updates, "their records could not be told apart")


def run_key(fp, norm, shots, shots_from, seed, chat, max_new_tokens, split, updates=(), dtype="auto auto",
            examples=(), demos=()) -> str:
    """What an eval record depends on: the base, every option that changes a number (``dtype``: --dtype and
    --device as given, the same for a run on Ray and in one process), the adapters (their names and contents,
    so a file written for adapter A is not continued with B, nor with A retrained), and the examples' contents
    and the demonstrations drawn from (so data edited under the same ids is not continued either). Records with
    different keys never mix."""
    doc = [fp, norm, shots, shots_from, seed, chat, max_new_tokens, split, dtype]
    if updates:
        doc.append(sorted([u.name, u.digest()] for u in updates))
    data = hashlib.sha256()
    for part in (examples, demos if shots else ()):
        data.update(json.dumps(sorted(json.dumps(e.rec, sort_keys=True) for e in part)).encode())
    doc.append(data.hexdigest())
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:12]


def done_ids(path: Path, run: str) -> set[tuple]:
    """(adapter, id) pairs already written by a run of the same base and options (``run``); a last line cut by a
    crash is dropped from the file (and redone); records of another run are refused, never mixed."""
    from .jsonl import resume_records

    ids = set()
    if path.exists():
        recs, cut = resume_records(path, "eval")
        for i, r in enumerate(recs, 1):
            if not isinstance(r.get("id"), str) or not isinstance(r.get("adapter"), (str, type(None))):
                raise MergetoolError(f"{path}:{i}", "is not an eval record (no 'id')", "resume into a file eval wrote")
            key = (r.get("adapter"), r["id"])
            if r.get("run") != run:
                raise MergetoolError(str(path), "was written by eval with another base model, other adapters "
                                     "(or other contents under their names), other examples (or other contents "
                                     "under their ids) or other options (--norm, --shots, --seed, --chat, --split, "
                                     "--max-new-tokens, --dtype, --device)",
                                     "resume with the same adapters and options, or write to a new file")
            ids.add(key)
        cut()  # accepted: a last line cut by a crash is dropped (and redone)
    return ids


def set_contexts(todo: list[Example], pool: list[Example], shots: int, seed: int, chat: bool, base):
    """Each example's context: with --chat the tokenizer's template (applied, or refused in one line, before the
    model loads; the tokenizer is returned), else its prompt when no demonstrations were drawn."""
    if chat:
        from .model import load_tokenizer

        tok = load_tokenizer(base)
        add_contexts(todo, pool, shots, seed, tok, chat)
        return tok
    if not shots:
        for e in todo:
            e.context = e.rec.get("prompt", "")
    return None


class Records:
    """Where records go, example by example and every adapter's record for each (the order chunks cannot
    change), the pairs already ``done`` skipped: a file opened only when the first record is ready (a run that
    fails before leaves no empty file), stdout, or nowhere; with ``collect`` they are kept for a summary too."""

    def __init__(self, path: Path | None, append: bool, stdout: bool, names: list, done: set, run: str,
                 collect: bool):
        from .streams import StdoutText

        self.path, self.mode, self.fh = path, "a" if append else "w", None
        self.stdout = StdoutText() if stdout else None
        self.names, self.done, self.run = names, done, run
        self.collected: list[dict] | None = [] if collect else None

    def __call__(self, chunk: list[Example], results: list[list[dict]]) -> None:
        for k, e in enumerate(chunk):
            for n, res in zip(self.names, results):
                if (n, e.id) in self.done:
                    continue
                rec = {"id": e.id, "task": e.task, "adapter": n, **res[k], "run": self.run}
                line = record_line(rec, f"adapter {n}, example {e.id}" if n else f"example {e.id}")
                if self.collected is not None:
                    self.collected.append(rec)
                self._write(line)
        target = self.fh if self.path is not None else self.stdout
        if target is not None:
            target.flush()

    def _write(self, text: str) -> None:
        if self.path is not None:
            if self.fh is None:
                self.fh = open(self.path, self.mode)
            self.fh.write(text)
        elif self.stdout is not None:
            self.stdout.write(text)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()


def evaluate_here(model, tok, todo: list[Example], updates: list[Update], dev, norm: str, max_new_tokens: int,
                  batch_tokens: int | None, write: Callable, bar: Callable) -> None:
    """Evaluate ``todo`` in this process, under every update (or the base alone), in chunks sized so records
    reach ``write`` every few seconds: a crash loses seconds of work, not the run. The adapters go in groups
    that fit the device (usually one group, applied once for the whole run). The first chunk holds FIRST_CHUNK
    (example, adapter) pairs, at least one example: 200 merged adapters on one CPU spend ~7 s on one example, so
    a first chunk of 32 examples would hold the first records back for minutes; later chunks are sized by the
    time the last one took."""
    from .adapters import RowAdapters, fitting_groups
    from .evaluate import evaluate

    groups = fitting_groups(updates, dev) if updates else [[]]
    with contextlib.ExitStack() as held:
        resident = held.enter_context(RowAdapters(model, updates)) if len(groups) == 1 else None
        s, size = 0, max(1, FIRST_CHUNK // max(1, len(updates)))
        while s < len(todo):
            chunk = todo[s:s + size]
            t0 = time.monotonic()
            results = []
            for group in groups:
                with (contextlib.nullcontext(resident) if resident is not None else
                      RowAdapters(model, [updates[i] for i in group])) as ad:
                    results += evaluate(model, tok, chunk, norm, max_new_tokens, batch_tokens, bar, ad,
                                        [(k, range(len(chunk))) for k in (range(len(group)) or [-1])])
            write(chunk, results)
            s += len(chunk)
            size = max(1, min(MAX_CHUNK, int(len(chunk) * FLUSH_SECONDS / max(time.monotonic() - t0, 1e-3))))


def evaluate_on_ray(address, workers, unordered, b, gguf_file, fp, device, dtype, todo, updates, run, norm,
                    max_new_tokens, batch_tokens, write, bar) -> None:
    """The same evaluation on a Ray cluster: jobs of (a chunk of examples, a share of the adapters), each worker
    with the model resident; a chunk's records are written, example by example, once all its shares are in."""
    from . import distributed as dist

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


def write_summary(collected: list[dict] | None, rec_path: Path | None, out_path: Path | None) -> None:
    """One JSONL line per task (``evaluate.summarise``) of this run's records, or of every record in ``rec_path``
    (those of earlier, resumed runs included, which is then removed), to ``out_path`` (atomically) or stdout."""
    from .evaluate import summarise

    if rec_path is not None:
        collected = [json.loads(x) for x in rec_path.read_text().splitlines() if x.strip()]
    lines = "".join(record_line(s, f"the summary of task {s.get('task')}") for s in summarise(collected or []))
    if out_path is not None:
        from .outputs import atomic_output

        with atomic_output(str(out_path)) as fh:
            fh.write(lines.encode())
        rec_path.unlink()
    else:
        from .streams import write_stdout

        write_stdout(lines)
