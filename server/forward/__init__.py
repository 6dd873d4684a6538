"""The engine's model forward: HF modules run over a packed step and a slot-based KV cache.

    forward = build_forward(model)                  # refuses architectures it does not know
    cache = forward.new_cache(num_slots, max_seq_len)
    step = build_step([SeqRun(prompt_ids, slot=0, past=0, decode=False)], device)
    with adapted.batch(assignments, rows_per_sequence=[len(prompt_ids)]):
        logits = forward(step, cache)               # [sequences, vocab]
"""

from __future__ import annotations

from torch import nn

from . import gemma2, gpt2, gpt_neox, granite, llama, olmo2, phi, phi3, stablelm, starcoder2
from .base import CausalLMForward, UnsupportedModelError
from .step import SeqRun, StepInput, attend, build_step

_FORWARDS = {
    **{t: llama.LlamaFamilyForward for t in llama.MODEL_TYPES},
    **{t: phi3.Phi3Forward for t in phi3.MODEL_TYPES},
    **{t: olmo2.Olmo2Forward for t in olmo2.MODEL_TYPES},
    **{t: gemma2.Gemma2Forward for t in gemma2.MODEL_TYPES},
    **{t: gpt2.GPT2Forward for t in gpt2.MODEL_TYPES},
    **{t: granite.GraniteForward for t in granite.MODEL_TYPES},
    **{t: stablelm.StableLmForward for t in stablelm.MODEL_TYPES},
    **{t: gpt_neox.GPTNeoXForward for t in gpt_neox.MODEL_TYPES},
    **{t: starcoder2.Starcoder2Forward for t in starcoder2.MODEL_TYPES},
    **{t: phi.PhiForward for t in phi.MODEL_TYPES},
}
SUPPORTED_MODEL_TYPES = tuple(_FORWARDS)


def build_forward(model: nn.Module) -> CausalLMForward:
    """The forward for `model` (a HF causal LM, possibly wrapped by AdaptedModel), by `config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_model_type(model_type)
    return _FORWARDS[model_type](model)


def check_model_type(model_type: str | None) -> None:
    if model_type not in _FORWARDS:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; loraplex serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


__all__ = ["CausalLMForward", "SUPPORTED_MODEL_TYPES", "SeqRun", "StepInput", "UnsupportedModelError", "attend",
           "build_forward", "build_step", "check_model_type"]
