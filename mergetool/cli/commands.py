"""Imports every subcommand module so that each registers itself on the app."""

from . import eval, merge, train_expert  # noqa: F401
