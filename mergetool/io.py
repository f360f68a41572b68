"""Safetensors blobs and streams, JSONL, atomic outputs, TTY guards.

Stream framing (docs/formats.md): several adapters on one stream are concatenated safetensors
blobs. A blob is self-delimiting: 8-byte little-endian header length N, N bytes of JSON header, then
data up to the largest ``data_offsets`` end. A file may hold one blob or several.

Nothing here unpickles arbitrary objects: safetensors and JSON are parsed, and pickled state dicts only by
``load_pickle_tensors`` (``torch.load(weights_only=True)``), which the commands call only with --allow-pickle.
Untrusted lengths are checked against the bytes there are before anything is allocated for them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import shutil
import stat
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

import torch

from .errors import MergetoolError, UsageError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
MAX_HEADER = 100_000_000
MAX_JSONL_LINE = 64 << 20  # bytes; a longer line is refused (with its number) before it is read


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offset into the data section
    end: int


@dataclass
class Header:
    """A parsed and validated safetensors header."""

    specs: dict[str, TensorSpec]
    metadata: dict[str, str]
    header_len: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_len(self) -> int:
        return max((s.end for s in self.specs.values()), default=0)

    @property
    def total_len(self) -> int:
        return self.data_start + self.data_len


def _check_header_len(n: int, available: int | None, source: str) -> None:
    """Refuse a header length before anything is allocated for it: beyond the bytes there are (when known),
    or beyond MAX_HEADER."""
    if available is not None and 8 + n > available:
        raise MergetoolError(source, f"header length {n} is beyond the file ({available} bytes)",
                             "the file is truncated or not safetensors")
    if n > MAX_HEADER:
        raise MergetoolError(source, f"header length {n} exceeds the limit of {MAX_HEADER} bytes",
                             "the input is corrupt or not safetensors")


def _unique_keys(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _json_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header_json(raw: bytes | bytearray | memoryview, source: str) -> Header:
    """Validate a safetensors header (the N bytes after the length) as the safetensors library does: a JSON
    object of tensors with a known dtype, a shape of non-negative integers and data_offsets that match it,
    whose byte ranges, sorted, cover the data section from 0 without gap or overlap; ``__metadata__`` maps
    strings to strings."""
    try:
        doc = json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_unique_keys)
    except _Duplicate as e:
        raise MergetoolError(source, f"header has the key {e.args[0]!r} twice", "the file is corrupt") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MergetoolError(source, f"header is not valid JSON ({e.__class__.__name__})",
                             "the file is corrupt or not safetensors") from None
    if not isinstance(doc, dict):
        raise MergetoolError(source, "header is not a JSON object", "the file is not safetensors")
    meta = doc.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MergetoolError(source, "__metadata__ must be an object mapping strings to strings",
                             "rewrite the metadata with string values")
    specs: dict[str, TensorSpec] = {}
    for name, info in doc.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise MergetoolError(source, f"tensor {name!r} has a malformed header entry "
                                 "(an object with dtype, shape and data_offsets)", "the file is corrupt")
        dt = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            shown = info["dtype"] if isinstance(info["dtype"], str) else json.dumps(info["dtype"])[:40]
            raise MergetoolError(source, f"tensor {name!r} has unsupported dtype {shown!r}",
                                 f"use one of {', '.join(DTYPES)}")
        shape, offs = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_json_int(d) and d >= 0 for d in shape):
            raise MergetoolError(source, f"tensor {name!r}: shape must be a list of non-negative integers, got "
                                 f"{json.dumps(shape)[:60]}", "the file is corrupt")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_json_int(o) and o >= 0 for o in offs)
                or offs[1] < offs[0]):
            raise MergetoolError(source, f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                 f"got {json.dumps(offs)[:60]}", "the file is corrupt")
        if offs[1] - offs[0] != math.prod(shape) * dtype_size(dt):
            raise MergetoolError(source, f"tensor {name!r}: data_offsets do not match shape {shape}",
                                 "the file is corrupt")
        specs[name] = TensorSpec(name, dt, tuple(shape), offs[0], offs[1])
    end, prev = 0, None
    for s in sorted(specs.values(), key=lambda s: (s.start, s.end)):
        if s.start != end:
            why = (f"tensor {s.name!r} (bytes {s.start}-{s.end}) overlaps {prev!r}" if s.start < end else
                   f"a gap of {s.start - end} bytes before tensor {s.name!r} (bytes {s.start}-{s.end})")
            raise MergetoolError(source, f"data_offsets: {why}",
                                 "the tensors' byte ranges must cover the data from 0 without gaps or overlaps")
        end, prev = s.end, s.name
    return Header(specs, dict(meta), len(raw))


def parse_header(prefix: bytes, available: int, source: str) -> Header:
    """Validate the header at the start of ``prefix``; ``available`` is how many bytes the blob may span."""
    if available < 8 or len(prefix) < 8:
        raise MergetoolError(source, f"truncated safetensors ({available} bytes, a header needs 8)",
                             "pass a complete .safetensors file")
    (n,) = struct.unpack("<Q", prefix[:8])
    _check_header_len(n, available, source)
    if len(prefix) < 8 + n:
        raise MergetoolError(source, "truncated header", "pass a complete .safetensors file")
    h = parse_header_json(prefix[8:8 + n], source)
    _check_data_fits(h, available, source)
    return h


def _check_data_fits(h: Header, available: int | None, source: str) -> None:
    if available is not None and h.total_len > available:
        raise MergetoolError(source, f"tensor data ends at byte {h.total_len}, beyond the file ({available} bytes)",
                             "the file is truncated")


@dataclass
class Blob:
    """One safetensors blob: its tensors (on the CPU) and its ``__metadata__``."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""


