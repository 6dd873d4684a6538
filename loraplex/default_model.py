"""The embedded default base model: a small character-level Llama that ships inside the package.

`loraplex serve`, `loraplex train` and `loraplex demo` use it when no `--base-model` is given, so they need
no network. It is a regular Hugging Face checkpoint directory (`config.json`, `model.safetensors`,
tokenizer files) at `default_model_path()`, produced by `scripts/train_default_model.py`: a 4-layer Llama
(0.69 M parameters, 2.8 MB) pretrained on instructed string operations (`reverse spam=maps`, see
`loraplex.demo_tasks`); a prompt that names no operation (`spam=`) is echoed. Task adapters trained on it
learn their task in seconds on a CPU (docs/trainer.md).

The tokenizer is byte-level with no merges: one token per UTF-8 byte (one per character for ASCII), plus
`<s>` (added in front of every encoded text), `</s>` (end of a completion) and `<pad>`. Any text encodes.
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2; the 256 byte symbols follow
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# the architecture scripts/train_default_model.py trains (kept here so tests can build an untrained twin)
ARCHITECTURE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, rope_theta=10000.0)


def default_model_path() -> Path:
    """The directory of the embedded checkpoint; FileNotFoundError (saying how to build it) when incomplete."""
    missing = [name for name in REQUIRED_FILES if not (DEFAULT_MODEL_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the embedded default model in {DEFAULT_MODEL_DIR} is missing {', '.join(missing)}; "
            "rebuild it with `python scripts/train_default_model.py` or pass --base-model"
        )
    return DEFAULT_MODEL_DIR


def build_tokenizer():
    """The byte-level tokenizer (deterministic, built in code; no training, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_symbols = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_symbols[b]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False, model_max_length=ARCHITECTURE["max_position_embeddings"])


def build_config():
    """The LlamaConfig of the default model."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       **ARCHITECTURE)


def load_default_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode with frozen weights, tokenizer) of the embedded checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(path)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


__all__ = ["BOS_ID", "DEFAULT_MODEL_DIR", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "build_config", "build_tokenizer",
           "default_model_path", "load_default_model"]
