"""A small causal LM sharing the target's tokenizer drafts autoregressively, batched."""

from __future__ import annotations

import torch

from specfleet.drafters.base import DraftRequest, DraftResult
from specfleet.engine import Extend, ModelRunner
from specfleet.sampling import (
    DRAFT_STREAM,
    processed_probs,
    sample_from_probs,
    seeded_uniforms,
    top_k_pairs,
)


class ModelDrafter:
    """Drafts with a ``ModelRunner``: one batched forward for the new tokens of every sequence,
    then one batched forward per further draft position."""

    kind = "model"

    def __init__(self, runner: ModelRunner, *, top_k_pairs: int = 64, target_vocab_size: int | None = None) -> None:
        if target_vocab_size is not None and target_vocab_size != runner.vocab_size:
            raise ValueError(
                f"draft model vocabulary ({runner.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}): a model drafter must share the target's tokenizer")
        self.runner = runner
        self.num_pairs = top_k_pairs

    @property
    def live_sequences(self) -> int:
        return self.runner.live_sequences

    def release(self, seq_ids: list[str]) -> int:
        return self.runner.release(seq_ids)

    def propose(self, requests: list[DraftRequest]) -> list[DraftResult]:
        results = {r.seq_id: DraftResult.unknown(r.seq_id) for r in requests
                   if not self.runner.can_extend(r.seq_id, r.rollback_to)}
        active = [r for r in requests if r.seq_id not in results and r.depth > 0]
        drafts: dict[str, list[int]] = {r.seq_id: [] for r in active}
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {r.seq_id: [] for r in active}
        uniforms = {r.seq_id: seeded_uniforms(r.seed, r.position, DRAFT_STREAM, r.depth) for r in active}

        # Position 0 consumes the committed tokens; each later position consumes the previous draft.
        steps = [Extend(r.seq_id, r.rollback_to, list(r.new_tokens)) for r in active]
        for position in range(max((r.depth for r in active), default=0)):
            logits = torch.cat(self.runner.extend(steps))  # [len(active), vocab]
            tokens, chosen_pairs = self._sample(active, logits, [uniforms[r.seq_id][position] for r in active])
            for r, token, pair in zip(active, tokens, chosen_pairs, strict=True):
                drafts[r.seq_id].append(token)
                if pair is not None:
                    pairs[r.seq_id].append(pair)
            active = [r for r in active if len(drafts[r.seq_id]) < r.depth]
            steps = [Extend(r.seq_id, r.position + position, [drafts[r.seq_id][-1]]) for r in active]

        for r in requests:
            if r.seq_id in results:
                continue
            toks = drafts.get(r.seq_id, [])
            draft_probs = None
            if not r.sampling.greedy:
                got = pairs.get(r.seq_id, [])
                k = self.num_pairs
                draft_probs = (torch.stack([p[0] for p in got]) if got else torch.empty(0, k, dtype=torch.long),
                               torch.stack([p[1] for p in got]) if got else torch.empty(0, k))
            if r.depth == 0:  # nothing drafted: just keep the committed tokens
                self.runner.extend([Extend(r.seq_id, r.rollback_to, list(r.new_tokens))])
            results[r.seq_id] = DraftResult(r.seq_id, known=True, tokens=toks, draft_probs=draft_probs,
                                            cached_len=self.runner.cached_len(r.seq_id) or 0)
        return [results[r.seq_id] for r in requests]

    def _sample(self, requests: list[DraftRequest], logits: torch.Tensor, uniforms: list[float]
                ) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor] | None]]:
        """Greedy rows take the argmax; sampled rows draw from their processed distribution
        truncated to its top-K (the exact q sent to the target)."""
        params = [r.sampling for r in requests]
        probs = processed_probs(
            logits,
            torch.tensor([p.temperature for p in params]),
            torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]),
        )
        ids, pair_probs = top_k_pairs(probs, min(self.num_pairs, probs.shape[-1]))
        picks = sample_from_probs(pair_probs, torch.tensor(uniforms, dtype=torch.float64))
        tokens: list[int] = []
        chosen: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for row, p in enumerate(params):
            if p.greedy:
                tokens.append(int(logits[row].argmax()))
                chosen.append(None)
            else:
                tokens.append(int(ids[row, picks[row]]))
                chosen.append((ids[row], pair_probs[row]))
        return tokens, chosen
