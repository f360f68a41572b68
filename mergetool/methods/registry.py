"""The registry: importing this module registers every method family; ``get`` and ``all_methods`` read it."""

from __future__ import annotations

from . import dataaware, families, knots, mergekit_methods, subspace  # noqa: F401  (each module registers its methods on import)
from .base import METHODS, Method, lookup


def get(name: str) -> Method:
    """The method registered as ``name`` (a usage error naming the choices otherwise)."""
    return lookup(name)


def all_methods() -> dict[str, Method]:
    return METHODS
