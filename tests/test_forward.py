"""The engine's forward equals Hugging Face's own forward: prefill and decode, every supported architecture,
with and without adapters in the batch, over a packed step whose rows are not in slot order."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from families import make_adapter
from tiny import ARCHITECTURES, TARGETS, prompts, tiny_model
from tokenizer import build_tokenizer, lm
from transformers import AutoModelForCausalLM, BertConfig, GemmaConfig, LlamaConfig, MistralConfig

from loraplex.adapters import AdaptedModel, load_adapter
from loraplex.server.engine import Engine, EngineConfig
from loraplex.server.forward import SeqRun, UnsupportedModelError, build_forward, build_step
from loraplex.server.kv_cache import KVCache, SlotTable
from loraplex.server.manager import AdapterManager
from loraplex.server.request import SamplingParams

# these also go through the engine here (test_engine.py serves llama and gpt2)
ENGINE_ARCHS = ["gemma", "phi3", "olmo2", "gemma2", "gemma3_text", "granite", "stablelm", "gpt_neox", "starcoder2",
                "phi"]
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gpt2", *ENGINE_ARCHS]
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


def test_equal_prompts_side_by_side_attend_as_one_block(setup):
    """Three prompts of one length in consecutive rows (slots out of order) are one attention call per layer
    (Gemma-2's soft-capping takes them one by one); every row, and a decode after them, equal HF's forward."""
    arch, model, adapted, lora, mtl = setup
    forward = build_forward(model)
    cache = forward.new_cache(num_slots=5, max_seq_len=32)
    seqs = prompts([5, 5, 5, 3, 5], seed=13)
    slots = [3, 0, 2, 1, 4]
    assign = [(lora, 0), (None, 0), (mtl, 1), (lora, 0), (mtl, 2)]
    runs = [SeqRun(s.tolist(), slot, 0, False) for s, slot in zip(seqs, slots)]
    step = build_step(runs, "cpu")
    assert [(b.row, b.length, b.slots) for b in step.blocks] == [(0, 5, (3, 0, 2))]
    assert [seg.row for seg in step.segments] == [15, 18]  # the shorter prompt, and the one after it
    out = run(forward, adapted, cache, runs, assign, all_rows=True)
    start = 0
    for s, a in zip(seqs, assign):
        torch.testing.assert_close(out[start:start + len(s)], hf_logits(model, adapted, s, a), atol=ATOL, rtol=0)
        start += len(s)
    seqs = [torch.cat([s, torch.tensor([4])]) for s in seqs]
    by_slot = sorted(range(5), key=lambda i: slots[i])  # decodes need their slots packed: 0..4
    out = run(forward, adapted, cache, [SeqRun([4], slots[i], len(seqs[i]) - 1, True) for i in by_slot],
              [assign[i] for i in by_slot])
    for row, i in enumerate(by_slot):
        torch.testing.assert_close(out[row], hf_logits(model, adapted, seqs[i], assign[i])[-1], atol=ATOL, rtol=0)


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


@pytest.mark.parametrize("arch, options", [
    ("stablelm", dict(use_parallel_residual=False, qk_layernorm=False, use_qkv_bias=False)),  # StableLM-3B/2-1.6B
    ("gpt_neox", dict(use_parallel_residual=False)),
    ("phi", dict(qk_layernorm=False)),  # Phi-1/1.5/2
], ids=["stablelm-sequential", "gpt_neox-sequential", "phi-no-qk-norm"])
def test_optional_layouts_match_hf(arch, options):
    """The other side of each option the tiny.py config sets: prefill then decode equal HF's forward."""
    torch.manual_seed(0)
    config = ARCHITECTURES[arch]()
    for key, value in options.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapted = AdaptedModel(model)
    forward = build_forward(model)
    cache = forward.new_cache(num_slots=2, max_seq_len=32)
    a, b = prompts([7, 4], seed=8)
    out = run(forward, adapted, cache, [SeqRun(a.tolist(), 0, 0, False), SeqRun(b.tolist(), 1, 0, False)],
              [(None, 0)] * 2, all_rows=True)
    torch.testing.assert_close(out[:7], hf_logits(model, adapted, a), atol=ATOL, rtol=0)
    a, b = torch.cat([a, torch.tensor([5])]), torch.cat([b, torch.tensor([6])])
    out = run(forward, adapted, cache, [SeqRun([6], 1, 4, True), SeqRun([5], 0, 7, True)], [(None, 0)] * 2)
    torch.testing.assert_close(out, torch.stack([hf_logits(model, adapted, b)[-1], hf_logits(model, adapted, a)[-1]]),
                               atol=ATOL, rtol=0)


# float32 on CPU takes decode attention's explicit matmuls; any other dtype (float64 here) takes SDPA, as a GPU does
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["explicit", "sdpa"])
def test_sliding_window_matches_hf(dtype):
    """Decodes of two lengths past the window: the per-step mask hides each slot's tail and what left the window."""
    torch.manual_seed(0)
    config = MistralConfig(**{**ARCHITECTURES["llama"]().to_dict(), "sliding_window": 4, "model_type": "mistral"})
    model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
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
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3, gemma, phi3, olmo2, gemma2, "
                                                    "gemma3_text, gpt2, granite, stablelm, gpt_neox, "
                                                    "starcoder2, phi"):
        build_forward(model)


