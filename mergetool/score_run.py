"""A score run around the plan and the scorer (``score.py``): the pool it merges, what its numbers depend on (the
run key), its progress beside the output (``--resume``), and the plan's results gathered into records as they
complete. ``cli/score.py`` parses and checks the options, calls ``run`` and prints the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import MergetoolError, UsageError
from .examples import Example
from .jsonl import record_line
from .methods import Method, Params, effective_params
from .score import Group, match, plan, record, training_text
from .updates import Update


@dataclass
class Pool:
    """The updates a run merges: the scored pool (by name), then the partners of ``--partners-from`` that are not
    in it; the scored ones, where partners come from (None: the pool itself), and each one's data."""

    everyone: list[Update]
    scored: list[int]
    partner_pool: list[int] | None
    data_of: list[list[int]]

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.everyone]


def compose(pool: list[Update], partners: list[Update] | None, examples: list[Example], level: str) -> Pool:
    """The run's updates. Names are what records and resume go by, so two scored updates of one name are refused;
    a partner named as a scored update is that update when its content is the same (the locality experiment
    may draw partners from a set that holds the scored ones) and refused when it differs (it would silently
    be replaced by the pool's)."""
    updates = sorted(pool, key=lambda u: u.name)
    by_name: dict[str, Update] = {}
    for u in updates:
        if u.name in by_name:
            raise MergetoolError(u.name, "two adapters of the pool have this name, so their scores could not be "
                                 "told apart", "pass each adapter once, or rename one (metadata 'name')")
        by_name[u.name] = u
    extra: dict[str, Update] = {}
    for u in partners or []:
        known = by_name.get(u.name) or extra.get(u.name)
        if known is not None:
            if known.digest() != u.digest():
                raise MergetoolError(u.name, "two adapters of this name, with other contents, are in the pool and "
                                     "--partners-from (or twice in --partners-from)",
                                     "rename one (metadata 'name'), or pass each adapter once")
            continue
        extra[u.name] = u
    everyone = updates + [extra[n] for n in sorted(extra)]
    partner_pool = None
    if partners is not None:
        wanted = {u.name for u in partners}
        partner_pool = [i for i, u in enumerate(everyone) if u.name in wanted]
    return Pool(everyone, list(range(len(updates))), partner_pool, match(everyone, examples, level))


