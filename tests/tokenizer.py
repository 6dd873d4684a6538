"""An offline byte-level BPE tokenizer for engine tests, trained in code (as bench/make_fixture.py does).

Its vocabulary (`VOCAB_SIZE` ids: 3 specials, the 256 byte symbols, then merges) is larger than tiny.py's
VOCAB, so engine tests build their tiny models with `vocab_size=len(tokenizer)` (see `lm`).
"""

from __future__ import annotations

import functools
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tiny import ARCHITECTURES

VOCAB_SIZE = 320
SPECIALS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
WORDS = ["the", "model", "adapter", "task", "token", "batch", "rank", "query", "answer", "café", "naïve",
         "über", "日本", "語", "🙂", "ok", "a", "b", "stop", "end"]


def _corpus():
    rnd = random.Random(0)
    for _ in range(2000):
        yield " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(2, 10))) + "."


@functools.lru_cache(maxsize=1)
def build_tokenizer() -> PreTrainedTokenizerFast:
    """The same tokenizer on every call (cached); deterministic across runs."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def lm(arch: str = "llama", seed: int = 0, peak: float = 1.0) -> torch.nn.Module:
    """A tiny.py model of `arch` sized for `build_tokenizer()`, in eval mode.

    peak > 1 scales the output head so that greedy choices are far from ties (token-exact comparisons
    across batch compositions); for GPT-2 the head is tied to the input embedding, which is fine."""
    torch.manual_seed(seed)
    config = ARCHITECTURES[arch]()
    config.vocab_size = len(build_tokenizer())
    config.eos_token_id, config.bos_token_id, config.pad_token_id = 1, 0, 2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if peak != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(peak)
    return model
