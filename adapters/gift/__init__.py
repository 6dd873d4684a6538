"""`gift`: GIFT, ΔW_ℓ = W_ℓ φ ψ with Θ = (φ, ψ) shared across layers, served as LoRA pairs."""

from .adapter import GiftAdapter, tensor_key
from .config import GiftConfig

__all__ = ["GiftAdapter", "GiftConfig", "tensor_key"]
