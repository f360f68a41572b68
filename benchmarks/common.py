"""What every benchmark records beside its figures: the machine it ran on, and device synchronisation."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def pick(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def machine(dev, packages=("transformers", "peft")) -> dict:
    """CPU model, core count, GPU, Python and package versions."""
    cpu = None
    if Path("/proc/cpuinfo").exists():
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
    out = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "cpu": cpu or platform.processor(),
           "gpu": torch.cuda.get_device_name(dev) if torch.device(dev).type == "cuda" else None}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out
