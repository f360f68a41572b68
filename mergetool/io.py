"""Safetensors blobs and streams, JSONL, atomic outputs, TTY guards.

Stream framing (docs/formats.md): several adapters on one stream are concatenated safetensors
blobs. A blob is self-delimiting: 8-byte little-endian header length N, N bytes of JSON header, then
data up to the largest ``data_offsets`` end. A file may hold one blob or several.

Nothing here unpickles: only safetensors and JSON are ever parsed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

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


def parse_header(prefix: bytes, available: int, source: str) -> Header:
    """Validate the header at the start of ``prefix``; ``available`` is how many bytes the blob may span."""
    if available < 8:
        raise MergetoolError(source, f"truncated safetensors ({available} bytes, a header needs 8)",
                             "pass a complete .safetensors file")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER or 8 + n > available:
        raise MergetoolError(source, f"header length {n} is beyond the file ({available} bytes)",
                             "the file is truncated or not safetensors")
    if len(prefix) < 8 + n:
        raise MergetoolError(source, "truncated header", "pass a complete .safetensors file")
    try:
        raw = json.loads(prefix[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergetoolError(source, f"header is not valid JSON ({e.__class__.__name__})",
                             "the file is corrupt or not safetensors") from None
    if not isinstance(raw, dict):
        raise MergetoolError(source, "header is not a JSON object", "the file is not safetensors")
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise MergetoolError(source, "__metadata__ must map strings to strings",
                             "rewrite the metadata with string values")
    specs: dict[str, TensorSpec] = {}
    for name, info in raw.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise MergetoolError(source, f"tensor {name!r} has a malformed header entry",
                                 "the file is corrupt")
        dt = DTYPES.get(info["dtype"])
        if dt is None:
            raise MergetoolError(source, f"tensor {name!r} has unsupported dtype {info['dtype']!r}",
                                 f"use one of {', '.join(DTYPES)}")
        shape, offs = info["shape"], info["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and o >= 0 for o in offs) or offs[1] < offs[0]):
            raise MergetoolError(source, f"tensor {name!r} has a malformed shape or data_offsets",
                                 "the file is corrupt")
        if offs[1] - offs[0] != math.prod(shape) * dtype_size(dt):
            raise MergetoolError(source, f"tensor {name!r}: data_offsets do not match shape {shape}",
                                 "the file is corrupt")
        specs[name] = TensorSpec(name, dt, tuple(shape), offs[0], offs[1])
    h = Header(specs, dict(meta), n)
    if h.total_len > available:
        raise MergetoolError(source, f"tensor data ends at byte {h.total_len}, beyond the file ({available} bytes)",
                             "the file is truncated")
    return h


@dataclass
class Blob:
    """One safetensors blob: its tensors (on the CPU) and its ``__metadata__``."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""