def _tensors_from(buf, h: Header, data_at: int) -> dict[str, torch.Tensor]:
    """Views of ``buf`` (any writable buffer), whose data section starts at ``data_at``; no copy."""
    out = {}
    for name, s in h.specs.items():
        n = math.prod(s.shape)
        if n == 0:
            out[name] = torch.empty(s.shape, dtype=s.dtype)
            continue
        out[name] = torch.frombuffer(buf, dtype=s.dtype, count=n, offset=data_at + s.start).reshape(s.shape)
    return out


def split_blobs(buf: bytearray, source: str) -> list[Blob]:
    """Split a buffer of concatenated safetensors blobs (their tensors are views of ``buf``)."""
    blobs, pos = [], 0
    view = memoryview(buf)
    while pos < len(buf):
        label = source if pos == 0 else f"{source} (blob {len(blobs) + 1})"
        avail = len(buf) - pos
        if avail < 8:
            raise MergetoolError(label, f"truncated safetensors ({avail} bytes, a header needs 8)",
                                 "pass a complete .safetensors file")
        (n,) = struct.unpack("<Q", view[pos:pos + 8])
        _check_header_len(n, avail, label)
        h = parse_header_json(view[pos + 8:pos + 8 + n], label)
        _check_data_fits(h, avail, label)
        blobs.append(Blob(_tensors_from(buf, h, pos + h.data_start), h.metadata, label))
        pos += h.total_len
    if not blobs:
        raise MergetoolError(source, "empty input (no safetensors blob)", "pipe an adapter or pass a file")
    return blobs


def _alloc(n: int, source: str) -> torch.Tensor:
    """An uninitialised byte buffer for a blob's data section: nothing is written to it before its bytes are read,
    so an unsized stream that lies about its length costs address space, not memory."""
    try:
        return torch.empty(n, dtype=torch.uint8)
    except (RuntimeError, MemoryError):
        raise MergetoolError(source, f"its header asks for {n} bytes of tensor data, which cannot be allocated",
                             "the input is corrupt, or too large for this machine") from None


