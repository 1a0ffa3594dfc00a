"""A SPACE model folder: a model fine-tuned by `specfleet train-space`, with ``specfleet_space.json`` beside its
weights naming the token its mask positions hold and how many masks it was trained with. A target started on such
a folder drafts for itself (`target_service.self_drafting.SpaceDrafting`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

SPACE_CONFIG_FILE = "specfleet_space.json"
NEW_MASK_TOKEN = "<|space_mask|>"
"""The mask token `specfleet train-space` adds to a vocabulary unless told to use one of its tokens."""


@dataclass(frozen=True)
class SpaceModelConfig:
    mask_token_id: int
    masks: int  # mask tokens per group in training: the most a step should ask for

    def save(self, folder: Path) -> None:
        (folder / SPACE_CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> SpaceModelConfig | None:
        """The folder's SPACE config; None for an ordinary model folder. Raises ValueError for a malformed one."""
        path = folder / SPACE_CONFIG_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
            config = cls(int(raw["mask_token_id"]), int(raw["masks"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} is not a SPACE config (want mask_token_id and masks): {err}") from err
        if config.mask_token_id < 0 or config.masks < 1:
            raise ValueError(f"{path}: need mask_token_id >= 0 and masks >= 1, got {config}")
        return config


def space_settings_for(folder: Path, masks: int, mask_token: int, vocab_size: int) -> tuple[int, int] | None:
    """(mask token, most masks) a target on ``folder`` drafts with, from its flags (``masks``: -1 as the folder says,
    0 off; ``mask_token``: -1 the folder's) over the folder's SPACE config; None when it does not self-draft.
    Raises ValueError when asked to draft without a mask token, or with one outside the vocabulary."""
    trained = SpaceModelConfig.load(folder)
    if masks == -1:
        masks = trained.masks if trained is not None else 0
    if masks == 0:
        return None
    if mask_token == -1:
        if trained is None:
            raise ValueError(f"--space-masks {masks}: {folder} is not a SPACE model (no {SPACE_CONFIG_FILE}; make one "
                             "with `specfleet train-space`), so name its mask token with --space-mask-token")
        mask_token = trained.mask_token_id
    if not 0 <= mask_token < vocab_size:
        raise ValueError(f"the mask token {mask_token} is outside the model's vocabulary of {vocab_size}")
    return mask_token, masks
