"""``mergetool weight``: merge weights from the base model's accuracy per task, or from mergeability scores."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UsageError
from .app import begin, command
from .common import AllowPickle, Debug, Quiet

HELP = """Write merge weights ({"adapter": NAME, "weight": w} JSONL) that weak tasks survive the merge with.

--by base (default) reads eval records of the base model (eval --summary, or per-example records) and
weighs each adapter by how badly the base does on its task: w_i = softmax((1 − Acc_base(t_i)) / τ)
("Will it Merge?", section 6). --by score reads score records and weighs the less mergeable adapters more:
w_i = softmax((1 − S_i) / τ). The adapters given (files, directories, a pool) name the weights and give
their tasks; without them, every task (by base) or scored adapter (by score) gets one. --normalize sum
(default) makes the weights sum to 1; max makes the largest 1. merge --weights reads the output.

\b
Examples:
  mergetool eval --base BASE --summary tasks.jsonl | mergetool weight --tau 0.5 experts/ > w.jsonl
  mergetool weight --records base.jsonl --tau 0.5 experts/ | mergetool merge -m linear --weights - experts/
  mergetool weight --by score --records scores.jsonl --tau 0.2 pool/ > w.jsonl
"""

Opt = typer.Option


@command("weight", help=HELP, short_help="Merge weights from base accuracy or scores: JSONL.")
def weight_cmd(
    adapters: Annotated[Optional[list[str]], typer.Argument(help="Adapters to weigh (files, directories); "
                                                            "default: one weight per task or scored adapter.",
                                                            show_default=False, metavar="ADAPTER...")] = None,
    records: Annotated[str, Opt("--records", help="eval records of the base (--by base) or score records "
                                "(--by score); - is stdin.", metavar="FILE|-")] = "-",
    by: Annotated[str, Opt("--by", help="base: the base model's accuracy per task; score: mergeability scores.",
                           metavar="base|score")] = "base",
    tau: Annotated[float, Opt("--tau", help="Softmax temperature (smaller: sharper).")] = 1.0,
    normalize: Annotated[str, Opt("--normalize", help="sum: weights sum to 1; max: the largest is 1.",
                                  metavar="sum|max")] = "sum",
    allow_pickle: AllowPickle = False,
    quiet: Quiet = False,
    debug: Debug = False,
):
    begin("weight", quiet, debug)
    from ..weights import make_weights, softmax, write_weights

    if by not in ("base", "score"):
        raise UsageError("--by", f"unknown basis {by!r}", "use base or score")
    if normalize not in ("sum", "max"):
        raise UsageError("--normalize", f"unknown normalisation {normalize!r}", "use sum or max")
    softmax([0.0], tau)  # the temperature is checked before anything is read
    if adapters and "-" in adapters and records == "-":
        raise UsageError("-", "stdin is named twice", "pass the records with --records FILE")
    keys = None
    if adapters:
        from ..inputs import check_unique_names, load_inputs

        updates = load_inputs(list(adapters), None, allow_pickle)
        check_unique_names(updates, "their weights could not be told apart")
        keys = [(u.name, u.meta.get("task") or u.name) for u in updates]
    pairs = make_weights(records, by, tau, normalize, keys)
    import io as _io

    from ..streams import write_stdout

    buf = _io.StringIO()
    write_weights(pairs, buf)
    write_stdout(buf.getvalue())
