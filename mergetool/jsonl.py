"""JSONL: records read line by line (a bounded line, a clear line number for every fault), written one
flushed object per line, and a records file taken up again by ``--resume``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Callable

from .errors import MergetoolError
from .streams import open_input, stdin_binary, write_stdout

MAX_JSONL_LINE = 64 << 20  # bytes; a longer line is refused (with its number) before it is read


def resume_records(path: str | Path, what: str) -> tuple[list[dict], Callable[[], None]]:
    """The records of a file to resume (one JSON object per line), and a function that drops from the file a last
    line cut by a crash. Call it only once the records are accepted: a refused resume leaves the file as it
    was. A file that is not UTF-8 JSONL of objects is refused in one line."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MergetoolError(str(path), f"is not a file {what} wrote (not UTF-8 text)",
                             f"resume into a file {what} wrote, or write to a new file") from None
    keep = text if not text or text.endswith("\n") else text[: text.rfind("\n") + 1]
    out = []
    for i, line in enumerate(keep.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            r = None
        if not isinstance(r, dict):
            raise MergetoolError(f"{path}:{i}", f"is not a line {what} wrote", f"resume into a file {what} wrote, "
                                 "or write to a new file")
        out.append(r)

    def cut() -> None:
        if keep != text:
            path.write_bytes(keep.encode("utf-8"))

    return out, cut




def read_jsonl(src: str) -> list[dict]:
    """Read JSONL (``-`` for stdin), line by line. Blank lines, lines that are not UTF-8, not a JSON object or
    longer than MAX_JSONL_LINE, and strings holding a lone surrogate (``"\\udc80"``, which json accepts but no
    text can hold) are errors that name their line."""
    if src == "-":
        return _parse_jsonl(stdin_binary(), "<stdin>")
    with open_input(src) as f:
        return _parse_jsonl(f, src)


def _read_line(f: IO[bytes], name: str, i: int) -> bytes | bytearray:
    """One line (with its newline), refused as soon as it passes MAX_JSONL_LINE: memory stays at one line."""
    step = min(MAX_JSONL_LINE + 1, 1 << 20)
    line = f.readline(step)
    if len(line) == step and not line.endswith(b"\n"):  # a long line: gather it up to the limit
        line = bytearray(line)
        while not line.endswith(b"\n") and len(line) <= MAX_JSONL_LINE:
            more = f.readline(min(MAX_JSONL_LINE + 2 - len(line), 1 << 20))
            if not more:
                break
            line += more
    if len(line) - line.endswith(b"\n") > MAX_JSONL_LINE:
        raise _too_long(name, i)
    return line


def _too_long(name: str, i: int) -> MergetoolError:
    limit = f"{MAX_JSONL_LINE >> 20} MiB" if MAX_JSONL_LINE % (1 << 20) == 0 else f"{MAX_JSONL_LINE} bytes"
    return MergetoolError(f"{name}:{i}", f"line is longer than {limit}",
                          "one JSON object per line; split or shorten the record")


def _has_surrogate(obj) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii():
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def _parse_jsonl(f: IO[bytes], name: str) -> list[dict]:
    rows = []
    i = 0
    try:
        while True:
            i += 1
            raw = _read_line(f, name, i)
            if not raw:
                break
            where = f"{name}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MergetoolError(where, "not valid UTF-8", "write the JSONL as UTF-8") from None
            if not line.strip():
                raise MergetoolError(where, "empty line", "remove blank lines from the JSONL")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MergetoolError(where, f"malformed JSON ({e.msg})", "one JSON object per line") from None
            except RecursionError:
                raise MergetoolError(where, "malformed JSON (nested too deeply)", "one JSON object per line") from None
            except ValueError as e:  # e.g. an integer of more digits than Python converts
                raise MergetoolError(where, f"malformed JSON ({str(e).splitlines()[0][:80]})",
                                     "one JSON object per line") from None
            if not isinstance(obj, dict):
                raise MergetoolError(where, "not a JSON object", "one JSON object per line")
            if "\\u" in line and _has_surrogate(obj):
                raise MergetoolError(where, "a string holds a lone surrogate escape (\\ud800-\\udfff), "
                                     "which is not text", "fix the escape (a character outside the BMP is a pair "
                                     "of escapes)")
            rows.append(obj)
    except OSError as e:
        raise MergetoolError(name, f"cannot read ({e.strerror or e.__class__.__name__})") from None
    if not rows:
        raise MergetoolError(name, "no records", "pass a non-empty JSONL file")
    return rows


def _not_finite(obj, path: str = "") -> tuple[str, float] | None:
    """The first number in ``obj`` that is NaN or infinite: (its field, as ``logprobs[1]`` or ``a.b``, and it)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path, obj)
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for p, v in items:
        found = _not_finite(v, p)
        if found is not None:
            return found
    return None


def record_line(obj: dict, where: str = "a record") -> str:
    """A record as one JSON line (with its newline), UTF-8 text as it is. Every number must be finite: JSON has no
    NaN or infinity (Python's json writes ``NaN``, which other readers refuse), and a NaN in a record is a result
    that went wrong; it is an error that names the field, and nothing is written. ``where`` names the record in
    that error (``adapter a, example q1``)."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        found = _not_finite(obj)
        if found is None:
            raise
        field, x = found
        shown = "NaN" if math.isnan(x) else ("-inf" if x < 0 else "inf")
        raise MergetoolError(f"{where}: field '{field}'", f"is {shown}, not a finite number",
                             "a computation overflowed: check the inputs' scale (an adapter's lora_alpha, weights, "
                             "--tau) and --dtype") from None


def write_jsonl_line(obj: dict, fh: IO[str] | None = None, where: str = "a record") -> None:
    """One record and a newline (``record_line``: finite numbers only), flushed, to ``fh`` or stdout (a closed or
    full stdout is one line)."""
    line = record_line(obj, where)
    if fh is None:
        write_stdout(line)
        return
    fh.write(line)
    fh.flush()
