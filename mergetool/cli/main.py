"""The ``mergetool`` entry point: the app, and the edge where errors become one line and an exit code.

Exit codes: 0 ok; 1 bad data or runtime failure; 2 usage error; 130 interrupted. A closed stdout
(``| head``) ends quietly with 0. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx

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

_state = {"command": None, "debug": False}


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
    _state["command"], _state["debug"] = command, debug
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


def _say(kind: str, text: str) -> None:
    cmd = _state["command"]
    prefix = f"mergetool {cmd}" if cmd else "mergetool"
    sys.stderr.write(f"{prefix}: {kind}: {text}\n")
    sys.stderr.flush()


def _quiet_stdout() -> None:
    # After a broken pipe, point stdout at /dev/null so the interpreter's final flush stays silent.
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run(argv: list[str] | None = None) -> int:
    """Run the app and map every failure to one line on stderr and an exit code."""
    from ..errors import MergetoolError

    from . import commands  # noqa: F401  (registers the subcommands)

    debug = "--debug" in (argv if argv is not None else sys.argv)
    code = 0
    try:
        app(args=argv, standalone_mode=False, prog_name="mergetool")
    except typer.Exit as e:
        code = e.exit_code
    except cx.UsageError as e:
        path = e.ctx.command_path if e.ctx else "mergetool"
        if e.ctx is not None and e.ctx.info_name != "mergetool":
            _state["command"] = e.ctx.info_name
        if e.__class__.__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            sys.stderr.write(e.ctx.get_help() + "\n")
        else:
            _say("error", f"usage: {e.format_message().rstrip('.')}; see '{path} --help'")
        code = 2
    except typer.Abort:
        _say("error", "interrupted")
        code = 130
    except KeyboardInterrupt:
        _say("error", "interrupted")
        code = 130
    except BrokenPipeError:
        _quiet_stdout()
        code = 0
    except MergetoolError as e:
        if debug:
            traceback.print_exc()
        _say("error", e.line())
        code = e.exit_code
    except cx.ClickException as e:
        _say("error", e.format_message())
        code = e.exit_code
    except Exception as e:  # an internal failure still gets one line
        if debug:
            traceback.print_exc()
        _say("error", f"internal: {e.__class__.__name__}: {e}; rerun with --debug for a traceback")
        code = 1
    if argv is None:
        sys.exit(code)
    return code
