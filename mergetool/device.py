"""The one place where a command's device is chosen."""

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
