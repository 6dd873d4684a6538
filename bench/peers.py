"""Peer baselines measured in the same process as the engine: PEFT and transformers' static generate."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel
from transformers import AutoModelForCausalLM

from loraplex.server.forward.base import SDPA_BACKENDS


def _generate(model, ids: torch.Tensor, new: int, **kwargs) -> int:
    with torch.inference_mode(), sdpa_kernel(SDPA_BACKENDS):  # the engine's attention kernels: like for like
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]  # .shape of a finished generate: no device sync needed


def hf_static_generate(base: Path, ids: list[list[int]], new: int, batch: int = 64, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> dict:
    """transformers `generate` on the bare base model, static batches."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
    x = torch.tensor(ids, device=device)
    _generate(model, x[:batch, :8], 2)
    t0 = time.perf_counter()
    tokens = sum(_generate(model, x[i : i + batch], new) for i in range(0, len(ids), batch))
    return {"tok_per_s": tokens / (time.perf_counter() - t0), "batch": batch}


def peft_generate(fixture: Path, ids: list[list[int]], new: int, adapters: int, names: list[str],
                  batch: int = 16, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """PEFT mixed-adapter `generate(adapter_names=...)` in static batches of 16 (BENCHMARK.md)."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(fixture / "base", dtype=dtype).to(device)
    adir = fixture / "adapters"
    wanted = names[: max(adapters, 1)]
    peft_model = PeftModel.from_pretrained(model, adir / wanted[0], adapter_name=wanted[0])
    for name in wanted[1:]:
        peft_model.load_adapter(adir / name, adapter_name=name)
    peft_model.to(device).eval()
    x = torch.tensor(ids, device=device)
    t0 = time.perf_counter()
    tokens = 0
    for i in range(0, len(ids), batch):
        chunk = x[i : i + batch]
        if adapters == 0:
            with peft_model.disable_adapter():
                tokens += _generate(peft_model, chunk, new)
        else:
            tokens += _generate(peft_model, chunk, new,
                                adapter_names=[wanted[j % adapters] for j in range(i, i + len(chunk))])
    return {"tok_per_s": tokens / (time.perf_counter() - t0), "batch": batch}
