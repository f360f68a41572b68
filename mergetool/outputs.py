"""Outputs: a file written whole and atomically (a temporary file beside it, renamed into place), a device or
FIFO written straight, directories built beside their place, and the checks made before any work (an output
that cannot be written, or that would destroy an input)."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import MergetoolError, UsageError
from .streams import checked_stdout, copy_to_stdout, pump


def _copy_to_path(src: IO[bytes], dst: str) -> None:
    """Write straight into a device, FIFO or magic link: opened for writing, never replaced."""
    try:
        fd = os.open(dst, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MergetoolError(dst, f"cannot open for writing ({e.strerror})",
                             "check the path and its permissions") from None
    try:
        pump(src, fd)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise MergetoolError(dst, f"cannot write ({e.strerror})", "check where -o points") from None
    finally:
        os.close(fd)


def _output_target(dst: str) -> tuple[str, bool]:
    """Where ``-o DST`` lands and how: ``(path, False)`` for a regular file or a new path (a temporary file beside
    ``path`` renamed into place; through a symlink, its target is replaced and the link kept), ``(dst, True)`` for
    a character device (/dev/null), a FIFO, a socket or a link to one (/dev/stdout), written straight: a rename
    would replace the device with a file."""
    try:
        st = os.stat(dst)  # follows symlinks
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise MergetoolError(dst, f"cannot write ({e.strerror})", "check the path") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise MergetoolError(dst, "is a directory", "pass a file path to -o")
    if st is not None and not stat.S_ISREG(st.st_mode):
        if not os.access(dst, os.W_OK):
            raise MergetoolError(dst, "is not writable", "check its permissions")
        return dst, True
    target = dst
    if os.path.islink(dst):
        real = os.path.realpath(dst)
        try:
            same = st is None or os.path.samefile(real, dst)
        except OSError:
            same = False
        if not same:  # a link the kernel resolves by itself (/proc/self/fd/N): write through it
            return dst, True
        target = real
    d = os.path.dirname(os.path.abspath(target)) or "."
    if not os.path.isdir(d):
        raise MergetoolError(dst, "its directory does not exist", "create it first")
    return target, False


def is_stream(dst: str | None) -> bool:
    """Whether ``-o DST`` is a stream (stdout, ``-``, a character device, a FIFO, a socket) rather than a file."""
    return dst is None or dst == "-" or _output_target(dst)[1]


def _inside(path: str, d: str) -> bool:
    return path == d or path.startswith(d.rstrip(os.sep) + os.sep)


def _files_under(d: str) -> Iterator[os.stat_result]:
    """The status (links followed) of every file under ``d``, symlinked directories included, each real directory
    once (a link loop ends)."""
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(d, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        for f in files:
            try:
                yield os.stat(os.path.join(root, f))
            except OSError:
                pass


def refuse_destroying_inputs(out: str | Path | None, inputs, option: str = "-o") -> None:
    """Refuse an output (``-o``, ``--plot``, ``--fit``) that is one of the command's inputs or inside one of them,
    before any work: a records file written as the run goes would destroy an input before it is read, and even a
    file written at the end would replace a pool's adapter or a base model's weights. ``inputs`` are the paths the
    command reads (``-`` and ``None`` are skipped): files, and directories (a pool, a PEFT directory, the base
    model's directory), which cover every file under them. Symbolic links are resolved, and an existing output
    is compared by identity (device and inode) with every input file, so a link or a hard link to an input, or
    to a file a directory input links to (a Hugging Face cache snapshot links to its blobs), is caught too."""
    if out is None or str(out) in ("", "-"):
        return
    out = str(out)
    real = os.path.realpath(out)
    try:
        st = os.stat(out)
    except OSError:
        st = None
    mine = None if st is None or not stat.S_ISREG(st.st_mode) else (st.st_dev, st.st_ino)
    for src in inputs:
        if not src or str(src) == "-" or not os.path.exists(src):
            continue
        src = str(src)
        src_real = os.path.realpath(src)
        if os.path.isdir(src):
            hit = _inside(real, src_real) or (mine is not None and any(
                (f.st_dev, f.st_ino) == mine for f in _files_under(src)))
            why = f"{out} is inside the input directory {src}"
        else:
            hit = real == src_real or (mine is not None and os.path.samefile(out, src))
            why = f"{out} is the input {src}"
        if hit:
            raise UsageError(option, why, "write the output outside the inputs")


def check_figure_output(path: str | None, kind: str = "file", option: str = "--plot") -> None:
    """Refuse, before any work, a figure output that could not be written at the end: for ``kind="file"``
    (``--plot FILE.png``) a path that is a directory or whose directory is missing or not writable; for
    ``kind="dir"`` (``--plot DIR``) a path that is a file, or a directory that is not writable, or (a new DIR,
    made at the end) whose parent is missing or not writable."""
    if path is None:
        return
    if path in ("", "-"):
        raise UsageError(option, f"{path!r} is not a {'file' if kind == 'file' else 'directory'} path",
                         f"pass {option} {'FILE.png' if kind == 'file' else 'DIR'}")
    if kind == "dir":
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise UsageError(option, f"{path} is not a directory", "pass a directory for the figures")
            d = path
        else:
            d = os.path.dirname(os.path.abspath(path))
    else:
        if os.path.isdir(path):
            raise UsageError(option, f"{path} is a directory", f"pass a file path ({option} FILE.png)")
        d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError(option, f"{path}: the directory {d} does not exist", "create it first")
    try:  # a file made and removed: permissions, a read-only file system, /proc, whatever the user's rights
        fd, probe = tempfile.mkstemp(prefix=".mergetool-", suffix=".tmp", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(option, f"{path}: cannot write in the directory {d} ({e.strerror})",
                         "check its permissions, or write the figures elsewhere") from None


def check_output(dst: str | None) -> None:
    """Refuse an output that cannot be written (``-o`` an existing directory, in a missing directory, an empty
    path; stdout closed) with one line, before any work: ``atomic_output`` checks the same when it opens."""
    if dst == "":
        raise UsageError("-o", "is an empty path", "pass a file path, or - for stdout")
    if dst is None or dst == "-":
        checked_stdout()
    else:
        _output_target(dst)


def _umask() -> int:
    """The process's umask (read from /proc where it can be, so no thread sees it changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(target: str) -> int:
    """The mode a plain ``open(target, "w")`` would leave: an existing file keeps its own, a new one gets
    0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


class _Sink:
    """The handle ``atomic_output`` yields: a failed write to its temporary file is one line."""

    def __init__(self, fh: IO[bytes], where: str):
        self._fh, self._where = fh, where

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except OSError as e:
            raise MergetoolError(self._where, f"cannot write a temporary file ({e.strerror})",
                                 "free space there (TMPDIR for stdout outputs)") from None

    def __getattr__(self, name):
        return getattr(self._fh, name)


@contextlib.contextmanager
def atomic_output(dst: str | None) -> Iterator[IO[bytes]]:
    """Yield a binary file handle; on success the data lands at ``dst`` or on stdout (``None`` or ``-``).
    A regular file (or a new path) is written to a temporary file beside it and renamed into place; a
    device, FIFO or stdout gets the bytes straight, from a temporary file, once they are complete. On failure
    nothing is left behind and nothing is written."""
    to_stdout = dst is None or dst == "-"
    check_output(dst)  # a directory, a missing directory, a closed stdout: refused before anything is written
    if to_stdout:
        target, straight = "stdout", True
    else:
        target, straight = _output_target(dst)
    where = tempfile.gettempdir() if straight else (os.path.dirname(os.path.abspath(target)) or ".")
    tmp = None
    try:
        if straight:  # an unnamed temporary file: nothing to clean up, even after kill -9
            fh = tempfile.TemporaryFile(prefix=".mergetool-", suffix=".tmp")
        else:
            fd, tmp = tempfile.mkstemp(prefix=".mergetool-", suffix=".tmp", dir=where)
            fh = os.fdopen(fd, "w+b")
            os.chmod(tmp, _new_file_mode(target))  # mkstemp makes 0600; a finished output gets the usual mode
    except OSError as e:
        raise MergetoolError(dst or "stdout", f"cannot create a temporary file in {where} ({e.strerror})",
                             "check the directory's permissions and free space") from None
    try:
        with fh:
            yield _Sink(fh, where)
            try:
                fh.flush()
            except OSError as e:
                raise MergetoolError(where, f"cannot write a temporary file ({e.strerror})",
                                     "free space there (TMPDIR for stdout outputs)") from None
            if straight:
                fh.seek(0)
                if to_stdout:
                    copy_to_stdout(fh)
                else:
                    _copy_to_path(fh, target)
        if tmp is not None:
            try:
                os.replace(tmp, target)
            except OSError as e:
                raise MergetoolError(dst, f"cannot write ({e.strerror})",
                                     "check the path and its permissions") from None
            tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(dst: str) -> Iterator[Path]:
    """Build a directory beside ``dst`` and move it into place only when complete."""
    target = Path(dst).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise MergetoolError(dst, "exists and is not an empty directory", "choose a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def written_straight(dst: str) -> bool:
    """Whether ``-o DST`` is written straight (a device, a FIFO, a socket, a link the kernel resolves itself such
    as /proc/self/fd/1) rather than as a regular file: such an output keeps no progress file beside it."""
    return _output_target(dst)[1]
