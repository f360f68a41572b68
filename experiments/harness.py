"""The machinery of the experiments: stages, the mergetool calls they make, their records and manifest.

A stage is a function of a ``Run`` registered with ``@stage(name, needs=...)``. It reads what earlier stages
left in the cache (weights, raw eval records: ``--cache``, never committed) and writes small JSONL records
into ``experiments/records/`` (committed) through ``run.write_records``. Every stage is resumable: the
mergetool commands it calls resume themselves (``train-expert --resume``, ``eval -o --resume``), and a stage
skips the items whose outputs exist. When a stage ends, the manifest (``records/manifest.json``) gets its
entry: the git revision, the machine, the start, the seconds it ran, the command lines (paths under the
cache written as ``$CACHE``), the SHA-256 of the files it read or made (what the stage function returns)
and of its records. A finished stage is not rerun unless one of those files changed or ``--redo`` names it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "experiments" / "records"


@dataclass
class Stage:
    name: str
    fn: Callable[["Run"], list[Path]]  # returns the files it read or made: rerun when one changes
    needs: list[str]
    doc: str


STAGES: dict[str, Stage] = {}


def stage(name: str, needs: tuple[str, ...] = ()):
    """Register a stage; ``needs`` are run first (when not finished)."""
    def wrap(fn):
        STAGES[name] = Stage(name, fn, list(needs), " ".join((fn.__doc__ or "").split("\n\n")[0].split()))
        return fn
    return wrap


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_jsonl(path: Path, rows) -> Path:
    """Atomic: the file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows),
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_at_start": round(os.getloadavg()[0], 2)}


def revision() -> str:
    r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


