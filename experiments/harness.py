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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "experiments" / "records"
GLUE = ROOT.parent / "shared" / "testbed" / "glue"  # the testbed's GLUE data (--glue elsewhere)


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
    glue: Path
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
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
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

    # ----------------------------------------------------------------------------- records and manifest

    def write_records(self, name: str, rows) -> Path:
        return write_jsonl(self.records / f"{name}.jsonl", rows)

    def manifest(self) -> dict:
        p = self.records / "manifest.json"
        return json.loads(p.read_text()) if p.exists() else {"stages": {}}

    def finished(self, name: str) -> bool:
        e = self.manifest()["stages"].get(name)
        return bool(e) and e.get("tasks") == self.tasks and all(Path(p.replace("$CACHE", str(self.cache))).exists() and
                               sha256(Path(p.replace("$CACHE", str(self.cache)))) == h
                               for p, h in e.get("files", {}).items())

    def record_stage(self, name: str, started: float, seconds: float, inputs: list[Path], mach: dict,
                     rev: str) -> None:
        m = self.manifest()
        outs = sorted(p for p in self.records.glob(f"{name}*.jsonl"))
        m["stages"][name] = {
            "revision": rev, "machine": mach, "tasks": self.tasks,
            "started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1), "commands": self.commands,
            "files": {self.shown([p]): sha256(p) for p in inputs},
            "records": {p.name: sha256(p) for p in outs},
        }
        (self.records / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")

    # ----------------------------------------------------------------------------- progress

    def bar(self, items, desc: str):
        from tqdm import tqdm

        return tqdm(items, desc=desc, disable=self.quiet, leave=False, dynamic_ncols=True)


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
        inputs = STAGES[name].fn(run)
        run.record_stage(name, t0, time.perf_counter() - c0, inputs, mach, rev)
