"""The engine's forward equals Hugging Face's own forward: prefill and decode, every supported architecture,
with and without adapters in the batch, over a packed step whose rows are not in slot order."""

from __future__ import annotations

import pytest
import torch
from families import make_adapter
from tiny import ARCHITECTURES, prompts, tiny_model
from transformers import AutoModelForCausalLM, BertConfig, MistralConfig

from loraplex.adapters import AdaptedModel
from loraplex.server.forward import SeqRun, UnsupportedModelError, build_forward, build_step
from loraplex.server.kv_cache import KVCache, SlotTable

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
ATOL = 1e-5


def hf_logits(model, adapted, ids: torch.Tensor, assignment=(None, 0)) -> torch.Tensor:
    """HF's forward of one whole sequence: logits [T, V]."""
    with torch.no_grad(), adapted.batch([assignment], rows_per_sequence=len(ids)):
        return model(ids[None]).logits[0]


def run(forward, adapted, cache, runs, assignments, all_rows=False) -> torch.Tensor:
    step = build_step(runs, "cpu")
    if all_rows:
        step.logits_rows = torch.arange(step.num_rows)
    with torch.no_grad(), adapted.batch(assignments, [len(r.tokens) for r in runs]):
        return forward(step, cache)


@pytest.fixture(scope="module", params=ARCHS)
def setup(request, tmp_path_factory):
    arch = request.param
    model = tiny_model(arch)
    adapted = AdaptedModel(model)
    tmp = tmp_path_factory.mktemp(f"fwd-{arch}")
    lora = adapted.bind(make_adapter("lora", adapted, arch, "lo", tmp, seed=1))
    mtl = adapted.bind(make_adapter("mtl_lora", adapted, arch, "mt", tmp, seed=2))
    return arch, model, adapted, lora, mtl


@pytest.mark.parametrize("with_adapters", [False, True], ids=["base", "adapters"])
def test_prefill_then_decode_match_hf(setup, with_adapters):
    arch, model, adapted, lora, mtl = setup
    forward = build_forward(model)
    cache = forward.new_cache(num_slots=4, max_seq_len=32)
    seqs = prompts([5, 9, 3], seed=7)
    assign = [(lora, 0), (mtl, 2), (None, 0)] if with_adapters else [(None, 0)] * 3
    # prefill: all three prompts packed into one step; every row's logits are compared
    out = run(forward, adapted, cache, [SeqRun(s.tolist(), i, 0, False) for i, s in enumerate(seqs)], assign,
              all_rows=True)
    start = 0
    for s, a in zip(seqs, assign):
        ref = hf_logits(model, adapted, s, a)
        torch.testing.assert_close(out[start:start + len(s)], ref, atol=ATOL, rtol=0)
        start += len(s)
    # decode four tokens, rows in a different order from the slots every step
    gen = torch.Generator().manual_seed(3)
    for step in range(4):
        nxt = torch.randint(3, model.config.vocab_size, (3,), generator=gen)
        seqs = [torch.cat([s, t[None]]) for s, t in zip(seqs, nxt)]
        order = [2, 0, 1] if step % 2 == 0 else [1, 2, 0]
        runs = [SeqRun([int(nxt[i])], i, len(seqs[i]) - 1, True) for i in order]
        out = run(forward, adapted, cache, runs, [assign[i] for i in order])
        for row, i in enumerate(order):
            ref = hf_logits(model, adapted, seqs[i], assign[i])[-1]
            torch.testing.assert_close(out[row], ref, atol=ATOL, rtol=0)


def test_decode_and_prefill_share_a_step(setup):
    """A running sequence decodes while a new prompt is prefilled in the same forward."""
    arch, model, adapted, lora, mtl = setup
    forward = build_forward(model)
    cache = forward.new_cache(num_slots=2, max_seq_len=32)
    a, b = prompts([6, 4], seed=11)
    run(forward, adapted, cache, [SeqRun(a.tolist(), 0, 0, False)], [(mtl, 1)])
    a = torch.cat([a, torch.tensor([5])])
    out = run(forward, adapted, cache, [SeqRun(b.tolist(), 1, 0, False), SeqRun([5], 0, 6, True)],
              [(lora, 0), (mtl, 1)])
    torch.testing.assert_close(out[0], hf_logits(model, adapted, b, (lora, 0))[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], hf_logits(model, adapted, a, (mtl, 1))[-1], atol=ATOL, rtol=0)


