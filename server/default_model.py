"""The model `loraplex serve` runs when no `--base-model` is given.

That is the embedded default checkpoint (`loraplex.default_model`, shipped inside the package) once it has
been built. Until then, a stand-in built here in code, offline, in well under 5 s: a 2-layer
Llama-architecture model with seeded random weights (the same weights in every process, so adapters made
for it stay valid) and a byte-level BPE tokenizer trained in code on a fixed corpus. Its output is
gibberish; it lets the server, the client and the tooling run end to end with no download.
"""

from __future__ import annotations

import functools
import logging
import random
from pathlib import Path

import torch
from torch import nn

from .loader import load_base, resolve_device, resolve_dtype

log = logging.getLogger("loraplex")

DEFAULT_MODEL_NAME = "loraplex-builtin-tiny"
DESCRIPTION = (f"the stand-in default model {DEFAULT_MODEL_NAME} (2-layer Llama, seeded random weights; "
               "pass --base-model for a real model)")

_SEED = 0
_VOCAB_SIZE = 512
_SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
_WORDS = ("the a an of to in on for with and or but not is are was be this that it model adapter task server "
          "token batch rank query answer review sentiment positive negative neutral translate summarize question "
          "film movie book good bad great terrible story plot actor scene music food service price hello world "
          "yes no what why how when where who which one two three four five day night time people").split()


@functools.lru_cache(maxsize=1)
def build_tokenizer():
    """A byte-level BPE tokenizer (any text encodes; 512 ids), trained on a fixed corpus: deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rnd = random.Random(_SEED)
    corpus = [" ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 16))).capitalize() + rnd.choice(".!?,")
              for _ in range(3000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_VOCAB_SIZE, special_tokens=_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1024)


def build_default_model(device: str = "auto", dtype: str | torch.dtype = "auto") -> tuple[nn.Module, object]:
    """(model in eval mode on `device`, tokenizer): the same weights on every call and in every process."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    config.name_or_path = DEFAULT_MODEL_NAME
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's random state
        torch.manual_seed(_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(device=target, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    return model, tokenizer


def embedded_checkpoint() -> Path | None:
    """The directory of the embedded default checkpoint, or None while it has not been built."""
    try:
        from ..default_model import default_model_path
    except ImportError:
        return None
    try:
        return default_model_path()
    except FileNotFoundError:
        return None


def load_default(device: str = "auto", dtype: str | torch.dtype = "auto") -> tuple[nn.Module, object, str]:
    """(model, tokenizer, description) of the default model: the embedded checkpoint, else the stand-in."""
    path = embedded_checkpoint()
    if path is not None:
        model, tokenizer = load_base(str(path), device=device, dtype=dtype)
        return model, tokenizer, f"the embedded default model ({path})"
    log.warning("the embedded default model is not built yet: serving the stand-in %s", DEFAULT_MODEL_NAME)
    model, tokenizer = build_default_model(device, dtype)
    return model, tokenizer, DESCRIPTION


__all__ = ["DEFAULT_MODEL_NAME", "DESCRIPTION", "build_default_model", "build_tokenizer", "embedded_checkpoint",
           "load_default"]