@dataclass
class Run:
    cache: Path
    glue: Path | None = None  # --glue: the GLUE tasks' tsv folders, which only the data stage reads
    records: Path = RECORDS
    quiet: bool = False
    tasks: list[str] | None = None  # --tasks: the task-level stages on these candidates only (None: all)
    commands: list[str] = field(default_factory=list)
    log: Path | None = None

    # ----------------------------------------------------------------------------- calls

    def shown(self, args) -> str:
        """A command line as the manifest keeps it: the interpreter as python, cache paths as $CACHE, paths in
        the repository relative to it, paths beside it as ../."""
        return " ".join("python" if str(a) == sys.executable else
                        str(a).replace(str(self.cache), "$CACHE").replace(str(ROOT) + "/", "")
                        .replace(str(ROOT.parent) + "/", "../") for a in args)

    def sh(self, *args, stdin: bytes | None = None) -> bytes:
        """Run a command; its line goes into the stage's manifest entry, its stderr into the cache's log."""
        args = [str(a) for a in args]
        self.commands.append(self.shown(args))
        env = _env()
        with open(self.log, "ab") as err:
            err.write(f"$ {self.shown(args)}\n".encode())
            err.flush()
            r = subprocess.run(args, input=stdin, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"experiments: {self.shown(args)} failed with exit {r.returncode}; see {self.log}")
        return r.stdout

    def mt(self, *args, stdin: bytes | None = None) -> bytes:
        """A mergetool command (``python -m mergetool``), shown as ``mergetool ...``."""
        out = self.sh(sys.executable, "-m", "mergetool", *args, stdin=stdin)
        self.commands[-1] = self.commands[-1].replace("python -m mergetool", "mergetool", 1)
        return out

    def mt_many(self, commands: list[list], desc: str) -> None:
        """Many mergetool commands in one process (``experiments/batch.py``: the CLI's own entry point, once per
        command), with a progress bar; each goes into the manifest as its own ``mergetool ...`` line. The first
        that fails stops the batch (the ones before it are done, their outputs whole) and the stage with it."""
        if not commands:
            return
        args = [[str(a) for a in c] for c in commands]
        env = _env()
        shown = [self.shown(["mergetool", *a]) for a in args]
        done = 0
        with open(self.log, "ab") as err, self.bar(None, desc, len(args)) as bar:
            err.write("".join(f"$ {s}\n" for s in shown).encode())
            err.flush()
            p = subprocess.Popen([sys.executable, "-m", "experiments.batch"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
            feed = threading.Thread(target=_feed, args=(p.stdin, args), daemon=True)  # no pipe can fill up
            feed.start()
            for _ in p.stdout:
                done += 1
                bar.update(1)
            code = p.wait()
        self.commands += shown[:done]
        if code or done != len(args):
            raise SystemExit(f"experiments: {shown[done] if done < len(shown) else 'a batch'} failed with exit "
                             f"{code} after {done} of {len(args)} commands; see {self.log}")

    def mt_parallel(self, commands: list[list], desc: str, jobs: int, threads: int) -> None:
        """Independent mergetool commands, ``jobs`` at a time, each with ``threads`` CPU threads (OMP and MKL):
        on the 2-core machine two one-thread evals do 1.5x the work of one two-thread eval, whose small matrix
        products and per-adapter Python leave a core idle. Each command's line goes into the manifest; the first
        that fails stops the others and the stage."""
        env = _env(threads)
        todo = [[str(a) for a in c] for c in commands]
        running: list[tuple[subprocess.Popen, str]] = []
        failed = None
        with open(self.log, "ab") as err, self.bar(None, desc, len(todo)) as bar:
            try:
                while (todo or running) and failed is None:
                    while todo and len(running) < jobs:
                        args = [sys.executable, "-m", "mergetool", *todo.pop(0)]
                        shown = self.shown(args).replace("python -m mergetool", "mergetool", 1)
                        err.write(f"$ {shown}\n".encode())
                        err.flush()
                        running.append((subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, env=env,
                                                         cwd=ROOT), shown))
                    time.sleep(0.5)
                    for p, shown in list(running):
                        if p.poll() is None:
                            continue
                        running.remove((p, shown))
                        if p.returncode:
                            failed = (shown, p.returncode)
                            break
                        self.commands.append(shown)
                        bar.update(1)
            finally:
                for p, _ in running:
                    p.terminate()
                for p, _ in running:
                    p.wait()
        if failed:
            raise SystemExit(f"experiments: {failed[0]} failed with exit {failed[1]}; see {self.log}")

    # ----------------------------------------------------------------------------- records and manifest

    def write_records(self, name: str, rows) -> Path:
        return write_jsonl(self.records / f"{name}.jsonl", rows)

    def manifest(self) -> dict:
        p = self.records / "manifest.json"
        return json.loads(p.read_text()) if p.exists() else {"stages": {}}

    def _done(self, name: str) -> Path:
        return self.cache / "logs" / f"{name}.done"

    def finished(self, name: str) -> bool:
        """Whether the stage's run that the manifest records finished in this cache (``CACHE/logs/NAME.done``
        holds that entry's digest: the committed manifest, or a run in another cache, is not this cache's work,
        whose outputs later stages read) with the tasks asked for, and the files it read or made are unchanged."""
        e = self.manifest()["stages"].get(name)
        done = self._done(name)
        if not (e and e.get("tasks") == self.tasks and done.exists() and done.read_text() == _entry_key(e)):
            return False
        files = {Path(p.replace("$CACHE", str(self.cache))): h for p, h in e.get("files", {}).items()}
        return all(f.exists() and sha256(f) == h for f, h in files.items())

    def record_stage(self, name: str, started: float, seconds: float, inputs: list[Path], mach: dict,
                     rev: str, clock: Clock | None = None) -> None:
        m = self.manifest()
        outs = sorted(p for p in self.records.glob(f"{name}*.jsonl"))
        m["stages"][name] = {
            "revision": rev, "machine": mach, "tasks": self.tasks,
            "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1), "commands": self.commands,
            **({"seconds_all_runs": round(clock.total, 1), "runs": clock.runs} if clock and clock.runs > 1 else {}),
            "files": {self.shown([p]): sha256(p) for p in inputs},
            "records": {p.name: sha256(p) for p in outs},
        }
        (self.records / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
        self._done(name).parent.mkdir(parents=True, exist_ok=True)
        self._done(name).write_text(_entry_key(m["stages"][name]))

    # ----------------------------------------------------------------------------- progress

    def bar(self, items, desc: str, total: int | None = None):
        """A progress bar over ``items``, or (``items`` None) one that the caller moves on up to ``total``."""
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, disable=self.quiet, leave=False, dynamic_ncols=True)


class Clock:
    """The time a stage ran over all its attempts since it last finished: a run killed and resumed (``--redo``
    or not) adds its part. A thread adds the wall time every TICK seconds to ``path`` (at most 2·TICK at a time,
    so a run stopped with SIGSTOP, or a machine asleep, does not count the pause); a finished stage removes the
    file, and the manifest keeps ``seconds_all_runs`` and ``runs`` when there was more than one."""
    TICK = 10.0

    def __init__(self, path: Path):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else {}
        self.before, self.runs = old.get("seconds", 0.0), old.get("runs", 0) + 1
        self.total, self._stop = self.before, threading.Event()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".part")
        tmp.write_text(json.dumps({"seconds": round(self.total, 1), "runs": self.runs}))
        os.replace(tmp, self.path)

    def _tick(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.TICK):
            now = time.monotonic()
            self.total += min(now - last, 2 * self.TICK)
            last = now
            self._save()
        self.total += min(time.monotonic() - last, 2 * self.TICK)

    def __enter__(self) -> Clock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._save()
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop counting (``total`` is final); the file stays until the block ends."""
        self._stop.set()
        self._thread.join()

    def __exit__(self, kind, *_) -> None:
        self.stop()
        if kind is None:
            self.path.unlink(missing_ok=True)
        else:
            self._save()


def _entry_key(entry: dict) -> str:
    """The digest of a stage's manifest entry, which its cache keeps once the stage finished there."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _env(threads: int | None = None) -> dict[str, str]:
    """The environment of every mergetool subprocess: this checkout first on the path; a thread count if given."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def _feed(pipe, args: list[list[str]]) -> None:
    try:
        for a in args:
            pipe.write((json.dumps(a) + "\n").encode())
        pipe.close()
    except BrokenPipeError:  # the batch stopped at a failed command: the caller reports it
        pass


def order(names: list[str]) -> list[str]:
    """The stages named and every stage they need, each after what it needs."""
    out: list[str] = []

    def visit(n: str) -> None:
        if n not in STAGES:
            raise SystemExit(f"experiments: unknown stage {n!r}; choose from {', '.join(STAGES)}")
        for d in STAGES[n].needs:
            visit(d)
        if n not in out:
            out.append(n)
    for n in names:
        visit(n)
    return out


def run_stages(run: Run, names: list[str], redo: set[str]) -> None:
    from tqdm import tqdm

    todo = order(names)
    run.cache.mkdir(parents=True, exist_ok=True)
    run.records.mkdir(parents=True, exist_ok=True)
    mach = machine()
    for name in tqdm(todo, desc="stages", disable=run.quiet, dynamic_ncols=True):
        if name not in redo and run.finished(name):
            continue
        run.commands, run.log = [], run.cache / "logs" / f"{name}.log"
        run.log.parent.mkdir(exist_ok=True)
        t0, c0, rev = time.time(), time.perf_counter(), revision()  # the code that runs, as it starts
        with Clock(run.cache / "logs" / f"{name}.clock") as clock:
            inputs = STAGES[name].fn(run)
            clock.stop()
            run.record_stage(name, t0, time.perf_counter() - c0, inputs, mach, rev, clock)