def _tensors_from(buf: bytearray | memoryview, h: Header, base: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, s in h.specs.items():
        n = math.prod(s.shape)
        if n == 0:
            out[name] = torch.empty(s.shape, dtype=s.dtype)
            continue
        out[name] = torch.frombuffer(buf, dtype=s.dtype, count=n, offset=base + h.data_start + s.start).reshape(s.shape)
    return out


def split_blobs(buf: bytearray, source: str) -> list[Blob]:
    """Split a buffer of concatenated safetensors blobs."""
    blobs, pos = [], 0
    while pos < len(buf):
        label = source if pos == 0 else f"{source} (blob {len(blobs) + 1})"
        h = parse_header(bytes(buf[pos:pos + 8 + _peek_len(buf, pos)]), len(buf) - pos, label)
        blobs.append(Blob(_tensors_from(buf, h, pos), h.metadata, label))
        pos += h.total_len
    if not blobs:
        raise MergetoolError(source, "empty input (no safetensors blob)", "pipe an adapter or pass a file")
    return blobs


def _peek_len(buf: bytearray, pos: int) -> int:
    if len(buf) - pos < 8:
        return 0
    (n,) = struct.unpack("<Q", bytes(buf[pos:pos + 8]))
    return min(n, MAX_HEADER)


def read_stdin_bytes() -> bytearray:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("-", "refusing to read data from a terminal", "pipe data in or pass a file")
    return bytearray(sys.stdin.buffer.read())


def read_blobs(src: str) -> list[Blob]:
    """Read every blob of a safetensors file, or of stdin for ``-``."""
    if src == "-":
        return split_blobs(read_stdin_bytes(), "<stdin>")
    p = Path(src)
    try:
        buf = bytearray(p.read_bytes())
    except FileNotFoundError:
        raise MergetoolError(src, "no such file", "check the path") from None
    except IsADirectoryError:
        raise MergetoolError(src, "is a directory", "pass a file") from None
    except OSError as e:
        raise MergetoolError(src, f"cannot read ({e.strerror})") from None
    return split_blobs(buf, src)


class LazySafetensors:
    """A safetensors file read tensor by tensor with plain reads (no mmap, so resident memory stays
    at one tensor, and no unpickling).  Used to stream full models."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            first = f.read(8)
            n = struct.unpack("<Q", first)[0] if len(first) == 8 else 0
            prefix = first + f.read(min(n, MAX_HEADER)) if n <= MAX_HEADER else first
        self.header = parse_header(prefix, size, self.path)

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
               metadata: dict[str, str], specs: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None) -> None:
    """Write one safetensors blob. With ``specs`` given up front, ``tensors`` may be a generator of
    (name, tensor) in that order, so huge outputs stream one tensor at a time."""
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
        if t.is_cuda:  # device -> pinned staging -> file
            raw = t.view(-1).view(torch.uint8)
            stage = staging(raw.numel())
            stage.copy_(raw)
            fh.write(stage.numpy())
        else:
            fh.write(t.view(-1).view(torch.uint8).numpy())  # the buffer itself, no copy


def blob_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    import io as _io

    b = _io.BytesIO()
    write_blob(b, tensors, metadata)
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


@contextlib.contextmanager
def atomic_output(dst: str | None) -> Iterator[IO[bytes]]:
    """Yield a binary file handle; on success the data lands at ``dst`` (renamed into place) or is
    copied to stdout (``None`` or ``-``). On failure nothing is left behind and nothing is written."""
    to_stdout = dst is None or dst == "-"
    d = None if to_stdout else (os.path.dirname(os.path.abspath(dst)) or ".")
    if d is not None and not os.path.isdir(d):
        raise MergetoolError(dst, "its directory does not exist", "create it first")
    fd, tmp = tempfile.mkstemp(prefix=".mergetool-", suffix=".tmp", dir=d)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a finished output gets the usual mode
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            if to_stdout:
                fh.seek(0)
                out = sys.stdout.buffer
                shutil.copyfileobj(fh, out, 1 << 22)
                out.flush()
        if not to_stdout:
            os.replace(tmp, dst)
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
    """Read JSONL (``-`` for stdin). Blank lines are errors; each error names its line number."""
    if src == "-":
        text = read_stdin_bytes().decode("utf-8", errors="replace")
        name = "<stdin>"
    else:
        try:
            text = Path(src).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MergetoolError(src, "no such file", "check the path") from None
        except (OSError, UnicodeDecodeError) as e:
            raise MergetoolError(src, f"cannot read ({e})") from None
        name = src
    rows = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise MergetoolError(f"{name}:{i}", "empty line", "remove blank lines from the JSONL")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MergetoolError(f"{name}:{i}", f"malformed JSON ({e.msg})", "one JSON object per line") from None
        if not isinstance(obj, dict):
            raise MergetoolError(f"{name}:{i}", "not a JSON object", "one JSON object per line")
        rows.append(obj)
    if not rows:
        raise MergetoolError(name, "no records", "pass a non-empty JSONL file")
    return rows


def write_jsonl_line(obj: dict, fh: IO[str] | None = None) -> None:
    fh = fh or sys.stdout
    fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    fh.flush()