def _read_exact(f: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream; read in pieces, so memory follows the bytes read."""
    if n <= 1 << 20:
        out = f.read(n)
        while out is not None and len(out) < n:  # a pipe or raw stream may return short reads
            more = f.read(n - len(out))
            if not more:
                break
            out += more
        return out or b""
    parts = bytearray()
    while len(parts) < n:
        more = f.read(min(n - len(parts), 1 << 20))
        if not more:
            break
        parts += more
    return bytes(parts)


def _readinto_exact(f: IO[bytes], view: memoryview) -> int:
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            break
        got += k
    return got


def _stream_size(f: IO[bytes]) -> int | None:
    """Bytes left in ``f`` when it is a regular file (or an in-memory stream), else None (a pipe, a device)."""
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(st.st_size - f.tell(), 0)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        pass
    try:
        if f.seekable():
            here = f.tell()
            end = f.seek(0, os.SEEK_END)
            f.seek(here)
            return end - here
    except (OSError, AttributeError, ValueError):
        pass
    return None


def _read_stream(f: IO[bytes], source: str) -> list[Blob]:
    """Read concatenated blobs from a stream, blob by blob: 8 bytes, the header (validated), then exactly the
    data section into one buffer. Lengths are checked against the stream's size when it has one."""
    left = _stream_size(f)
    blobs: list[Blob] = []
    try:
        while left is None or left > 0:
            label = source if not blobs else f"{source} (blob {len(blobs) + 1})"
            first = _read_exact(f, 8)
            if not first:
                break
            if len(first) < 8:
                raise MergetoolError(label, f"truncated safetensors ({len(first)} bytes, a header needs 8)",
                                     "pass a complete .safetensors file")
            (n,) = struct.unpack("<Q", first)
            _check_header_len(n, left, label)
            raw = _read_exact(f, n)
            if len(raw) < n:
                raise MergetoolError(label, f"truncated header ({len(raw)} of {n} bytes)",
                                     "pass a complete .safetensors file")
            h = parse_header_json(raw, label)
            _check_data_fits(h, left, label)
            data = _alloc(h.data_len, label)
            got = _readinto_exact(f, memoryview(data.numpy()))
            if got < h.data_len:
                raise MergetoolError(label, f"truncated: the tensor data holds {got} of {h.data_len} bytes",
                                     "pass a complete .safetensors file")
            blobs.append(Blob(_tensors_from(data.numpy(), h, 0), h.metadata, label))
            if left is not None:
                left -= h.total_len
    except OSError as e:
        raise MergetoolError(source, f"cannot read ({e.strerror or e.__class__.__name__})") from None
    if not blobs:
        raise MergetoolError(source, "empty input (no safetensors blob)", "pipe an adapter or pass a file")
    return blobs


def stdin_binary() -> IO[bytes]:
    """stdin as a binary stream; refused when it is a terminal (or closed)."""
    if sys.stdin is None:
        raise UsageError("-", "stdin is closed", "pipe data in or pass a file")
    if sys.stdin.isatty():
        raise UsageError("-", "refusing to read data from a terminal", "pipe data in or pass a file")
    return sys.stdin.buffer


def _open_input(src: str) -> IO[bytes]:
    try:
        return open(src, "rb")
    except FileNotFoundError:
        raise MergetoolError(src, "no such file", "check the path") from None
    except IsADirectoryError:
        raise MergetoolError(src, "is a directory", "pass a file") from None
    except OSError as e:
        raise MergetoolError(src, f"cannot read ({e.strerror})") from None


def read_blobs(src: str) -> list[Blob]:
    """Read every blob of a safetensors file, or of stdin for ``-``, one blob at a time."""
    if src == "-":
        return _read_stream(stdin_binary(), "<stdin>")
    with _open_input(src) as f:
        return _read_stream(f, src)


def load_pickle_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A pickled state dict (``.bin``/``.pt``), only ever behind ``--allow-pickle``: ``torch.load`` with
    ``weights_only=True`` (no arbitrary objects are built), and it must hold a dict of tensors. Every failure
    is one line, without torch's advice to load it unsafely."""
    import pickle
    import re
    import warnings

    src = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MergetoolError(src, "no such file", "check the path") from None
    except pickle.UnpicklingError as e:
        text = str(e)
        g = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported global: ([\w.]+)", text)
        why = (f"holds a pickled {g.group(1)} object, which a weights-only load refuses" if g else
               "is not a pickle of tensors that a weights-only load accepts")
        raise MergetoolError(src, why, "re-save its tensors as safetensors") from None
    except Exception as e:  # noqa: BLE001 (corrupt archives, foreign formats: torch raises many types)
        raise MergetoolError(src, f"cannot be read as a torch checkpoint ({e.__class__.__name__})",
                             "re-save its tensors as safetensors") from None
    if not isinstance(obj, dict):
        raise MergetoolError(src, f"holds a {type(obj).__name__}, not a dict of tensors",
                             "pass a state dict (name -> tensor)")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise MergetoolError(src, f"entry {str(k)[:60]!r} is a {type(v).__name__}, not a tensor",
                                 "pass a state dict (name -> tensor)")
    return dict(obj)


class LazySafetensors:
    """A safetensors file read tensor by tensor with plain reads (no mmap, so resident memory stays
    at one tensor, and no unpickling).  Used to stream full models."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with _open_input(self.path) as f:
            size = os.fstat(f.fileno()).st_size
            first = f.read(8)
            if len(first) < 8:
                raise MergetoolError(self.path, f"truncated safetensors ({size} bytes, a header needs 8)",
                                     "pass a complete .safetensors file")
            (n,) = struct.unpack("<Q", first)
            _check_header_len(n, size, self.path)
            raw = f.read(n)
            if len(raw) < n:
                raise MergetoolError(self.path, f"truncated header ({len(raw)} of {n} bytes)",
                                     "pass a complete .safetensors file")
            self.header = parse_header_json(raw, self.path)
        _check_data_fits(self.header, size, self.path)

    def keys(self) -> list[str]:
        return list(self.header.specs)

    def spec(self, name: str) -> TensorSpec:
        return self.header.specs[name]

    def read(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, onto ``device``. For CUDA the bytes go through this thread's pinned staging
        buffer (no page faults on fresh host memory, full-speed host-to-device copies)."""
        s = self.header.specs[name]
        n = s.end - s.start
        cuda = torch.device(device).type == "cuda"
        if cuda and n:
            stage = staging(n)
            self._read_into(name, stage.numpy())
            out = torch.empty(s.shape, dtype=s.dtype, device=device)
            out.view(-1).view(torch.uint8).copy_(stage)  # synchronous from pinned memory: stage is free after
            return out
        out = torch.empty(s.shape, dtype=s.dtype)
        if n:
            self._read_into(name, out.view(-1).view(torch.uint8).numpy())
        return out.to(device) if str(device) != "cpu" else out

    def _read_into(self, name: str, view) -> None:
        s = self.header.specs[name]
        with open(self.path, "rb") as f:
            f.seek(self.header.data_start + s.start)
            got = f.readinto(memoryview(view))
        if got != s.end - s.start:
            raise MergetoolError(self.path, f"tensor {name!r} is truncated", "the file is corrupt")


_local = threading.local()


def staging(nbytes: int) -> torch.Tensor:
    """This thread's pinned host buffer, grown to at least ``nbytes`` (uint8, sliced to nbytes)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _local.buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
    return buf[:nbytes]


# ----------------------------------------------------------------------------- writing


def _header_bytes(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, int]:
    h: dict = {}
    if metadata:
        h["__metadata__"] = metadata
    off = 0
    for name, dt, shape in specs:
        n = math.prod(shape) * dtype_size(dt)
        h[name] = {"dtype": DTYPE_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw, off


def background(items: Iterable, depth: int = 2) -> Iterator:
    """Run an iterable in a worker thread, ``depth`` items ahead of the consumer (exceptions re-raised
    in the consumer). Lets tensor work and file writes overlap; both release the GIL."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for x in items:
                if stop.is_set():
                    return
                q.put((None, x))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            q.put((e, None))
            return
        q.put((None, done))

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            err, x = q.get()
            if err is not None:
                raise err
            if x is done:
                return
            yield x
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.01)


