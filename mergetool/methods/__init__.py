"""Merge methods: a registry of pure functions over task vectors (see ``base``)."""

from .base import METHODS, Method, Params, TaskVectors, all_methods, check_inputs, get, merge_stream, register, to_rank

__all__ = ["METHODS", "Method", "Params", "TaskVectors", "all_methods", "check_inputs", "get", "merge_stream", "register", "to_rank"]
