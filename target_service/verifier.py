"""The target side of a step, free of gRPC: run every sequence's new tokens and drafts through the
model in one batched pass, verify the drafts, and keep only the accepted prefix in the cache. Draft
trees go through the model with tree attention (``extend_tree``) and keep their accepted path
(``keep_path``), so afterwards the cache reads as for a chain. A sequence that asks for its next
step's drafts (``draft_next``) gets them from the same pass (`target_service.self_drafting`: SPACE's mask groups or
lookahead's Jacobi chain), or by prompt lookup in its text once the verdict is known."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet.engine import Extend, ModelRunner, TreeExtend
from specfleet.sampling import (
    VERIFY_STREAM,
    dense_from_top_k,
    processed_probs,
    seeded_uniforms,
)
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import PAD_TOKEN, ROOT_PARENT
from specfleet.trees.structure import DraftTree, tree_depths
from specfleet.verify import verify_chain, verify_greedy, verify_tree, verify_tree_greedy
from target_service.self_drafting import SelfDrafting


@dataclass(frozen=True)
class VerifyItem:
    seq_id: str
    rollback_to: int
    new_tokens: list[int]
    draft_tokens: list[int]
    # For sampled requests, the wire's top-K pairs (ids [depth, K], probs [depth, K]) each draft came from.
    draft_top_k: tuple[torch.Tensor, torch.Tensor] | None
    sampling: SamplingParams
    seed: int = 0
    # For a tree: each draft token's parent (ROOT_PARENT: the last committed token); None for a chain.
    draft_parents: list[int] | None = None
    # Draft tokens to propose for the sequence's next step from this pass (a self-drafting target); 0: none.
    draft_next: int = 0

    @property
    def position(self) -> int:
        """Index of the first draft token in the sequence."""
        return self.rollback_to + len(self.new_tokens)


@dataclass(frozen=True)
class Verdict:
    seq_id: str
    known: bool
    accepted: int = 0
    tokens: tuple[int, ...] = ()  # accepted drafts, then the recovered or bonus token
    cached_len: int = 0
    accepted_nodes: tuple[int, ...] = ()  # for a tree: the accepted path's node indices
    # Asked for with ``draft_next``: the next step's drafts, and for sampled requests the top-K each was drawn from.
    next_tokens: tuple[int, ...] = ()
    next_top_k: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def unknown(cls, seq_id: str) -> Verdict:
        return cls(seq_id, known=False)


class Verifier:
    """Verifies batches of draft chains and trees against the target model held by ``runner``; with ``drafting``, also
    drafts the next step's candidates for the sequences that ask, in the same pass."""

    def __init__(self, runner: ModelRunner, drafting: SelfDrafting | None = None) -> None:
        self.runner = runner
        self.drafting = drafting

    @property
    def self_drafting(self) -> str:
        """How this target drafts for itself ("space", "lookahead", "ngram"), or "" when it does not."""
        return "" if self.drafting is None else self.drafting.kind

    @property
    def max_draft_next(self) -> int:
        """Most next-step drafts a sequence may ask for (0: this target does not draft)."""
        return 0 if self.drafting is None else self.drafting.max_draft_next

    def fed_tokens(self, item: VerifyItem) -> int:
        """Positions a pass runs for ``item``: its new tokens, its drafts, and a self-drafting step's masks or Jacobi
        chain (what the latency telemetry's tokens per sequence counts)."""
        drafts = len(item.draft_tokens)
        if item.draft_next and self.drafting is not None:
            drafts = self.drafting.added_tokens(drafts, item.draft_next)
        return len(item.new_tokens) + drafts

    def release(self, seq_ids: list[str]) -> int:
        """Forgets finished sequences: their KV cache and their self-drafting state."""
        if self.drafting is not None:
            self.drafting.release(seq_ids)
        return self.runner.release(seq_ids)

    def verify(self, items: list[VerifyItem]) -> list[Verdict]:
        for item in items:
            self._check_draft_next(item)
        verdicts: dict[str, Verdict] = {}
        known = []
        for item in items:
            if self.runner.can_extend(item.seq_id, item.rollback_to):
                known.append(item)
            else:
                verdicts[item.seq_id] = Verdict.unknown(item.seq_id)
        trees = [i for i in known if i.draft_parents is not None]
        # A kind that adds nodes of its own to the pass drafts in it (tree attention); one that adds none (prompt
        # lookup) rides with the plain chains and drafts once their verdicts are known.
        in_pass = self.drafting is not None and self.drafting.adds_nodes
        self_drafted = [i for i in known if i.draft_next and i.draft_parents is None and in_pass]
        chains = [i for i in known if not (i.draft_next and in_pass) and i.draft_parents is None]
        if trees:
            verdicts.update(self._verify_trees(trees))
        if self_drafted:
            verdicts.update(self._verify_self_drafted(self_drafted))
        if chains:
            logits = self.runner.extend([
                Extend(i.seq_id, i.rollback_to, list(i.new_tokens) + list(i.draft_tokens),
                       num_logits=len(i.draft_tokens) + 1)
                for i in chains
            ])
            decided = self._decide_chains(chains, logits)
            for item, rows, (accepted, tokens) in zip(chains, logits, decided, strict=True):
                cached = item.position + accepted  # drop the rejected drafts' keys/values
                self.runner.truncate(item.seq_id, cached)
                next_tokens, next_top_k = self._drafted_after(item, rows, accepted, tokens)
                verdicts[item.seq_id] = Verdict(item.seq_id, True, accepted, tuple(tokens), cached,
                                                next_tokens=next_tokens, next_top_k=next_top_k)
        return [verdicts[i.seq_id] for i in items]

    def _drafted_after(self, item: VerifyItem, logits: torch.Tensor, accepted: int, emitted: list[int]
                       ) -> tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None]:
        """A chain's next drafts from a kind that drafts after the verdict (prompt lookup), which sees every chain
        verified so that it keeps each sequence's text, whether or not this step asked it to draft."""
        drafting = self.drafting
        if drafting is None or drafting.adds_nodes:
            return (), None
        nodes = drafting.nodes(item, len(item.draft_tokens))
        return drafting.next_drafts(item, nodes, logits, accepted, emitted)

    def _check_draft_next(self, item: VerifyItem) -> None:
        if not item.draft_next:
            return
        if item.draft_next > self.max_draft_next:
            unable = " (it was not started with a SPACE model, lookahead or prompt lookup)"
            raise ValueError(f"{item.seq_id}: asks for {item.draft_next} next-step drafts, but this target drafts "
                             f"{self.max_draft_next}" + (" at most" if self.self_drafting else unable))
        if item.draft_parents is not None:
            raise ValueError(f"{item.seq_id}: a self-drafting step verifies a chain of candidates, not a tree")

    def _decide_chains(self, items: list[VerifyItem], logits: list[torch.Tensor]) -> list[tuple[int, list[int]]]:
        """(accepted, emitted tokens) of each chain, from its logits at the root and at its drafts."""
        decided: dict[int, tuple[int, list[int]]] = {}
        greedy = [n for n, i in enumerate(items) if i.sampling.greedy]
        sampled = [n for n, i in enumerate(items) if not i.sampling.greedy]
        for group, decide in ((greedy, self._verify_greedy), (sampled, self._verify_sampled)):
            if group:
                decided.update(zip(group, decide([items[n] for n in group], [logits[n] for n in group]), strict=True))
        return [decided[n] for n in range(len(items))]

    def _verify_self_drafted(self, items: list[VerifyItem]) -> dict[str, Verdict]:
        """Each sequence's candidates and its drafting nodes (SPACE's masks, lookahead's Jacobi chain) in one
        tree-attention pass; the candidates are verified as a chain, the cache keeps the accepted ones (the drafting
        nodes and rejected candidates go with the rest of the tree), and the drafting nodes' logits give the next
        candidates."""
        drafting = self.drafting
        assert drafting is not None
        nodes = [drafting.nodes(i, self.runner.max_seq_len - i.position) for i in items]
        logits = self.runner.extend_tree([TreeExtend(i.seq_id, i.rollback_to, list(i.new_tokens), n.tokens, n.parents)
                                          for i, n in zip(items, nodes, strict=True)])
        decided = self._decide_chains(items, [x[: len(i.draft_tokens) + 1] for x, i in zip(logits, items, strict=True)])
        verdicts: dict[str, Verdict] = {}
        for item, passed, rows, (accepted, tokens) in zip(items, nodes, logits, decided, strict=True):
            self.runner.keep_path(item.seq_id, item.position, list(range(accepted)))
            next_tokens, next_top_k = drafting.next_drafts(item, passed, rows, accepted, tokens)
            verdicts[item.seq_id] = Verdict(item.seq_id, True, accepted, tuple(tokens), item.position + accepted,
                                            next_tokens=next_tokens, next_top_k=next_top_k)
        return verdicts

    def _verify_trees(self, items: list[VerifyItem]) -> dict[str, Verdict]:
        """Every tree in one tree-attention pass, verified (greedy, or by recursive rejection sampling),
        then each keeps its accepted path, so the cache holds the committed tokens and that path."""
        logits = self.runner.extend_tree([
            TreeExtend(i.seq_id, i.rollback_to, list(i.new_tokens), list(i.draft_tokens), list(i.draft_parents))
            for i in items])
        verdicts: dict[str, Verdict] = {}
        greedy = [n for n, i in enumerate(items) if i.sampling.greedy]
        sampled = [n for n, i in enumerate(items) if not i.sampling.greedy]
        for group, decide in ((greedy, self._decide_trees_greedy), (sampled, self._decide_trees_sampled)):
            if not group:
                continue
            group_items = [items[n] for n in group]
            result = decide(group_items, [logits[n] for n in group])
            for row, item in enumerate(group_items):
                path = result.accepted_path(row)
                self.runner.keep_path(item.seq_id, item.position, path)
                verdicts[item.seq_id] = Verdict(item.seq_id, True, len(path), tuple(result.emitted(row)),
                                                item.position + len(path), tuple(path))
        return verdicts

    def _tree(self, items: list[VerifyItem], vocab: int, with_probs: bool) -> DraftTree:
        nodes = max(len(i.draft_tokens) for i in items)
        tokens = torch.full((len(items), nodes), PAD_TOKEN, dtype=torch.long)
        parents = torch.full((len(items), nodes), ROOT_PARENT, dtype=torch.long)
        draft_probs = torch.zeros(len(items), nodes, vocab if with_probs else 0)
        for row, i in enumerate(items):
            n = len(i.draft_tokens)
            if n:
                tokens[row, :n] = torch.tensor(i.draft_tokens, dtype=torch.long)
                parents[row, :n] = torch.tensor(i.draft_parents, dtype=torch.long)
                if with_probs:
                    if i.draft_top_k is None:
                        raise ValueError(f"{i.seq_id}: a sampled request needs the draft distribution of each node")
                    draft_probs[row, :n] = dense_from_top_k(*i.draft_top_k, vocab)
        num_nodes = torch.tensor([len(i.draft_tokens) for i in items])
        return DraftTree(tokens, parents, tree_depths(parents), draft_probs, num_nodes)

    def _decide_trees_greedy(self, items: list[VerifyItem], logits: list[torch.Tensor]):
        tree = self._tree(items, 0, with_probs=False)
        return verify_tree_greedy(self._pad_logits(logits, tree.max_nodes), tree)

    def _decide_trees_sampled(self, items: list[VerifyItem], logits: list[torch.Tensor]):
        vocab = logits[0].shape[-1]
        tree = self._tree(items, vocab, with_probs=True)
        rows = tree.max_nodes + 1
        target_probs = processed_probs(
            self._pad_logits(logits, tree.max_nodes).view(-1, vocab),
            torch.tensor([i.sampling.temperature for i in items]).repeat_interleave(rows),
            torch.tensor([i.sampling.top_k for i in items]).repeat_interleave(rows),
            torch.tensor([i.sampling.top_p for i in items]).repeat_interleave(rows),
        ).view(len(items), rows, vocab)
        uniforms = torch.zeros(len(items), rows, dtype=torch.float64)
        for row, i in enumerate(items):
            n = len(i.draft_tokens)
            u = seeded_uniforms(i.seed, i.position, VERIFY_STREAM, n + 1)
            uniforms[row, :n] = u[:n]
            uniforms[row, tree.max_nodes] = u[n]  # the recovered/bonus draw always uses the last column
        return verify_tree(target_probs, tree, uniforms)

    @staticmethod
    def _padded_drafts(items: list[VerifyItem]) -> tuple[torch.Tensor, torch.Tensor, int]:
        depth = max(len(i.draft_tokens) for i in items)
        drafts = torch.zeros(len(items), depth, dtype=torch.long)
        for row, i in enumerate(items):
            drafts[row, : len(i.draft_tokens)] = torch.tensor(i.draft_tokens, dtype=torch.long)
        return drafts, torch.tensor([len(i.draft_tokens) for i in items]), depth

    @staticmethod
    def _pad_logits(logits: list[torch.Tensor], depth: int) -> torch.Tensor:
        out = logits[0].new_zeros(len(logits), depth + 1, logits[0].shape[-1])
        for row, x in enumerate(logits):
            out[row, : x.shape[0]] = x
        return out  # [batch, depth + 1, vocab]

    def _verify_greedy(self, items: list[VerifyItem], logits: list[torch.Tensor]) -> list[tuple[int, list[int]]]:
        drafts, lens, depth = self._padded_drafts(items)
        result = verify_greedy(self._pad_logits(logits, depth), drafts, lens)
        return [(int(result.accepted_counts[r]), result.emitted(r)) for r in range(len(items))]

    def _verify_sampled(self, items: list[VerifyItem], logits: list[torch.Tensor]) -> list[tuple[int, list[int]]]:
        drafts, lens, depth = self._padded_drafts(items)
        vocab = logits[0].shape[-1]
        rows = depth + 1
        target_logits = self._pad_logits(logits, depth).view(-1, vocab)
        target_probs = processed_probs(
            target_logits,
            torch.tensor([i.sampling.temperature for i in items]).repeat_interleave(rows),
            torch.tensor([i.sampling.top_k for i in items]).repeat_interleave(rows),
            torch.tensor([i.sampling.top_p for i in items]).repeat_interleave(rows),
        ).view(len(items), rows, vocab)
        draft_probs = torch.zeros(len(items), depth, vocab)
        uniforms = torch.zeros(len(items), rows, dtype=torch.float64)
        for row, i in enumerate(items):
            k = len(i.draft_tokens)
            if k:
                if i.draft_top_k is None:
                    raise ValueError(f"{i.seq_id}: a sampled request needs the draft distribution of each draft token")
                ids, probs = i.draft_top_k
                draft_probs[row, :k] = dense_from_top_k(ids, probs, vocab)
            u = seeded_uniforms(i.seed, i.position, VERIFY_STREAM, k + 1)
            uniforms[row, :k] = u[:k]
            uniforms[row, depth] = u[k]  # the recovered/bonus draw always uses the last column
        result = verify_chain(target_probs, drafts, draft_probs, lens, uniforms)
        return [(int(result.accepted_counts[r]), result.emitted(r)) for r in range(len(items))]