def write_blob(fh: IO[bytes], tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
               metadata: dict[str, str], specs: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None,
               finite: bool = True) -> None:
    """Write one safetensors blob. With ``specs`` given up front, ``tensors`` may be a generator of
    (name, tensor) in that order, so huge outputs stream one tensor at a time. With ``finite`` (every output
    of the commands), a floating tensor holding NaN or Inf, an overflow of a narrow output dtype included,
    is an error before its bytes are written."""
    if specs is None:
        tensors = dict(tensors)
        specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    items = tensors.items() if isinstance(tensors, dict) else background(tensors)  # compute ahead of the writes
    head, _ = _header_bytes(specs, metadata)
    fh.write(head)
    expect = iter(specs)
    for name, t in items:
        ename, edt, eshape = next(expect)
        if name != ename or t.dtype != edt or tuple(t.shape) != eshape:
            raise RuntimeError(f"blob writer: got {name} {t.dtype} {tuple(t.shape)}, expected {ename} {edt} {eshape}")
        t = t.detach().contiguous()
        if not t.numel():
            continue
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise MergetoolError(name, f"holds NaN or Inf as {str(t.dtype).removeprefix('torch.')}",
                                 "a value beyond the output dtype's range: write a wider --dtype, or check the "
                                 "inputs and options (weights, λ)")
        if t.is_cuda:  # device -> pinned staging -> file
            raw = t.view(-1).view(torch.uint8)
            stage = staging(raw.numel())
            stage.copy_(raw)
            fh.write(stage.numpy())
        else:
            fh.write(t.view(-1).view(torch.uint8).numpy())  # the buffer itself, no copy


