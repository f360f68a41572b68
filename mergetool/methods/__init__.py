"""Merge methods: a registry of pure functions over task vectors (``base``, ``registry``) and the engine
that runs them (``engine.merge``: updates, method, options -> one merged update)."""

from .base import METHODS, Method, Params, TaskVectors, register
from .engine import check_inputs, check_options, effective_params, merge, merge_many, merge_stream, to_rank
from .registry import all_methods, get

__all__ = ["METHODS", "Method", "Params", "TaskVectors", "all_methods", "check_inputs", "check_options", "effective_params", "get",
           "merge", "merge_many", "merge_stream", "register", "to_rank"]
