"""SPACE's semi-autoregressive SFT batches (Yi et al. 2024), as plain functions on token lists and tensors.

A training example is a text's tokens followed by mask groups: a group of K mask tokens anchored after token a
stands where decoding puts one (`specfleet.space`): its masks attend to tokens 0..a and to the group's earlier masks,
nothing else, sit at positions a + 1 .. a + K, and mask j learns the token at a + j + 1 (the token at a + 1 is
the one the model itself emits next). The text's own tokens attend causally to the text only, and keep a loss of
their own (the original model's distribution distilled, or the ordinary next-token loss), so the model stays the model
while its masks learn to look ahead. Many groups ride on one text: each costs K positions, far less than a copy of
the text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100  # a label no loss is taken on (as transformers' losses read it)


@dataclass(frozen=True)
class SarExample:
    input_ids: list[int]
    position_ids: list[int]
    labels: list[int]  # per position: the token it must predict, IGNORE where none
    text_len: int  # the text's tokens come first; mask groups follow
    anchors: list[int]  # each group's anchor: the last text token its masks see
    masks: int  # per group


def sar_example(tokens: Sequence[int], learn_from: int, masks: int, groups: int, mask_token: int,
                rng: random.Random) -> SarExample:
    """``tokens`` with up to ``groups`` mask groups of ``masks`` tokens, anchored at distinct random positions from
    ``learn_from`` on (where the answer starts: the prompt is context, not a target). The text's own tokens are
    labelled with their next token from ``learn_from`` on."""
    n = len(tokens)
    labels = [IGNORE] * n
    for i in range(max(learn_from, 1) - 1, n - 1):
        labels[i] = tokens[i + 1]
    # An anchor needs at least the next-but-one token to teach its first mask something.
    candidates = list(range(max(learn_from - 1, 0), n - 2))
    anchors = sorted(rng.sample(candidates, min(groups, len(candidates))))
    input_ids, position_ids = list(tokens), list(range(n))
    for anchor in anchors:
        for j in range(1, masks + 1):
            input_ids.append(mask_token)
            position_ids.append(anchor + j)
            target = anchor + j + 1
            labels.append(tokens[target] if target < n else IGNORE)
    return SarExample(input_ids, position_ids, labels, n, anchors, masks)


def sar_attention(example: SarExample, length: int) -> torch.Tensor:  # [length, length] bool, True: may attend
    """Who attends to whom in ``example`` padded to ``length``: the text causally; each mask group to the text up to
    its anchor and causally within itself; a padding position to itself alone (a row that attends to nothing would
    make the softmax undefined), and nobody to it."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    n = example.text_len
    allowed[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    start = n
    for anchor in example.anchors:
        end = start + example.masks
        allowed[start:end, : anchor + 1] = True
        allowed[start:end, start:end] = torch.ones(example.masks, example.masks, dtype=torch.bool).tril()
        start = end
    padding = torch.arange(len(example.input_ids), length)
    allowed[padding, padding] = True
    return allowed


def collate_sar(examples: Sequence[SarExample], pad_token: int) -> dict[str, torch.Tensor]:
    """A batch for the model's forward: ``input_ids``, ``position_ids``, ``labels`` [B, T] and the additive attention
    mask [B, 1, T, T] (0 where a position may attend, the dtype's minimum where not), plus ``is_mask`` and ``is_text``
    [B, T] marking the mask positions and the text's own (the rest is padding): their losses differ."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_token, dtype=torch.long)
    positions = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    is_mask = torch.zeros(len(examples), length, dtype=torch.bool)
    is_text = torch.zeros(len(examples), length, dtype=torch.bool)
    allowed = torch.stack([sar_attention(e, length) for e in examples]).unsqueeze(1)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        positions[row, :n] = torch.tensor(e.position_ids)
        labels[row, :n] = torch.tensor(e.labels)
        is_mask[row, e.text_len:n] = True
        is_text[row, :e.text_len] = True
    attention = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "attention_mask": attention,
            "is_mask": is_mask, "is_text": is_text}
