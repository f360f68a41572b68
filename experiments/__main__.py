"""``python -m experiments``: run stages, or print and check the tables (see experiments/__init__.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __doc__ as DOC
from . import collapse, datamerge, pool_scores, scores, stages  # noqa: F401  (registers the stages)
from .harness import STAGES, Run, run_stages


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments", description=DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run stages (and the stages they need) that are not finished")
    r.add_argument("stages", nargs="+", help="stage names, or all: " + ", ".join(STAGES))
    r.add_argument("--cache", type=Path, required=True, help="weights and raw records (never committed)")
    r.add_argument("--glue", type=Path, default=None,
                   help="the GLUE tasks' folder (SST-2, RTE, MRPC, CoLA, WNLI, each with its train.tsv and dev.tsv as "
                        "GLUE's download has them); stage data needs it")
    r.add_argument("--redo", default="", help="comma-separated stages to run again even if finished")
    r.add_argument("--tasks", default=None,
                   help="comma-separated candidate tasks: the task-level stages on these only (default: all)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub.add_parser("stages", help="list the stages")
    p = sub.add_parser("report", help="print the tables built from experiments/records/")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", type=Path, help="fill the marked tables of this markdown file")
    g.add_argument("--check", type=Path, help="exit 1 if this file's marked tables differ from the records")
    a = ap.parse_args(argv)
    if a.cmd == "stages":
        for s in STAGES.values():
            print(f"{s.name:10s} {s.doc}" + (f" (needs {', '.join(s.needs)})" if s.needs else ""))
        return 0
    if a.cmd == "run":
        names = list(STAGES) if a.stages == ["all"] else a.stages
        tasks = sorted(a.tasks.split(",")) if a.tasks else None
        run_stages(Run(cache=a.cache.resolve(), glue=a.glue, quiet=a.quiet, tasks=tasks), names,
                   {x for x in a.redo.split(",") if x})
        return 0
    from .report import check, fill, tables

    if a.write:
        a.write.write_text(fill(a.write.read_text(), tables()))
        return 0
    if a.check:
        bad = check(a.check.read_text(), tables())
        for name in bad:
            print(f"experiments: table {name!r} of {a.check} differs from the records", file=sys.stderr)
        return 1 if bad else 0
    for name, md in tables().items():
        print(f"<!-- table:{name} -->\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