def blob_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str], finite: bool = True) -> bytes:
    import io as _io

    b = _io.BytesIO()
    write_blob(b, tensors, metadata, finite=finite)
    return b.getvalue()


# ----------------------------------------------------------------------------- outputs


def stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def refuse_binary_to_tty(dst: str | None) -> None:
    if (dst is None or dst == "-") and stdout_is_tty():
        raise UsageError("stdout", "refusing to write safetensors to a terminal",
                         "redirect stdout (> out.safetensors) or pass -o FILE")


def _stdout():
    """sys.stdout, refused with one line when fd 1 was closed before the command started (Python then sets
    sys.stdout to None)."""
    if sys.stdout is None:
        raise MergetoolError("stdout", "is closed", "run the command with stdout open (> FILE), or pass -o FILE")
    return sys.stdout


def _stdout_failed(e: Exception) -> MergetoolError:
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
    out = _stdout()
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        raise _stdout_failed(e) from None


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


def _pump(src: IO[bytes], fd: int) -> None:
    """Copy ``src`` to the file descriptor with plain writes (no buffer left behind when one fails)."""
    while True:
        chunk = src.read(1 << 22)
        if not chunk:
            return
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def _copy_to_stdout(src: IO[bytes]) -> None:
    out = _stdout()
    try:
        out.flush()
        try:
            fd = out.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):  # a captured stdout (tests): its buffer
            shutil.copyfileobj(src, out.buffer, 1 << 22)
            out.buffer.flush()
            return
        out.buffer.flush()
        _pump(src, fd)
    except BrokenPipeError:
        raise
    except (OSError, ValueError) as e:
        raise _stdout_failed(e) from None


def _copy_to_path(src: IO[bytes], dst: str) -> None:
    """Write straight into a device, FIFO or magic link: opened for writing, never replaced."""
    try:
        fd = os.open(dst, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise MergetoolError(dst, f"cannot open for writing ({e.strerror})",
                             "check the path and its permissions") from None
    try:
        _pump(src, fd)
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


def refuse_overwriting_inputs(out: str | Path | None, inputs) -> None:
    """A records file written as the run goes (eval, score) that is one of the inputs would destroy it before it
    is read: refused. (Outputs written whole and atomically at the end, such as merge's, may replace an input.)"""
    if out is None or str(out) == "-" or not Path(out).exists():
        return
    for src in inputs:
        if src and src != "-" and Path(src).exists() and os.path.samefile(out, src):
            raise UsageError("-o", f"{out} is the input {src}", "write the records to another file")


def check_output(dst: str | None) -> None:
    """Refuse an output that cannot be written (``-o`` an existing directory, in a missing directory, an empty
    path; stdout closed) with one line, before any work: ``atomic_output`` checks the same when it opens."""
    if dst == "":
        raise UsageError("-o", "is an empty path", "pass a file path, or - for stdout")
    if dst is None or dst == "-":
        _stdout()
    else:
        _output_target(dst)


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
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a finished output gets the usual mode
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
                    _copy_to_stdout(fh)
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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(src: str) -> list[dict]:
    """Read JSONL (``-`` for stdin), line by line. Blank lines, lines that are not UTF-8, not a JSON object or
    longer than MAX_JSONL_LINE, and strings holding a lone surrogate (``"\\udc80"``, which json accepts but no
    text can hold) are errors that name their line."""
    if src == "-":
        return _parse_jsonl(stdin_binary(), "<stdin>")
    with _open_input(src) as f:
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


def write_jsonl_line(obj: dict, fh: IO[str] | None = None) -> None:
    """One JSON object and a newline, flushed, to ``fh`` or stdout (a closed or full stdout is one line)."""
    line = json.dumps(obj, ensure_ascii=False) + "\n"
    if fh is None:
        write_stdout(line)
        return
    fh.write(line)
    fh.flush()
