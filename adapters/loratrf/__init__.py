"""`loratrf`: LoRA with a task-aware filter on its features (arXiv 2412.09827; spec §5.2 interim design)."""

from .adapter import BoundLoraTRF, LoraTRFAdapter, TRFFactors, tensor_key, trf_delta
from .config import INTERPRETATION, LoraTRFConfig

__all__ = ["INTERPRETATION", "BoundLoraTRF", "LoraTRFAdapter", "LoraTRFConfig", "TRFFactors", "tensor_key", "trf_delta"]
