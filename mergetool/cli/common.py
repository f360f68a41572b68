"""Options shared by the subcommands, and the one place where the device is chosen."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

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


def require_data_and_base(command: str, data: str | None, base: str | None) -> None:
    """The two things every model-reading command needs, as usage errors."""
    if data is None:
        raise UsageError("DATA", "no examples given", "pass a JSONL file or -")
    if not base:
        raise UsageError("--base", f"{command} needs the base model", "pass --base MODEL")


def pick_device(spec: str):
    """``auto`` is CUDA when present; all tensor work of a command runs on the device chosen here."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device", f"{spec} requested but CUDA is not available", "use --device cpu or auto")
        return torch.device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    raise UsageError("--device", f"unknown device {spec!r}", "use auto, cuda or cpu")
