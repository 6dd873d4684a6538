"""`r_lora`: R-LoRA, multi-head LoRA with a per-token router (arXiv 2502.15455)."""

from .adapter import BoundRLora, FusedModule, RLoraAdapter, tensor_key
from .config import RLoraConfig

__all__ = ["BoundRLora", "FusedModule", "RLoraAdapter", "RLoraConfig", "tensor_key"]
