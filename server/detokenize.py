"""Incremental detokenization and stop strings: turn one token at a time into text that is safe to stream.

Two rules for streamed text: never emit half a UTF-8 character (a byte-level BPE token can end mid-character),
and never emit text that may turn out to be the start of a stop string (it would have to be taken back).

`Detokenizers(tokenizer)` is built once per engine. For byte-level BPE tokenizers (GPT-2, Llama 3, Qwen,
the benchmark fixture) it precomputes each token's bytes, so a step costs a table lookup and an incremental
UTF-8 decode; any other tokenizer gets the prefix-window algorithm of TGI / vLLM (decode a short window of
ids twice and emit the difference once it no longer ends in U+FFFD).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Protocol

PROMPT_CONTEXT = 4  # prompt ids the window decoder keeps, so that a first token's leading space survives


class TokenDecoder(Protocol):
    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (possibly "")."""

    def flush(self) -> str:
        """The request ended: return whatever is still held (an incomplete character becomes U+FFFD)."""


class Detokenizers:
    """Creates a per-request `TokenDecoder` for one tokenizer (text never includes special tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.table = _byte_table(tokenizer)  # bytes per token id, or None when not byte-level

    @property
    def byte_level(self) -> bool:
        return self.table is not None

    def new(self, prompt_ids: Sequence[int]) -> TokenDecoder:
        if self.table is not None:
            return ByteLevelDecoder(self.table)
        return WindowDecoder(self.tokenizer, prompt_ids)


class ByteLevelDecoder:
    """Token -> bytes by table, bytes -> text by an incremental UTF-8 decoder (which holds partial characters)."""

    def __init__(self, table: list[bytes]) -> None:
        self.table = table
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        piece = self.table[token_id] if 0 <= token_id < len(self.table) else b""
        return self.utf8.decode(piece)

    def flush(self) -> str:
        return self.utf8.decode(b"", final=True)


class WindowDecoder:
    """Generic: decode ids[prefix:] and ids[prefix:read]; the new text is the difference (TGI/vLLM)."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


class TextStream:
    """Per request: tokens in, streamable text out, with stop strings.

    `push` returns (text to emit, stopped). Text that could be the start of a stop string is held back; when
    a stop string completes, the text before it is emitted and the request stops (the stop is not included).
    """

    def __init__(self, decoder: TokenDecoder, stop: Sequence[str]) -> None:
        self.decoder = decoder
        self.stop = [s for s in stop if s]
        self.pending = ""  # decoded, not yet emitted (a possible stop-string prefix)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self._emit(self.pending + self.decoder.push(token_id))

    def finish(self) -> str:
        """The request ended for another reason: release everything held (a stop found now still cuts)."""
        text, _ = self._emit(self.pending + self.decoder.flush(), final=True)
        return text

    def _emit(self, text: str, final: bool = False) -> tuple[str, bool]:
        if not self.stop:
            self.pending = ""
            return text, False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.pending = ""
            return text[:cut], True
        hold = 0 if final else _held_suffix(text, self.stop)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold], False


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = min(len(text), max(len(s) for s in stops) - 1)
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stops):
            return n
    return 0


# ---- byte-level BPE detection ----
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-character map used by every byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_table(tokenizer) -> list[bytes] | None:
    """bytes of every token id when `tokenizer` is a fast tokenizer with a plain ByteLevel decoder, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers import decoders
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    if not isinstance(backend.decoder, decoders.ByteLevel) or backend.normalizer is not None:
        return None
    special = set(tokenizer.all_special_ids)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    size = max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True))
    table: list[bytes] = []
    for token_id in range(size):
        if token_id in special or (token_id in added and added[token_id].special):
            table.append(b"")
        elif token_id in added:
            table.append(added[token_id].content.encode())
        else:
            piece = backend.id_to_token(token_id)
            if piece is None:
                table.append(b"")
                continue
            try:
                table.append(bytes(_UNICODE_TO_BYTE[c] for c in piece))
            except KeyError:  # not a byte-level vocabulary after all
                return None
    return table
