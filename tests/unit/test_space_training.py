"""SPACE's fine-tune: SAR batches mean what decoding does with masks, a few steps lower the mask loss, the result
serves as a self-drafting target, and an interrupted run resumes from its checkpoint."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from specfleet.config import TrainSpaceConfig
from specfleet.engine import ModelRunner
from specfleet.models import load_tokenizer
from specfleet.sampling_params import SamplingParams
from specfleet.space_model import NEW_MASK_TOKEN, SpaceModelConfig, space_settings_for
from specfleet.training.sar import IGNORE, collate_sar, sar_example
from specfleet.training.space_train import ANSWERS_FILE, AnsweredPrompt, distillation_loss, train_space
from target_service.self_drafting import SpaceDrafting
from target_service.verifier import Verifier, VerifyItem

MASK = 31


@pytest.fixture(scope="module")
def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_sar_example_labels_each_mask_with_the_token_after_the_one_the_model_emits_next() -> None:
    tokens = list(range(10, 22))
    example = sar_example(tokens, learn_from=4, masks=3, groups=2, mask_token=MASK, rng=random.Random(0))
    assert example.input_ids[:12] == tokens and example.input_ids[12:] == [MASK] * 6
    assert example.labels[:3] == [IGNORE] * 3 and example.labels[3:11] == tokens[4:] and example.labels[11] == IGNORE
    for group, anchor in enumerate(example.anchors):
        assert 3 <= anchor <= 9
        first = 12 + 3 * group
        assert example.position_ids[first:first + 3] == [anchor + 1, anchor + 2, anchor + 3]
        assert example.labels[first:first + 3] == [tokens[a] if a < 12 else IGNORE for a in range(anchor + 2,
                                                                                                     anchor + 5)]


def test_a_sar_batch_runs_the_text_as_usual_and_each_mask_group_as_decoding_appends_it(toy_model) -> None:
    """The text's logits are a plain forward's; each group's are those of its prefix with the masks appended as a
    chain (what a SPACE step computes after the group's anchor), also in a padded batch."""
    tokens = [random.Random(i).randrange(30) for i in range(20)]
    examples = [sar_example(tokens, 5, 3, 4, MASK, random.Random(1)), sar_example(tokens[:12], 3, 3, 2, MASK,
                                                                                   random.Random(2))]
    batch = collate_sar(examples, pad_token=0)
    with torch.no_grad():
        logits = toy_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"]).logits
        for row, example in enumerate(examples):
            n = example.text_len
            plain = toy_model(input_ids=torch.tensor([tokens[:n]])).logits[0]
            torch.testing.assert_close(logits[row, :n], plain, atol=1e-5, rtol=1e-5)
            for group, anchor in enumerate(example.anchors):
                chain = toy_model(input_ids=torch.tensor([tokens[:anchor + 1] + [MASK] * 3])).logits[0, anchor + 1:]
                first = n + 3 * group
                torch.testing.assert_close(logits[row, first:first + 3], chain, atol=1e-5, rtol=1e-5)
    assert batch["is_mask"][0].sum() == 12 and batch["is_mask"][1].sum() == 6


@pytest.fixture()
def answered(tiny_draft_dir: Path, tmp_path: Path) -> Path:
    """An output folder whose answered prompts are already there (the data stage then has nothing to do)."""
    rng = random.Random(0)
    lines = []
    for _ in range(16):
        phrase = [rng.randrange(100, 400) for _ in range(6)]
        lines.append(json.dumps(AnsweredPrompt([1, 9, 10, rng.randrange(100, 400)], phrase * 4).__dict__))
    out = tmp_path / "space"
    out.mkdir()
    (out / ANSWERS_FILE).write_text("\n".join(lines) + "\n")
    return out


def _config(model: Path, out: Path, steps: int, text_loss: str = "distill") -> TrainSpaceConfig:
    return TrainSpaceConfig(model=str(model), out=str(out), masks=3, groups=6, examples=16, batch_size=4,
                            learning_rate=3e-3, max_steps=steps, time_budget_min=0, save_steps=4, snapshot_steps=8,
                            device="cpu", text_loss=text_loss)


def test_the_distillation_loss_is_the_kl_divergence_at_text_positions_only() -> None:
    torch.manual_seed(0)
    reference = torch.randn(2, 5, 7)
    is_text = torch.tensor([[True] * 5, [True, True, True, False, False]])
    # The model's vocabulary has one more token (the mask); after the text, mask and padding positions differ freely.
    same = torch.cat([reference, torch.full((2, 5, 1), -30.0)], dim=-1)
    noisy = same.clone()
    noisy[1, 3:] += torch.randn(2, 8) * 5
    assert float(distillation_loss(torch.cat([noisy, torch.randn(2, 3, 8)], dim=1), reference, is_text)) < 1e-6
    shifted = same.clone()
    shifted[0, 2, 0] += 3.0
    p, q = torch.softmax(reference[0, 2], -1), torch.softmax(shifted[0, 2], -1)[:7]
    expected = float((p * (p.log() - q.log())).sum()) / 8  # one of the 8 text positions moved
    assert float(distillation_loss(shifted, reference, is_text)) == pytest.approx(expected, rel=1e-4)
    # Probability the model puts on the mask token is drift too.
    masked = same.clone()
    masked[:, :, 7] = 5.0
    assert float(distillation_loss(masked, reference, is_text)) > 0.1


def test_a_few_steps_lower_the_mask_loss_and_the_result_serves_as_a_space_target(tiny_draft_dir, answered) -> None:
    out = train_space(_config(tiny_draft_dir, answered, steps=20))
    logged = [entry for entry in json.loads((out / "training_log.json").read_text()) if "mask_loss" in entry]
    assert logged[-1]["mask_loss"] < 0.8 * logged[0]["mask_loss"], logged
    trained = SpaceModelConfig.load(out)
    assert trained is not None and trained.masks == 3
    snapshots = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snapshots == ["step-0", "step-16", "step-8"]  # the learning curve's points, each a servable folder
    assert all(SpaceModelConfig.load(out / "snapshots" / name) == trained for name in snapshots)

    runner = ModelRunner.from_folder(out, num_slots=4, max_seq_len=128)
    mask_token, masks = space_settings_for(out, -1, -1, runner.vocab_size)
    assert mask_token == runner.vocab_size - 1 == 49152  # NEW_MASK_TOKEN, added to the vocabulary
    assert load_tokenizer(out).convert_tokens_to_ids(NEW_MASK_TOKEN) == mask_token
    verifier = Verifier(runner, SpaceDrafting(mask_token, masks))
    verdict, = verifier.verify([VerifyItem("s", 0, [1, 9, 10, 200], [], None, SamplingParams(), draft_next=masks)])
    assert len(verdict.next_tokens) == 3


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_draft_dir, answered, caplog) -> None:
    """A run stopped after 4 steps (its budget), then run again for 8 in all: the second starts at step 4."""
    train_space(_config(tiny_draft_dir, answered, steps=4))
    assert (answered / "checkpoints" / "checkpoint-4").is_dir()
    with caplog.at_level(logging.INFO, logger="specfleet.train"):
        train_space(_config(tiny_draft_dir, answered, steps=8))
    messages = [r.message for r in caplog.records]
    assert any(m.startswith("resuming from") and m.endswith("checkpoint-4") for m in messages), messages
    assert "training from step 4" in messages and "stopped at step 8" in messages


