"""Options shared by the subcommands, and the one place where the device is chosen."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..device import pick_device  # noqa: F401  (commands import it from here)
from ..errors import UsageError

Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cuda, cuda:N or cpu.",
                                     metavar="auto|cuda|cpu")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or notes on stderr; errors only.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]
Data = Annotated[Optional[str], typer.Argument(help="Examples JSONL, or - for stdin.", metavar="DATA.jsonl|-",
                                               show_default=False)]
BaseModel = Annotated[Optional[str], typer.Option("--base", metavar="MODEL",
                                                  help="Base model: directory, HF id (offline cache) or .gguf file.")]
GgufFile = Annotated[Optional[str], typer.Option("--gguf-file", help="GGUF file inside the --base directory.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Allow .bin/.pt pickle weights (weights_only).")]
Norm = Annotated[str, typer.Option("--norm", help="Multiple-choice score: tokens (mean token log-prob), chars "
                                   "(lm-eval acc_norm) or none (lm-eval acc).", metavar="tokens|chars|none")]
Shots = Annotated[int, typer.Option("--shots", help="k-shot demonstrations per example (same task, never itself).")]
ShotsFrom = Annotated[Optional[str], typer.Option("--shots-from", help="Pool of demonstrations (default: the records "
                                                  "with split=train in DATA).", metavar="FILE")]
Chat = Annotated[bool, typer.Option("--chat", help="Wrap each prompt in the tokenizer's chat template.")]
BatchTokens = Annotated[Optional[int], typer.Option("--batch-tokens", help="Tokens per scoring batch (default: "
                                                    "8192 on CUDA, 2048 on a CPU).", show_default=False)]
Ray = Annotated[Optional[str], typer.Option("--ray", help="Run the jobs on Ray: local (a Ray instance here; also "
                                            "--ray alone), auto (this machine's cluster), ray://HOST:PORT or HOST:PORT.",
                                            metavar="[ADDRESS]")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="With --ray: workers, each with the model resident "
                                                "(default: one per GPU, else one per node).")]
Unordered = Annotated[bool, typer.Option("--unordered", help="With --ray: write records as jobs finish, not in the "
                                         "single-process order.")]
ModelDtype = Annotated[str, typer.Option("--dtype", help="Model dtype: auto (bf16 on CUDA, fp32 on CPU), float32, "
                                         "bfloat16.")]

MAX_SEED = 2**64 - 1  # torch's generators take seeds up to here; Python's and numpy's any integer ≥ 0


def Seed(help: str):
    """The --seed option of a command: an integer in [0, 2⁶⁴ − 1]. A negative seed is refused (``random.Random``
    takes -1 as 1, so ``--seed -1`` once gave the plan of ``--seed 1``)."""
    return Annotated[int, typer.Option("--seed", help=help, min=0, max=MAX_SEED, metavar="<int>")]


def base_input(b) -> str:
    """What a command reads of a resolved base model (``model.Base``): its GGUF file, or its directory, for the
    check that no output lands on it (``outputs.refuse_destroying_inputs``)."""
    return str(b.dir / b.gguf_file) if b.gguf_file else str(b.dir)


def require_data_and_base(command: str, data: str | None, base: str | None) -> None:
    """The two things every model-reading command needs, as usage errors."""
    if data is None:
        raise UsageError("DATA", "no examples given", "pass a JSONL file or -")
    if not base:
        raise UsageError("--base", f"{command} needs the base model", "pass --base MODEL")


def model_dtype(spec: str):
    """The --dtype of a command that runs the model: None (auto: bf16 on CUDA, fp32 on CPU) or a torch dtype."""
    import torch

    dtypes = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if spec not in dtypes:
        raise UsageError("--dtype", f"unknown dtype {spec!r}", "use auto, float32 or bfloat16")
    return dtypes[spec]


def progress_bar(total: int, quiet: bool, label: str, unit: str):
    """A progress bar of ``unit`` done on stderr when it is a terminal (not with --quiet); a no-op otherwise,
    so pipes and logs stay clean. Call it with a count as work is done, and with None at the end."""
    import sys

    if quiet or not sys.stderr.isatty() or total == 0:
        return lambda n: None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn(),
                 console=Console(stderr=True), transient=True, redirect_stdout=False, redirect_stderr=False)
    task = p.add_task(label, total=total)
    p.start()

    def step(n):
        if n is None:
            p.stop()
        else:
            p.advance(task, n)

    return step