def test_prompt_in_two_chunks_equals_one(setup):
    arch, model, adapted, lora, mtl = setup
    forward = build_forward(model)
    cache = forward.new_cache(num_slots=1, max_seq_len=32)
    (p,) = prompts([10], seed=5)
    run(forward, adapted, cache, [SeqRun(p[:6].tolist(), 0, 0, False)], [(lora, 0)])
    out = run(forward, adapted, cache, [SeqRun(p[6:].tolist(), 0, 6, False)], [(lora, 0)], all_rows=True)
    torch.testing.assert_close(out, hf_logits(model, adapted, p, (lora, 0))[6:], atol=ATOL, rtol=0)


def test_sliding_window_matches_hf():
    torch.manual_seed(0)
    config = MistralConfig(**{**ARCHITECTURES["llama"]().to_dict(), "sliding_window": 4, "model_type": "mistral"})
    model = AutoModelForCausalLM.from_config(config).eval()
    adapted = AdaptedModel(model)
    forward = build_forward(model)
    assert forward.windows == [4, 4]
    cache = forward.new_cache(num_slots=2, max_seq_len=32)
    a, b = prompts([9, 3], seed=2)
    out = run(forward, adapted, cache, [SeqRun(a.tolist(), 0, 0, False), SeqRun(b.tolist(), 1, 0, False)],
              [(None, 0)] * 2, all_rows=True)
    torch.testing.assert_close(out[:9], hf_logits(model, adapted, a), atol=ATOL, rtol=0)
    for t in range(3):  # decodes past the window, with two different lengths in the batch
        a, b = torch.cat([a, torch.tensor([7 + t])]), torch.cat([b, torch.tensor([9 + t])])
        out = run(forward, adapted, cache, [SeqRun([7 + t], 0, len(a) - 1, True), SeqRun([9 + t], 1, len(b) - 1, True)],
                  [(None, 0)] * 2)
        torch.testing.assert_close(out[0], hf_logits(model, adapted, a)[-1], atol=ATOL, rtol=0)
        torch.testing.assert_close(out[1], hf_logits(model, adapted, b)[-1], atol=ATOL, rtol=0)


class _Owner:
    def __init__(self, kv_len: int) -> None:
        self.slot, self.kv_len = -1, kv_len


def test_slot_compaction_keeps_the_moved_sequence_intact():
    model = tiny_model("llama")
    adapted = AdaptedModel(model)
    forward = build_forward(model)
    cache = forward.new_cache(num_slots=3, max_seq_len=16)
    table = SlotTable(cache)
    seqs = prompts([4, 5, 6], seed=9)
    owners = [_Owner(len(s)) for s in seqs]
    for o in owners:
        table.add(o)
    run(forward, adapted, cache, [SeqRun(s.tolist(), o.slot, 0, False) for s, o in zip(seqs, owners)], [(None, 0)] * 3)
    table.remove(owners[0])  # the sequence in slot 2 moves into slot 0
    assert owners[2].slot == 0 and owners[1].slot == 1 and owners[0].slot == -1 and table.free == 1
    c = torch.cat([seqs[2], torch.tensor([8])])
    out = run(forward, adapted, cache, [SeqRun([8], 0, 6, True), SeqRun([3], 1, 5, True)], [(None, 0)] * 2)
    torch.testing.assert_close(out[0], hf_logits(model, adapted, c)[-1], atol=ATOL, rtol=0)
    assert table.tokens_in_use() == 11


def test_cache_is_bounded_and_accounted():
    cache = KVCache(num_layers=2, num_slots=3, kv_heads=2, max_seq_len=16, head_dim=8, device="cpu",
                    dtype=torch.float32)
    assert cache.token_bytes == 2 * 2 * 2 * 8 * 4
    assert cache.nbytes == cache.token_bytes * 3 * 16 == sum(t.numel() * 4 for t in cache.k + cache.v)
    table = SlotTable(cache)
    for _ in range(3):
        table.add(_Owner(1))
    with pytest.raises(RuntimeError):
        table.add(_Owner(1))


def test_decode_slots_must_be_packed():
    with pytest.raises(ValueError, match="decode slots"):
        build_step([SeqRun([1], 1, 3, True)], "cpu")


def test_unsupported_architecture_is_refused_by_name():
    from transformers import BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3, gpt2"):
        build_forward(model)
