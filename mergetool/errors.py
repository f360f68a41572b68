"""Typed errors. The library raises these; only ``mergetool.cli`` turns them into one line and an exit code."""

from __future__ import annotations


class MergetoolError(Exception):
    """Bad data or a runtime failure (exit 1).

    Rendered as ``mergetool CMD: error: WHAT: WHY; FIX``.
    """

    exit_code = 1

    def __init__(self, what: str, why: str, fix: str | None = None):
        self.what, self.why, self.fix = what, why, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"{self.what}: {self.why}"
        return f"{text}; {self.fix}" if self.fix else text


class UsageError(MergetoolError):
    """A wrong combination of options or arguments (exit 2)."""

    exit_code = 2
