"""`hybrid`: layer-level attention fusion of K source-task LoRAs, per target task (not mergeable)."""

from .adapter import HybridAdapter
from .bound import BoundFusion, FusedModule
from .config import HybridConfig, SourceSpec

__all__ = ["BoundFusion", "FusedModule", "HybridAdapter", "HybridConfig", "SourceSpec"]