def test_bidirectional_gemma_is_refused():
    config = GemmaConfig(**{**ARCHITECTURES["gemma"]().to_dict(), "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        build_forward(AutoModelForCausalLM.from_config(config))


def test_longrope_is_served_within_its_short_range_only():
    """LongRoPE switches factors for a whole forward past original_max_position_embeddings (64 in tiny.py):
    the engine's context stops there; without LongRoPE, Phi-3 has no such limit."""
    model = tiny_model("phi3")
    assert build_forward(model).max_positions == 64
    adapted = AdaptedModel(model)
    with pytest.raises(ValueError, match="max_seq_len 65 exceeds the model's 64 positions"):
        Engine(adapted, build_tokenizer(), None, EngineConfig(max_seq_len=65, max_slots=1))
    plain = ARCHITECTURES["phi3"]().to_dict()
    plain.pop("rope_parameters")
    config = type(model.config)(**{**plain, "rope_scaling": {"rope_type": "default", "partial_rotary_factor": 0.5}})
    assert build_forward(AutoModelForCausalLM.from_config(config)).max_positions is None


def test_dynamic_rope_is_served_within_the_trained_length_only():
    """Dynamic-NTK RoPE changes its frequencies with the longest position in a forward: past the trained length,
    a packed step would couple its sequences, so the engine's context stops there."""
    config = LlamaConfig(**{**ARCHITECTURES["llama"]().to_dict(),
                            "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}})
    model = AutoModelForCausalLM.from_config(config)
    assert build_forward(model).max_positions == config.max_position_embeddings == 128
    with pytest.raises(ValueError, match="max_seq_len 129 exceeds the model's 128 positions"):
        Engine(AdaptedModel(model), build_tokenizer(), None, EngineConfig(max_seq_len=129, max_slots=1))
    assert build_forward(tiny_model("llama")).max_positions is None


def test_peft_lora_on_phi3_fused_layers_batches(tmp_path):
    """A PEFT LoRA on Phi-3's fused qkv_proj and gate_up_proj (and o_proj, down_proj) loads, and served by our
    forward next to a base row equals PEFT's own model, prefill and decode."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=TARGETS["phi3"])
    peft_model = peft.get_peft_model(tiny_model("phi3"), config).eval()
    peft_model.save_pretrained(tmp_path / "phi")
    model = tiny_model("phi3")
    adapted = AdaptedModel(model)
    bound = adapted.bind(load_adapter(tmp_path / "phi"))
    assert sorted({name.rsplit(".", 1)[-1] for name in bound.modules}) == sorted(TARGETS["phi3"])
    assert len(bound.modules) == 4 * 2
    forward = build_forward(model)
    cache = forward.new_cache(num_slots=2, max_seq_len=32)
    a, b = prompts([8, 5], seed=6)
    assign = [(bound, 0), (None, 0)]
    out = run(forward, adapted, cache, [SeqRun(a.tolist(), 0, 0, False), SeqRun(b.tolist(), 1, 0, False)], assign)
    a, b = torch.cat([a, torch.tensor([9])]), torch.cat([b, torch.tensor([4])])
    out2 = run(forward, adapted, cache, [SeqRun([4], 1, 5, True), SeqRun([9], 0, 8, True)], assign[::-1])
    with torch.no_grad():
        want_a = peft_model(a[None]).logits[0]
        with peft_model.disable_adapter():
            want_b = peft_model(b[None]).logits[0]
        base_a = tiny_model("phi3")(a[None]).logits[0]
    torch.testing.assert_close(out, torch.stack([want_a[-2], want_b[-2]]), atol=ATOL, rtol=0)
    torch.testing.assert_close(out2, torch.stack([want_b[-1], want_a[-1]]), atol=ATOL, rtol=0)
    assert (want_a - base_a).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_engine_mixed_adapter_batch_equals_each_request_alone(arch, tmp_path):
    """Through the engine and the real AdapterManager: greedy tokens of requests over a LoRA, three tasks of
    an MTL-LoRA and the base, all in one batch, equal each request served alone (past the sliding windows)."""
    # peak 2 keeps the top two logits >= 5e-4 apart on these prompts: a peakier head would saturate the tiny
    # Gemma-2/3's final soft-cap (0.5) into ties
    adapted = AdaptedModel(lm(arch, peak=2.0))
    make_adapter("lora", adapted, arch, "lo", tmp_path, seed=1)
    make_adapter("mtl_lora", adapted, arch, "mt", tmp_path, seed=2)
    requests = [("lo", "the model adapter"), ("", "ok ok a b"), ("beta", "café 日本"), ("mt/alpha", "the task"),
                ("gamma", "query answer rank token"), ("lo", "end")]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    sizes = []
    observer = SimpleNamespace(step=lambda r: sizes.append(r.batch_size), request_finished=lambda r: None)
    with AdapterManager(adapted, tmp_path) as manager:
        manager.load_all(strict=True)
        config = EngineConfig(max_seq_len=64, max_slots=8, observer=observer)
        with Engine(adapted, build_tokenizer(), manager, config) as eng:
            alone = [eng.generate(t, p, params, timeout=30).token_ids for t, p in requests]
            handles = [eng.submit(t, p, params) for t, p in requests]
            together = [h.result(30).token_ids for h in handles]
    assert together == alone
    assert max(sizes) == len(requests)  # they really shared forward passes
    assert len({tuple(t) for t in alone}) == len(alone)  # every adapter, task and prompt answers differently
