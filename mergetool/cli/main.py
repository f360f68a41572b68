"""The ``mergetool`` entry point: the edge where every failure becomes one line and an exit code.

Exit codes: 0 ok; 1 bad data or runtime failure; 2 usage error; 130 interrupted. A closed stdout
(``| head``) ends quietly with 0. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx

from . import commands  # noqa: F401  (registers the subcommands on the app)
from .app import app, state


def _say(kind: str, text: str) -> None:
    cmd = state["command"]
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

    debug = "--debug" in (argv if argv is not None else sys.argv)
    code = 0
    try:
        app(args=argv, standalone_mode=False, prog_name="mergetool")
    except typer.Exit as e:
        code = e.exit_code
    except cx.UsageError as e:
        path = e.ctx.command_path if e.ctx else "mergetool"
        if e.ctx is not None and e.ctx.info_name != "mergetool":
            state["command"] = e.ctx.info_name
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
