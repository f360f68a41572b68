"""stdin and stdout: binary and text streams, the terminal guards (no binary to a terminal, no data read
from one), and the one line a closed or full stdout gets. A closed pipe (``| head``) stays BrokenPipeError,
which the CLI ends quietly."""

from __future__ import annotations

import errno
import io
import os
import shutil
import sys
from typing import IO

from .errors import MergetoolError, UsageError


def stdin_binary() -> IO[bytes]:
    """stdin as a binary stream; refused when it is a terminal (or closed)."""
    if sys.stdin is None:
        raise UsageError("-", "stdin is closed", "pipe data in or pass a file")
    if sys.stdin.isatty():
        raise UsageError("-", "refusing to read data from a terminal", "pipe data in or pass a file")
    return sys.stdin.buffer


def unreadable(src: str, e: OSError) -> MergetoolError:
    """The one line for an input that cannot be opened or read: what the error means for this path (a link
    loop, a link to nothing, a permission, a directory) and what to do."""
    if e.errno == errno.ENOENT:
        if os.path.islink(src):
            return MergetoolError(src, f"is a symbolic link to a missing file ({os.readlink(src)})",
                                  "point the link at an existing file")
        return MergetoolError(src, "no such file or directory", "check the path")
    if e.errno == errno.ELOOP:
        return MergetoolError(src, "is a symbolic link loop (its links lead back to themselves)",
                              "point the link at a real file")
    if e.errno in (errno.EACCES, errno.EPERM):
        return MergetoolError(src, f"cannot read ({e.strerror})", "check its permissions, or copy it somewhere "
                              "this user can read")
    if e.errno == errno.EISDIR:
        return MergetoolError(src, "is a directory", "pass a file")
    return MergetoolError(src, f"cannot read ({e.strerror or e.__class__.__name__})",
                          "check the file and the device it is on")


def check_path(src: str) -> None:
    """Refuse, in one line (``unreadable``), a path that does not lead to something."""
    try:
        os.stat(src)
    except OSError as e:
        raise unreadable(src, e) from None


def open_input(src: str) -> IO[bytes]:
    try:
        return open(src, "rb")
    except OSError as e:
        raise unreadable(src, e) from None


def stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def refuse_binary_to_tty(dst: str | None) -> None:
    if (dst is None or dst == "-") and stdout_is_tty():
        raise UsageError("stdout", "refusing to write safetensors to a terminal",
                         "redirect stdout (> out.safetensors) or pass -o FILE")


def checked_stdout():
    """sys.stdout, refused with one line when fd 1 was closed before the command started (Python then sets
    sys.stdout to None)."""
    if sys.stdout is None:
        raise MergetoolError("stdout", "is closed", "run the command with stdout open (> FILE), or pass -o FILE")
    return sys.stdout


def stdout_failed(e: Exception) -> MergetoolError:
    """The one line for a failed write to stdout. What is left in its buffers would fail again at the
    interpreter's final flush (a second message), so fd 1 is pointed at /dev/null first."""
    try:
        fd = sys.stdout.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
    if isinstance(e, OSError) and e.errno == errno.EBADF or isinstance(e, ValueError):
        return MergetoolError("stdout", "is closed", "run the command with stdout open (> FILE), or pass -o FILE")
    why = e.strerror if isinstance(e, OSError) and e.strerror else e.__class__.__name__
    return MergetoolError("stdout", f"cannot write ({why})", "free space where stdout goes, or redirect it elsewhere")


def write_stdout(text: str) -> None:
    """Text to stdout, flushed. A closed pipe stays BrokenPipeError (the command ends quietly); a closed or
    failing stdout (``>&-``, ``> /dev/full``) is one line."""
    out = checked_stdout()
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        raise stdout_failed(e) from None


class StdoutText:
    """A text sink for stdout that gathers what is written and sends it on ``flush`` (``write_stdout``): a
    closed or failing stdout is one line, a closed pipe ends the command quietly."""

    def __init__(self):
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        if self.parts:
            text, self.parts = "".join(self.parts), []
            write_stdout(text)

    def close(self) -> None:
        self.flush()


def pump(src: IO[bytes], fd: int) -> None:
    """Copy ``src`` to the file descriptor with plain writes (no buffer left behind when one fails)."""
    while True:
        chunk = src.read(1 << 22)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def copy_to_stdout(src: IO[bytes]) -> None:
    out = checked_stdout()
    try:
        out.flush()
        try:
            fd = out.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):  # a captured stdout (tests): its buffer
            shutil.copyfileobj(src, out.buffer, 1 << 22)
            out.buffer.flush()
            return
        out.buffer.flush()
        pump(src, fd)
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        raise stdout_failed(e) from None
