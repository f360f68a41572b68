"""Imports every subcommand module so that each registers itself on the app."""

from . import diagnose, eval, merge, score, train_expert, weight  # noqa: F401
