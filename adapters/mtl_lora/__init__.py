"""`mtl_lora`: MTL-LoRA (arXiv 2410.09437), a shared A, per-task Λ_t and a per-task mixture of shared B_i."""

from .adapter import BoundMtlLora, MtlLoraAdapter, tensor_key
from .config import MtlLoraConfig

__all__ = ["BoundMtlLora", "MtlLoraAdapter", "MtlLoraConfig", "tensor_key"]
