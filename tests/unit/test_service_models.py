"""The target and draft services build their model as ``--model`` and ``--dtype`` say, and refuse an architecture the
engine does not run as they start, naming it and the supported ones."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from draft_service.server import build_servicer as build_draft
from specfleet.config import DraftConfig, TargetConfig
from specfleet.engine import Extend, ModelRunner
from target_service.server import build_servicer as build_target


def _save_with_tokenizer(folder: Path, config) -> str:
    """A tiny random model from ``config`` and a word-level tokenizer over its vocabulary, as a model folder."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 64)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                            eos_token="<unk>").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save_with_tokenizer(tmp_path_factory.mktemp("tiny-llama"), LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128))


@pytest.mark.parametrize("dtype, expected", [("auto", torch.float32), ("bfloat16", torch.bfloat16)])
def test_services_build_the_runner_in_the_dtype_asked(tiny_llama: str, dtype: str, expected: torch.dtype) -> None:
    common = dict(model=tiny_llama, device="cpu", dtype=dtype, num_slots=2, max_seq_len=64, cpu_prepack="off")
    target = build_target(TargetConfig(**common))
    draft = build_draft(DraftConfig(**common, drafter="model"))
    for runner in (target.verifier.runner, draft.drafter.runner):
        assert runner.model.lm_head.weight.dtype == expected and runner.cache.keys[0].dtype == expected


@pytest.mark.parametrize("build, config", [(build_target, TargetConfig), (build_draft, DraftConfig)])
def test_an_unsupported_architecture_fails_at_start(tmp_path: Path, build, config) -> None:
    folder = _save_with_tokenizer(tmp_path, GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64))
    extra = {"drafter": "model"} if config is DraftConfig else {}
    with pytest.raises(ValueError) as info:
        build(config(model=folder, device="cpu", num_slots=2, max_seq_len=64, **extra))
    message = str(info.value)
    assert "'gpt2'" in message and "GPT2LMHeadModel" in message
    assert "supported model types: llama, mistral, qwen2, qwen3" in message


def test_services_load_warm_up_and_run_their_model_on_one_thread(tiny_llama: str, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """Loading, the warm-up and every pass run on the service's model thread, never on the caller's: CPU kernels keep
    a team of OpenMP threads per thread that starts parallel work, and a second team slows every pass."""
    threads: list[str] = []
    warm_up, extend = ModelRunner.warm_up, ModelRunner.extend

    def recording_warm_up(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return warm_up(self, *args, **kwargs)

    def recording_extend(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return extend(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "warm_up", recording_warm_up)
    monkeypatch.setattr(ModelRunner, "extend", recording_extend)
    common = dict(model=tiny_llama, device="cpu", num_slots=2, max_seq_len=64, cpu_prepack="off")
    services = ((build_target, TargetConfig(**common)), (build_draft, DraftConfig(**common, drafter="model")))
    for build, config in services:
        threads.clear()
        servicer = build(config)
        assert threads  # the warm-up
        runner = servicer.verifier.runner if hasattr(servicer, "verifier") else servicer.drafter.runner
        servicer.executor.submit(runner.extend, [Extend("s", 0, [1, 2, 3])]).result()
        model_thread = servicer.executor.submit(lambda: threading.current_thread().name).result()
        assert set(threads) == {model_thread} != {threading.current_thread().name}
