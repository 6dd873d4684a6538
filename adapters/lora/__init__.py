"""`lora`: plain LoRA; PEFT LoRA checkpoints load unchanged."""

from .adapter import BoundLowRank, LoraAdapter, parse_lora_tensors, tensor_key
from .config import LoraConfig

__all__ = ["BoundLowRank", "LoraAdapter", "LoraConfig", "parse_lora_tensors", "tensor_key"]
