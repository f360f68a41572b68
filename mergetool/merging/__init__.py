"""Merges that use data: the statistics a data-aware method reads from the model on dev examples (RegMean's
Grams, Fisher diagonals, AdaMerging's and LoraHub's coefficients), and ``auto``, the search for the best merge
of a pool on dev examples. The merge formulas themselves are pure methods (``methods.dataaware``)."""

from .core import (COLLECTORS, KINDS, DataOptions, check_data_options, merge_on_data, merge_with_data, read_dev,
                   statistics)
from .data import DevData, dev_data, holdout_split

__all__ = ["COLLECTORS", "KINDS", "DataOptions", "DevData", "check_data_options", "dev_data", "holdout_split",
           "merge_on_data", "merge_with_data", "read_dev", "statistics"]
