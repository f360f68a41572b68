"""The ``mergetool`` entry point: the edge where every failure becomes one line and an exit code.

Exit codes: 0 ok; 1 bad data or runtime failure; 2 usage error; 130 interrupted (Ctrl-C); 143 terminated
(SIGTERM). A closed stdout (``| head``) ends quietly with 0. Tracebacks only with ``--debug``.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover
    from click import exceptions as cx

from . import commands  # noqa: F401  (registers the subcommands on the app)
from .app import PipeClosed, Stopped, app, state


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


def _ray_alone(args: list[str]) -> list[str]:
    """``--ray`` without an address means ``--ray local``: at the end, before another option, or before an
    existing path that is not an address's form (``--ray pool/``: the pool is a positional). Anything else after
    it is its address, checked by ``distributed.check_address``."""
    from ..distributed import is_address

    out = []
    for i, a in enumerate(args):
        out.append(a)
        if a == "--ray":
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is None or nxt.startswith("-") or (not is_address(nxt) and os.path.exists(nxt)):
                out.append("local")
    return out


def _caller_of_imports(frame):
    """The frame that started the import the interrupted code runs in (the outermost one, when imports nest), or
    None when it runs outside every import (no frame of importlib's bootstrap below it)."""
    caller = None
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            caller = frame.f_back
        frame = frame.f_back
    return caller


def _signalled(signum, frame, stop: Stopped, exc: BaseException) -> None:
    """Record the signal, and raise ``exc`` where the command's code can unwind. Inside an import the exception
    would land in code that cannot carry it: a C++ extension's initialisation (pybind11 aborts the process), a
    module lock's weakref callback (the exception is printed and dropped, the run goes on), a lazy import that
    transformers or numpy then reports as another error. There it is raised in the frame that started the import,
    at its first event once the import has ended (a trace on that frame alone: an event, where a timer that sent
    the signal again could land after the command's last import and be lost)."""
    state["signal"] = stop
    caller = _caller_of_imports(frame)
    if caller is None:
        raise exc

    def at_caller(f, event, arg):
        if f is not caller:
            return None
        sys.settrace(None)
        f.f_trace = None
        raise exc

    caller.f_trace = at_caller
    sys.settrace(at_caller)  # frames of the import itself are not traced (their local trace is None)


def _interrupt(signum, frame):
    _signalled(signum, frame, Stopped(130, "interrupted"), KeyboardInterrupt())


def _stop(signum, frame):
    _signalled(signum, frame, Stopped(143, "terminated"), Stopped(143, "terminated"))


def _exit_interrupted() -> None:
    """Exit 130 after a Ctrl-C, whatever CPython remembers of it. A KeyboardInterrupt that once passed through code
    run by ``PyRun_String`` (pybind11's ``exec`` while an extension is imported) marks the interpreter, and at
    exit CPython then kills itself with SIGINT even though the exception was caught (the caller sees a death by
    signal, not the exit code). The exit handlers run (Ray's shutdown, among others), the streams are flushed,
    and the process ends with 130 itself."""
    import atexit

    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


def run(argv: list[str] | None = None) -> int:
    """Run the app and map every failure to one line on stderr and an exit code. A failure after a Ctrl-C or
    SIGTERM is the signal's (130/143, "interrupted"/"terminated"), whatever the code it hit made of the exception
    (a library that catches it, an import it leaves half done: ``ModuleNotFoundError``, a C extension's
    ``ImportError``)."""
    from ..errors import MergetoolError

    debug = "--debug" in (argv if argv is not None else sys.argv)
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    state["signal"] = None
    saved = (signal.signal(signal.SIGINT, signal.SIG_IGN if ignored else _interrupt),
             signal.signal(signal.SIGTERM, _stop))
    code, line = 0, None
    try:
        rv = app(args=_ray_alone(sys.argv[1:] if argv is None else list(argv)), standalone_mode=False,
                 prog_name="mergetool")
        if isinstance(rv, int) and rv:  # typer returns the exit code of an Exit it caught (its Ctrl-C is 130)
            code, line = rv, ("interrupted" if rv == 130 else None)
    except typer.Exit as e:
        code = e.exit_code
    except cx.UsageError as e:
        path = e.ctx.command_path if e.ctx else "mergetool"
        if e.ctx is not None and e.ctx.info_name != "mergetool":
            state["command"] = e.ctx.info_name
        if e.__class__.__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            sys.stderr.write(e.ctx.get_help() + "\n")
        else:
            line = f"usage: {e.format_message().rstrip('.')}; see '{path} --help'"
        code = 2
    except Stopped as e:
        code, line = e.code, e.why
    except (typer.Abort, KeyboardInterrupt):
        code, line = 130, "interrupted"
    except (BrokenPipeError, PipeClosed):
        _quiet_stdout()
        code = 0
    except MergetoolError as e:
        if debug:
            traceback.print_exc()
        code, line = e.exit_code, e.line()
    except cx.ClickException as e:
        code, line = e.exit_code, e.format_message()
    except OSError as e:  # a device full, a file that vanished: say which and why
        if debug:
            traceback.print_exc()
        code, line = 1, f"{e.filename or 'output'}: {e.strerror or e}; check the disk and the path"
    except Exception as e:  # an internal failure still gets one line
        if debug:
            traceback.print_exc()
        code, line = 1, f"internal: {e.__class__.__name__}: {e}; rerun with --debug for a traceback"
    finally:
        if argv is not None:  # in-process (tests): the caller's handlers again
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])
    if code and state["signal"] is not None:
        code, line = state["signal"].code, state["signal"].why
    if line:
        _say("error", line)
    if argv is None:  # the command's work is over, written or refused: a late signal changes nothing now
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if code == 130:
            _exit_interrupted()
        sys.exit(code)
    return code
