"""PEFT is the oracle for LoRA: PEFT-made checkpoints load unchanged and give PEFT's own logits."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from tiny import TARGETS, prompts, tiny_model  # noqa: E402

from loraplex.adapters import AdaptedModel, load_adapter  # noqa: E402

CASES = {
    "plain": dict(r=4, lora_alpha=8),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"k_proj": 2, "c_fc": 6, "layers.1.mlp.up_proj": 3},
                     alpha_pattern={"v_proj": 32, "c_proj": 5, "down_proj": 1.5}),
    "regex_targets": dict(r=4, lora_alpha=4, target_modules=r".*\.(q_proj|v_proj|c_attn)"),
}


def make_peft_adapter(arch: str, case: str, out_dir, seed: int = 3):
    """Save a PEFT LoRA with non-zero B (init_lora_weights=False) and return PEFT's model."""
    base = tiny_model(arch)
    kwargs = dict(CASES[case])
    kwargs.setdefault("target_modules", TARGETS[arch])
    if arch == "gpt2":
        kwargs["fan_in_fan_out"] = True
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **kwargs)
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_checkpoint_matches_peft_logits(arch, case, tmp_path):
    peft_model = make_peft_adapter(arch, case, tmp_path / "a")
    ids = prompts([9])[0][None]
    with torch.no_grad():
        expected = peft_model(ids).logits

    adapted = AdaptedModel(tiny_model(arch))
    bound = adapted.bind(load_adapter(tmp_path / "a"))
    with torch.no_grad(), adapted.batch([(bound, 0)], ids.shape[1]):
        got = adapted.model(ids).logits
    assert (got - expected).abs().max() < 1e-5
    with torch.no_grad():  # and the adapter did something
        assert (adapted.model(ids).logits - expected).abs().max() > 1e-3


def test_peft_mixed_batch_matches_peft_per_row(tmp_path):
    """Several PEFT adapters plus a base row in one batch: each row equals PEFT serving it alone."""
    models = {case: make_peft_adapter("llama", case, tmp_path / case, seed=i) for i, case in enumerate(CASES)}
    seqs = prompts([7] * (len(CASES) + 1), seed=5)
    adapted = AdaptedModel(tiny_model("llama"))
    bound = {case: adapted.bind(load_adapter(tmp_path / case)) for case in CASES}
    order = list(CASES) + [None]
    ids = torch.stack(seqs)
    with torch.no_grad(), adapted.batch([(bound.get(c), 0) for c in order], ids.shape[1]):
        batch_logits = adapted.model(ids).logits
    for i, case in enumerate(order):
        with torch.no_grad():
            if case is None:
                expected = tiny_model("llama")(ids[i : i + 1]).logits[0]
            else:
                expected = models[case](ids[i : i + 1]).logits[0]
        assert (batch_logits[i] - expected).abs().max() < 1e-5, case


def test_saved_peft_config_stays_loadable_by_peft(tmp_path):
    """Saving through loraplex keeps the PEFT format: PEFT itself loads our copy."""
    peft_model = make_peft_adapter("llama", "patterns", tmp_path / "a")
    load_adapter(tmp_path / "a").save(tmp_path / "copy")
    reloaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "copy").eval()
    ids = prompts([6])[0][None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, peft_model(ids).logits)
