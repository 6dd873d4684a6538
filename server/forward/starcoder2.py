"""Forward of StarCoder2 over the slot KV cache: a Llama-family decoder with LayerNorms, biases on every linear
layer, a GELU MLP (`c_fc`, `c_proj`, inside HF's module) and the config's sliding window on every layer."""

from __future__ import annotations

from torch import nn

from .llama import LlamaFamilyForward

MODEL_TYPES = ("starcoder2",)


class Starcoder2Forward(LlamaFamilyForward):
    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.windows = [model.config.sliding_window] * self.num_layers
