"""The one place where a command's device is chosen, and how a process that runs a model holds its memory."""

from __future__ import annotations

from .errors import UsageError


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


def keep_freed_memory() -> None:
    """Fixed glibc malloc thresholds for a process that runs a resident model: blocks up to 32 MiB come from
    the heap, and up to 1 GiB of freed heap is kept for reuse instead of being handed back to the system.
    Merging and scoring free and reallocate the same large buffers job after job; with glibc's adaptive
    thresholds a process could hand them back every time and fault them in again, and how often depended on
    the process (a Ray worker running the score benchmark took 27 M page faults and 65 s of system time,
    the same code in a plain process 7 M and 21 s: 25-33% slower). With fixed thresholds both take 6-8 M
    and run within a few percent of each other (BENCHMARKS.md, issue 12). A no-op where the C library has
    no ``mallopt``. Called by ``model.load_model``."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 1 << 30)
