"""The typer app that every command module registers on, and ``begin``, which every command calls first.

Imports nothing of the commands (``cli.commands`` does), so there is no circle.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import typer

from .. import __version__

app = typer.Typer(
    name="mergetool",
    help="Merge, evaluate, score and diagnose LoRA adapters of one base model.\n\n"
         "Commands read and write safetensors and JSONL on stdin/stdout, so they compose in pipelines:\n\n"
         "\b\n  mergetool merge --method knots a.safetensors b.safetensors > ab.safetensors",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

state = {"command": None, "debug": False}


class Stopped(BaseException):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) inside a command. Not a KeyboardInterrupt, which typer would turn
    into a return value, and not an Exception, which no ``except Exception`` may swallow: it unwinds every
    ``finally`` (temporary files are removed) up to ``main.run``, which prints one line."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code, self.why = code, why


class PipeClosed(Exception):
    """stdout was closed by its reader (``| head``): the command ends quietly with exit 0."""


def command(name: str, **kw):
    """``app.command`` for mergetool's commands: a Ctrl-C or a closed stdout inside one is carried past typer
    (which would exit 1 on a broken pipe and swallow the interrupt's exit code) to ``main.run``."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                raise Stopped(130, "interrupted") from None
            except BrokenPipeError:
                raise PipeClosed() from None

        return app.command(name, **kw)(wrapper)

    return deco


def version_callback(value: bool):
    if value:
        print(f"mergetool {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")):
    """Merge, evaluate, score and diagnose LoRA adapters of one base model."""


class _Formatter(logging.Formatter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def format(self, record):
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return self.prefix + kind + record.getMessage()


def begin(command: str, quiet: bool, debug: bool) -> None:
    """Called first by every command: names it for error lines and routes logging to stderr."""
    state["command"], state["debug"] = command, debug
    log = logging.getLogger("mergetool")
    log.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(_Formatter(f"mergetool {command}: "))
    log.addHandler(h)
    log.setLevel(logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO))
    log.propagate = False
    if quiet or not sys.stderr.isatty():  # no progress bars from the libraries either
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
