"""loraplex: one base model, many task adapters, batched together."""

__version__ = "0.1.0"