def example_digest(e: Example) -> str:
    return hashlib.sha256(json.dumps(e.rec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def run_key(pool: Pool, examples: list[Example], demos: list[Example], method: Method, params: Params,
            base: str, **options) -> str:
    """What a run's numbers depend on: the updates (names, metadata, content digests), the examples and the
    demonstrations (each one's content digest), the method and its effective parameters, the base model's
    fingerprint and weights digest, and every option that changes a number (``options``: level, M, N, seed,
    the plan's scheme, the control, norm, shots, chat, dtype, device). ``--resume`` refuses a file written by a
    run with another key; each record carries it as ``run``."""
    doc = {"adapters": [[u.name, u.meta, u.digest()] for u in pool.everyone],
           "examples": [[e.id, example_digest(e)] for e in examples],
           "demonstrations": [example_digest(e) for e in demos],
           "method": method.name, "params": effective_params(method, params), "base": base,
           "partners_from": pool.partner_pool, **options}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Progress:
    """A run's progress beside its output ``FILE``: ``FILE.trials`` holds the run key, then one line per finished
    merge group and per explained adapter, flushed as they finish; ``FILE`` holds the finished records, each
    with the key (``run``). ``--resume`` reads both, refuses another run's files, drops a last line cut by a
    crash, and finds a finished run (its records, no ``.trials`` file) with nothing left to do.

    An earlier run's output is replaced only when this run succeeds: when ``FILE`` already holds records (of
    another run, or of this one without ``--resume``) the new records go to a temporary file renamed over it at
    the end, so a failed or interrupted rerun leaves them as they were (its progress stays in ``FILE.trials``,
    and ``--resume`` rebuilds its records from there). Stdout, a device or a FIFO (``-o /dev/null``, ``-o
    /proc/self/fd/1``) is written straight and keeps no progress file, so it cannot be resumed."""

    def __init__(self, out: str | None, key: str, resume: bool):
        from .outputs import written_straight

        self.key = key
        self.groups: dict[int, dict[int, float]] = {}
        self.explained: dict[int, dict] = {}
        self.written: dict[str, dict] = {}
        self.finished = False
        self.replace = False  # write the records beside FILE and rename them over it at the end
        self.out = None if out in (None, "-") else out
        self.straight = self.out is not None and written_straight(self.out)
        self.side = Path(self.out + ".trials") if self.out is not None and not self.straight else None
        self._fh = None
        self._logged = 0
        if self.straight and resume:
            raise UsageError("--resume", f"{out} is a device or a FIFO, which keeps no progress to resume from",
                             "write the records to a regular file to resume them")
        if self.side is None:
            return
        out_path = Path(self.out)
        if not resume:
            if self.side.exists() and not self._is_progress(self.side):
                raise MergetoolError(str(self.side), "exists and is not a score progress file, and a run keeps its "
                                     "progress there", "move it away, or write the records elsewhere (-o)")
            self.replace = out_path.exists() and out_path.stat().st_size > 0
            return
        from .jsonl import resume_records

        cuts = []
        ours = False
        if self.side.exists():
            lines, cut = resume_records(self.side, "score")
            cuts.append(cut)
            if not lines or lines[0].get("key") != key:
                raise MergetoolError(str(self.side), "was written by a run with other adapters, data or options",
                                     "resume with the same command, or start afresh without --resume")
            ours = True
            for i, r in enumerate(lines[1:], 2):
                try:
                    if r["kind"] == "group":
                        self.groups[int(r["group"])] = {int(a): float(v) for a, v in r["results"].items()}
                    else:
                        self.explained[int(r["adapter"])] = dict(r["fields"])
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise MergetoolError(f"{self.side}:{i}", "is not a line score wrote", "start afresh without "
                                         "--resume") from None
        if out_path.exists():
            recs, cut = resume_records(out_path, "score")
            for i, r in enumerate(recs, 1):
                if not isinstance(r.get("adapter"), str):
                    raise MergetoolError(f"{out_path}:{i}", "is not a score record (no 'adapter')",
                                         "resume into a file score wrote")
            if all(r.get("run") == key for r in recs):
                cuts.append(cut)
                self.written = {r["adapter"]: r for r in recs}
            elif ours:  # an earlier run's records, kept until this one (whose progress is ours) completes
                self.replace = True
            else:
                raise MergetoolError(str(out_path), "holds records of a run with other adapters, data or options",
                                     "resume with the same command, or start afresh without --resume")
            # a finished run removes its .trials file: its records, all of this run, are complete
            self.finished = bool(self.written) and not ours
        for cut in cuts:  # accepted: lines cut by a crash are dropped (and redone)
            cut()

    @staticmethod
    def _is_progress(path: Path) -> bool:
        """An empty file (a run stopped as it began) or one whose first line is a score plan line."""
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
        if not first.strip():
            return True
        try:
            r = json.loads(first)
        except (ValueError, RecursionError):
            return False
        return isinstance(r, dict) and r.get("kind") == "plan"

    def log(self, obj: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(obj) + "\n")
            self._fh.flush()
            self._logged += 1

    @contextlib.contextmanager
    def sink(self) -> Iterator[Callable[[str], None]]:
        """A function that writes one record line, flushed; the output complete when the block ends without an
        error (the progress file then removed), the progress kept when it does not."""
        from .streams import StdoutText

        if self.out is None:
            out = StdoutText()
            yield lambda line: (out.write(line), out.flush())
            return
        if self.straight:
            fd = os.open(self.out, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                yield lambda line: (fh.write(line), fh.flush())
            return
        fresh = not self.side.exists() or not (self.groups or self.explained)
        made = [p for p in (self.side, Path(self.out)) if not p.exists()]
        self._fh = open(self.side, "w" if fresh else "a")
        self._logged = 0
        try:
            if fresh:
                self.log({"kind": "plan", "key": self.key})
            if self.replace:
                from .outputs import atomic_output

                with atomic_output(self.out) as fh:
                    yield lambda line: (fh.write(line.encode("utf-8")), fh.flush())
            else:
                with open(self.out, "a" if self.written else "w", encoding="utf-8") as fh:
                    yield lambda line: (fh.write(line), fh.flush())
        except BaseException:
            # nothing scored yet (a refusal from the Ray workers, which load the model only now; an interrupt as
            # the run began): the files this run made hold nothing worth resuming, and none is left behind
            if fresh and self._logged <= 1:
                self._fh.close()
                for p in made:
                    if p.exists() and (p == self.side or p.stat().st_size == 0):
                        p.unlink()
            raise
        finally:
            if not self._fh.closed:
                self._fh.close()
            self._fh = None
        self.side.unlink()


class Collector:
    """The results of a plan's groups gathered per scored update: its trials (f and the merge), its control trials,
    its partners' accuracy (``--partners-from``). An update is complete once every group that evaluates it
    (counted or control) has reported."""

    def __init__(self, groups: list[Group], scored: list[int], trials: int):
        self.groups = groups
        self.left = {a: 0 for a in scored}
        for g in groups:
            for a in g.counted + g.control:
                self.left[a] += 1
        self.trials: dict[int, list] = {a: [None] * trials for a in scored}
        self.control: dict[int, list[tuple[int, int, float]]] = {a: [] for a in scored}
        self.watched: dict[int, list[tuple[int, float]]] = {a: [] for a in scored}
        self.seen: set[int] = set()

    def add(self, gid: int, res: dict[int, float]) -> list[int]:
        """Take one group's results; the updates it completes."""
        if gid in self.seen:
            return []
        self.seen.add(gid)
        g = self.groups[gid]
        for a in g.counted:
            self.trials[a][g.trial] = (res[a], gid)
            self.left[a] -= 1
        for a in g.control:
            self.control[a].append((g.trial, gid, res[a]))
            self.left[a] -= 1
        if g.watched:
            self.watched[g.counted[0]].append((gid, sum(res[w] for w in g.watched) / len(g.watched)))
        return [a for a in g.counted + g.control if self.left[a] == 0]

    def complete(self, a: int) -> bool:
        return self.left[a] == 0

    def control_of(self, a: int) -> list[tuple[float, int]]:
        return [(v, gid) for _, gid, v in sorted(self.control[a])]

    def watched_of(self, a: int) -> list[float]:
        return [v for _, v in sorted(self.watched[a])]


@dataclass
class Settings:
    """What a record states about its run besides its results."""

    level: str
    partners: int
    trials: int
    method: Method
    params: Params
    seed: int
    control: bool


def run(scorer, pool: Pool, groups: list[Group], examples: list[Example], train_pool: list[Example],
        settings: Settings, progress: Progress, bar: Callable[[int], Callable]) -> list[dict]:
    """Explain the scored updates not explained before, run the groups not run before (``scorer.run_groups``:
    locally or on Ray), and write each update's record as soon as its every trial has come in, in the order
    they complete. Returns the records of every scored update, in pool order."""
    names = pool.names
    written = progress.written
    need_explain = [a for a in pool.scored if names[a] not in written and a not in progress.explained]
    todo = [g for g in range(len(groups)) if g not in progress.groups]
    level = settings.level
    with progress.sink() as write:
        if need_explain:
            texts = [training_text(pool.everyone[a], examples, pool.data_of[a], level, train_pool)
                     for a in need_explain]
            for a, rec in scorer.explain(need_explain, texts).items():
                progress.explained[a] = rec
                progress.log({"kind": "explain", "adapter": a, "fields": rec})
        coll = Collector(groups, pool.scored, settings.trials)
        for g, res in progress.groups.items():
            coll.add(g, res)

        def emit(a: int) -> None:
            if names[a] in written:
                return
            e = examples[pool.data_of[a][0]]
            rec = record(names[a], e.task, level, e.id if level == "example" else None, coll.trials[a],
                         coll.control_of(a) if settings.control else None, settings.partners, settings.method,
                         settings.params, settings.seed, progress.explained[a],
                         coll.watched_of(a) if pool.partner_pool is not None else None)
            rec["run"] = progress.key  # --resume tells this run's records from another's
            write(record_line(rec, f"adapter {names[a]}"))
            written[names[a]] = rec

        def done(g: int, res: dict[int, float]) -> None:
            progress.groups[g] = res
            progress.log({"kind": "group", "group": g, "results": {str(a): v for a, v in res.items()}})
            for a in coll.add(g, res):
                emit(a)

        for a in pool.scored:
            if coll.complete(a):
                emit(a)
        tick = bar(len(todo))
        try:
            scorer.run_groups(groups, todo, done, tick)
        finally:
            tick(None)
    return [written[names[a]] for a in pool.scored if names[a] in written]


def plan_groups(pool: Pool, partners: int, trials: int, seed: int, independent: bool, control: bool) -> list[Group]:
    """The run's plan (``score.plan``): shared partitions of the pool, or independent draws (``--independent``, and
    always with ``--partners-from``, whose partners come from another set than the scored)."""
    apart = pool.partner_pool is not None
    return plan(len(pool.everyone), partners, trials, seed, independent or apart, pool.scored if apart else None,
                pool.partner_pool, control)


def sizes(level: str, partners: int | None, trials: int | None) -> tuple[int, int]:
    """M partners per merge and N trials per adapter: the level's defaults (the paper's) where not given."""
    from .score import DEFAULTS

    M, N = DEFAULTS[level]
    M = M if partners is None else partners
    N = N if trials is None else trials
    if M < 1 or N < 1:
        raise UsageError("--partners", "--partners and --trials must be at least 1", "pass positive counts")
    return M, N


def read_examples(data: str, shots_from: str | None) -> tuple[list[Example], list[Example], list[Example]]:
    """DATA's examples to score on (all but split=train), its split=train records (demonstrations and training
    text) and the demonstrations (``shots_from``, else those)."""
    from .examples import check_examples
    from .jsonl import read_jsonl

    src = "<stdin>" if data == "-" else data
    everything = check_examples(read_jsonl(data), src)
    examples = [e for e in everything if e.rec.get("split") != "train"]
    train_pool = [e for e in everything if e.rec.get("split") == "train"]
    if not examples:
        raise MergetoolError(src, "has no examples to score on (all are split=train)", "give held-out examples")
    demos = check_examples(read_jsonl(shots_from), shots_from) if shots_from else train_pool
    return examples, train_pool, demos


def load_pool(paths: list[str], partners_from: list[str] | None, base, fp: str, allow_pickle: bool,
              examples: list[Example], level: str) -> Pool:
    """The pool and the partners of ``--partners-from``, read, checked against the base and composed."""
    from .inputs import check_compatible, load_inputs

    updates = load_inputs(list(paths), base, allow_pickle)
    extra = load_inputs(list(partners_from), base, allow_pickle) if partners_from else None
    check_compatible(updates + (extra or []), fp)
    return compose(updates, extra, examples, level)


def scorer(base, fp: str, pool: Pool, examples: list[Example], demos: list[Example], method: Method, params: Params,
           key: str, dev, torch_dtype, *, shots: int, chat: bool, seed: int, norm: str, batch_tokens: int | None,
           merge_chunk: int, level: str, off_target: int, ray: str | None = None, workers: int | None = None,
           unordered: bool = False, base_name: str | None = None, gguf_file: str | None = None,
           device: str = "auto", dtype: str = "auto"):
    """What runs the plan's groups: a ``score.Scorer`` over the model loaded here (in ``torch_dtype``), or the same
    jobs on a Ray cluster (``ray``: its address; --device and --dtype as given), each worker with the model
    resident. Each example's context
    (demonstrations, chat template) is set here, after the tokenizer loads."""
    from .examples import add_contexts
    from .model import load_model, load_tokenizer

    model = None
    if ray:
        tok = load_tokenizer(base) if chat else None
    else:
        model, tok = load_model(base, dev, torch_dtype)
    if shots or chat:
        add_contexts(examples, demos, shots, seed, tok, chat)
    else:
        for e in examples:
            e.context = e.rec.get("prompt", "")
    scoring = dict(norm=norm, batch_tokens=batch_tokens, merge_chunk=merge_chunk, level=level, off_target=off_target,
                   seed=seed)
    if ray:
        from . import distributed as dist

        cluster = dist.connect(ray, workers, base_name, gguf_file, fp, device, dtype if dtype != "auto" else None)
        spec = dist.examples_spec(examples, key, data_of=pool.data_of, method=method.name, params=params, **scoring)
        return dist.RayScorer(cluster, spec, cluster.put_updates(pool.everyone), merge_chunk, not unordered)
    from .score import Scorer

    return Scorer(model, tok, pool.everyone, examples, pool.data_of, method, params, dev, **scoring)
