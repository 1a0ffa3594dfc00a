"""SPACE (Yi et al. 2024, arXiv 2402.11809): one forward pass both verifies a sequence's candidates and drafts the next
step's, from mask tokens, with a model fine-tuned to predict several tokens ahead (`specfleet train-space`).

The pass feeds, after the sequence's new committed tokens (the last of them is the *root*):
- the candidates c_1..c_k the previous pass proposed, as a chain;
- a *mask group* of K mask tokens, itself a chain, after the root and after every candidate.
As a draft tree this is what `ModelRunner.extend_tree` runs: every token attends to its ancestors only, so the
group after c_g has seen the committed tokens and c_1..c_g, nothing else, and reads the same whatever the verdict.
The candidates are verified as any chain is (the logits at the root and at c_1..c_k); once g of them are accepted,
the emitted token (recovered or bonus) sits right after c_g, and the group after c_g proposes the K tokens after
it: its i-th mask stands in for the still unknown token i - 1 places after the emitted one, and its logits predict
the next. Whatever the fine-tune taught the masks, output stays the model's own: the candidates are only drafts.

Plain functions on token lists; the verifier (`target_service.verifier`) runs the pass and decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from specfleet.trees.shapes import ROOT_PARENT


@dataclass(frozen=True)
class SpaceLayout:
    """One sequence's nodes in a SPACE pass: the candidates first (node j is c_{j+1}, so the logits at the root and
    at the candidates are rows 0..k of the pass's output, as for a chain), then the k + 1 mask groups in order."""

    tokens: list[int]
    parents: list[int]
    candidates: int
    masks: int

    def group_rows(self, accepted: int) -> range:
        """Rows of the pass's logits (row 0: the root, row j + 1: node j) at the mask group after the root
        (``accepted`` = 0) or after candidate c_accepted: where the next candidates come from."""
        if not 0 <= accepted <= self.candidates:
            raise ValueError(f"accepted must be in [0, {self.candidates}], got {accepted}")
        first = 1 + self.candidates + accepted * self.masks
        return range(first, first + self.masks)

    def kept_nodes(self, accepted: int) -> list[int]:
        """The accepted candidates' nodes: the path `ModelRunner.keep_path` keeps (masks and rejected candidates go)."""
        return list(range(accepted))


def space_layout(candidates: Sequence[int], masks: int, mask_token: int) -> SpaceLayout:
    """The tree of a SPACE pass: ``candidates`` as a chain after the root, and ``masks`` mask tokens after the root
    and after each candidate (none when ``masks`` is 0: plain verification of the candidates)."""
    if masks < 0:
        raise ValueError(f"masks must be >= 0, got {masks}")
    k = len(candidates)
    tokens = list(candidates)
    parents = [ROOT_PARENT, *range(k - 1)] if k else []
    for group in range(k + 1):
        after = ROOT_PARENT if group == 0 else group - 1  # the root, or candidate c_group's node
        for _ in range(masks):
            parents.append(after)
            after = len(tokens)
            tokens.append(mask_token)
    return SpaceLayout(tokens, parents, k, masks)


def space_pass_tokens(candidates: int, masks: int) -> int:
    """Positions a SPACE pass adds to a sequence's verify beyond its new tokens: its candidates and k + 1 groups of
    masks (what the step's verify pays for, as it pays for draft tokens)."""
    return candidates + (candidates + 1) * masks
