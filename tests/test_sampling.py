"""Sampling (greedy, temperature, top-k, top-p, seeds), parameter checks, detokenization and stop strings."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizer import build_tokenizer

from loraplex.server.detokenize import ByteLevelDecoder, Detokenizers, TextStream, WindowDecoder
from loraplex.server.request import InvalidRequestError, SamplingParams
from loraplex.server.sampling import RowSampler, sample, validate


def sampler(temperature=1.0, top_k=0, top_p=0.0, seed=0) -> RowSampler:
    return RowSampler.create(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed), "cpu")


def test_greedy_is_argmax():
    logits = torch.randn(5, 50)
    out = sample(logits, [sampler(temperature=0.0)] * 5)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    rows = [sampler(0.0), sampler(1.0, seed=1), sampler(0.0), sampler(2.0, seed=2)]
    out = sample(logits, rows)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_limits_the_support():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(1))
    allowed = set(logits[0].topk(3).indices.tolist())
    seen = {int(sample(logits, [sampler(5.0, top_k=3, seed=s)])) for s in range(200)}
    assert seen == allowed  # high temperature: every allowed token shows up, nothing else does


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    seen = {int(sample(logits, [sampler(1.0, top_p=0.7, seed=s)])) for s in range(300)}
    assert seen == {0, 1}
    seen = {int(sample(logits, [sampler(1.0, top_p=0.5, seed=s)])) for s in range(100)}
    assert seen == {0}
    seen = {int(sample(logits, [sampler(1.0, top_p=0.0, seed=s)])) for s in range(400)}
    assert seen == {0, 1, 2, 3}  # 0 means off


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None]
    s = sampler(1.0, seed=123)
    counts = torch.bincount(torch.stack([sample(logits, [s]) for _ in range(3000)]).flatten(), minlength=3)
    freq = counts.float() / 3000
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_same_seed_same_tokens_whatever_the_batch():
    gen = torch.Generator().manual_seed(4)
    logits = [torch.randn(50, generator=gen) for _ in range(6)]
    alone, s = [], sampler(1.0, seed=42)
    for step in range(6):
        alone.append(int(sample(logits[step][None], [s])))
    batched, s = [], sampler(1.0, seed=42)
    others = [sampler(0.7, seed=7), sampler(0.0), sampler(1.3, top_k=5, seed=9)]
    for step in range(6):
        rows = torch.stack([torch.randn(50), logits[step], torch.randn(50), torch.randn(50)])
        batched.append(int(sample(rows, [others[0], s, others[1], others[2]])[1]))
    assert alone == batched
    different = sampler(1.0, seed=43)
    assert [int(sample(logits[i][None], [different])) for i in range(6)] != alone


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 1.5), ("top_p", -0.1), ("top_k", -1),
    ("top_k", 2.5), ("seed", -1), ("max_new_tokens", -3), ("stop", "x"), ("stop", [""]),
])
def test_invalid_parameters_are_named(field, value):
    with pytest.raises(InvalidRequestError, match=field):
        validate(SamplingParams(**{field: value}))


def test_valid_parameters_pass():
    validate(SamplingParams(max_new_tokens=5, temperature=0.7, top_p=1.0, top_k=500, seed=2**64 - 1, stop=["x"]))


# ---- detokenization ----
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_byte_level_tokenizer_uses_the_table(tok):
    assert Detokenizers(tok).byte_level


@pytest.mark.parametrize("kind", ["table", "window"])
def test_incremental_decoding_equals_decode(tok, kind):
    rnd = random.Random(0)
    for _ in range(100):
        ids = [rnd.randrange(len(tok)) for _ in range(rnd.randint(1, 25))]
        decoder = ByteLevelDecoder(Detokenizers(tok).table) if kind == "table" else WindowDecoder(tok, [5, 6])
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("kind", ["table", "window"])
def test_no_half_characters_are_emitted(tok, kind):
    text = "naïve café 日本語 🙂 über € ж 🚀 the model"  # the last three are not in the vocabulary: bytes
    ids = tok.encode(text)
    decoder = ByteLevelDecoder(Detokenizers(tok).table) if kind == "table" else WindowDecoder(tok, [])
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text
    assert any(p == "" for p in pieces)  # some tokens end mid-character and were held back


def stream_text(tok, text: str, stop: list[str]) -> tuple[list[str], bool]:
    stream = TextStream(Detokenizers(tok).new([]), stop)
    pieces = []
    for token in tok.encode(text):
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            return pieces, True
    pieces.append(stream.finish())
    return pieces, False


def test_stop_string_cuts_before_it(tok):
    pieces, stopped = stream_text(tok, "the model answer stop here", ["answer"])
    assert stopped and "".join(pieces) == "the model "
    pieces, stopped = stream_text(tok, "the model answer", ["zzz", "del an"])  # spans tokens
    assert stopped and "".join(pieces) == "the mo"


def test_text_that_may_start_a_stop_is_held_back(tok):
    stream = TextStream(Detokenizers(tok).new([]), ["model answer"])
    emitted = ""
    for token in tok.encode("the model"):
        piece, stopped = stream.push(token)
        emitted += piece
        assert not stopped
    assert emitted == "the "  # "model" could be the start of the stop string
    assert stream.finish() == "model"  # the request ended otherwise: release it
    pieces, stopped = stream_text(tok, "the model is ok", ["model answer"])
    assert not stopped and "".join(pieces) == "the model is ok"