def test_distilling_leaves_the_text_distribution_where_the_next_token_loss_moves_it(tiny_draft_dir, answered,
                                                                                      tmp_path) -> None:
    """The text's loss alone (no mask loss), 20 steps each: distilling from the original leaves the model's
    next-token distributions where they were, while the next-token loss on the answers moves them (what raised
    SmolLM2's perplexity in bench/space.md): the reference is the original and it scores the text's positions."""
    plain = tmp_path / "next-token"
    plain.mkdir()
    (plain / ANSWERS_FILE).write_text((answered / ANSWERS_FILE).read_text())
    first = AnsweredPrompt(**json.loads((answered / ANSWERS_FILE).read_text().splitlines()[0]))
    text = torch.tensor([first.prompt_ids + first.answer_ids])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_draft_dir)(text).logits
    drift = {}
    for text_loss, out in (("distill", answered), ("next-token", plain)):
        trained = train_space(replace(_config(tiny_draft_dir, out, steps=20, text_loss=text_loss),
                                      mask_loss_weight=0.0))
        with torch.no_grad():
            logits = AutoModelForCausalLM.from_pretrained(trained)(text).logits
        drift[text_loss] = float(distillation_loss(logits, original, torch.ones_like(text, dtype=torch.bool)))
    assert drift["distill"] < 0.15 * drift["next-token"], drift


def test_descending_the_distillation_loss_leads_back_to_the_reference() -> None:
    torch.manual_seed(0)
    reference = torch.randn(1, 6, 11)
    logits = (reference + torch.randn(1, 6, 11)).requires_grad_()
    is_text = torch.ones(1, 6, dtype=torch.bool)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    start = distillation_loss(logits, reference, is_text).item()
    for _ in range(1000):
        optimizer.zero_grad()
        distillation_loss(logits, reference, is_text).backward()
        optimizer.step()
    with torch.no_grad():
        assert distillation_loss(logits, reference, is_text).item() < 1e-3 * start
        torch.testing.assert_close(torch.softmax(logits, -1), torch.softmax(reference, -1), atol=1e-3, rtol=0)