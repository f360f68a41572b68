"""mergetool: merge, evaluate, score and diagnose LoRA adapters of one base model."""

__version__ = "0.1.0"
