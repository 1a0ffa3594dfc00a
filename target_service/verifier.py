"""The target side of a step, free of gRPC: run every sequence's new tokens and drafts through the
model in one batched pass, verify the drafts, and keep only the accepted prefix in the cache. Draft
trees go through the model with tree attention (``extend_tree``) and keep their accepted path
(``keep_path``), so afterwards the cache reads as for a chain. A sequence that asks for its next
step's drafts (``draft_next``) gets them from the same pass: SPACE's mask groups (`specfleet.space`), or
lookahead's Jacobi chain and n-gram pool (`specfleet.lookahead`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specfleet.engine import Extend, ModelRunner, TreeExtend
from specfleet.lookahead import LookaheadState, advance, candidates_after, initial_guesses, lookahead_layout
from specfleet.sampling import (
    DRAFT_STREAM,
    VERIFY_STREAM,
    dense_from_top_k,
    processed_probs,
    sample_drafts,
    seeded_uniforms,
)
from specfleet.sampling_params import SamplingParams
from specfleet.space import SpaceLayout, space_layout, space_pass_tokens
from specfleet.trees.shapes import PAD_TOKEN, ROOT_PARENT
from specfleet.trees.structure import DraftTree, tree_depths
from specfleet.verify import verify_chain, verify_greedy, verify_tree, verify_tree_greedy


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


@dataclass(frozen=True)
class LookaheadSettings:
    """A lookahead target (`specfleet.lookahead`): ``window`` Jacobi guesses per pass, n-grams of ``ngram`` tokens
    (so at most ngram - 1 drafts a step), the latest ``pool_size`` continuations kept per first token."""

    window: int
    ngram: int
    pool_size: int = 8


@dataclass(frozen=True)
class SpaceSettings:
    """A SPACE target: the token its mask positions hold, and the most masks a sequence may ask for per group."""

    mask_token: int
    max_masks: int
    top_k_pairs: int = 64  # a sampled next draft's distribution on the wire, as the model drafters send it


class Verifier:
    """Verifies batches of draft chains against the target model held by ``runner``; with ``space``, also drafts the
    next step's candidates for the sequences that ask."""

    def __init__(self, runner: ModelRunner, space: SpaceSettings | None = None,
                 lookahead: LookaheadSettings | None = None) -> None:
        if space is not None and lookahead is not None:
            raise ValueError("a target drafts for itself with SPACE masks or with lookahead, not both")
        self.runner = runner
        self.space = space
        self.lookahead = lookahead
        self._lookahead_states: dict[str, LookaheadState] = {}

    @property
    def self_drafting(self) -> str:
        """How this target drafts for itself: "space", "lookahead", or "" when it does not."""
        return "space" if self.space is not None else "lookahead" if self.lookahead is not None else ""

    @property
    def max_draft_next(self) -> int:
        """Most next-step drafts a sequence may ask for (0: this target does not draft)."""
        if self.space is not None:
            return self.space.max_masks
        return self.lookahead.ngram - 1 if self.lookahead is not None else 0

    def fed_tokens(self, item: VerifyItem) -> int:
        """Positions a pass runs for ``item``: its new tokens, its drafts, and a self-drafting step's masks or Jacobi
        chain (what the latency telemetry's tokens per sequence counts)."""
        drafts = len(item.draft_tokens)
        if item.draft_next and self.space is not None:
            drafts = space_pass_tokens(drafts, item.draft_next)
        elif item.draft_next and self.lookahead is not None:
            drafts += self.lookahead.window
        return len(item.new_tokens) + drafts

    def release(self, seq_ids: list[str]) -> int:
        """Forgets finished sequences: their KV cache and their self-drafting state."""
        for seq_id in seq_ids:
            self._lookahead_states.pop(seq_id, None)
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
        self_drafted = [i for i in known if i.draft_next and i.draft_parents is None]
        chains = [i for i in known if not i.draft_next and i.draft_parents is None]
        if trees:
            verdicts.update(self._verify_trees(trees))
        if self_drafted:
            verdicts.update(self._verify_self_drafted(self_drafted) if self.space is not None else
                            self._verify_lookahead(self_drafted))
        if chains:
            logits = self.runner.extend([
                Extend(i.seq_id, i.rollback_to, list(i.new_tokens) + list(i.draft_tokens),
                       num_logits=len(i.draft_tokens) + 1)
                for i in chains
            ])
            for item, (accepted, tokens) in zip(chains, self._decide_chains(chains, logits), strict=True):
                cached = item.position + accepted  # drop the rejected drafts' keys/values
                self.runner.truncate(item.seq_id, cached)
                verdicts[item.seq_id] = Verdict(item.seq_id, True, accepted, tuple(tokens), cached)
        return [verdicts[i.seq_id] for i in items]

    def _check_draft_next(self, item: VerifyItem) -> None:
        if not item.draft_next:
            return
        if item.draft_next > self.max_draft_next:
            raise ValueError(f"{item.seq_id}: asks for {item.draft_next} next-step drafts, but this target drafts "
                             f"{self.max_draft_next}" + (" at most" if self.self_drafting else
                                                         " (it was not started with a SPACE model or lookahead)"))
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
        """SPACE: each sequence's candidates and mask groups in one tree-attention pass; the candidates are verified
        as a chain, the cache keeps the accepted ones, and the mask group after the last of them proposes the next
        candidates (greedy: the argmax; sampled: drawn from the processed distribution's top-K, sent with them)."""
        assert self.space is not None
        layouts = [space_layout(i.draft_tokens, self._masks_that_fit(i), self.space.mask_token) for i in items]
        logits = self.runner.extend_tree([TreeExtend(i.seq_id, i.rollback_to, list(i.new_tokens), layout.tokens,
                                                     layout.parents) for i, layout in zip(items, layouts, strict=True)])
        decided = self._decide_chains(items, [x[: len(i.draft_tokens) + 1] for x, i in zip(logits, items, strict=True)])
        verdicts: dict[str, Verdict] = {}
        for item, layout, rows, (accepted, tokens) in zip(items, layouts, logits, decided, strict=True):
            self.runner.keep_path(item.seq_id, item.position, layout.kept_nodes(accepted))
            next_tokens, next_top_k = self._next_candidates(item, layout, rows, accepted)
            verdicts[item.seq_id] = Verdict(item.seq_id, True, accepted, tuple(tokens), item.position + accepted,
                                            next_tokens=next_tokens, next_top_k=next_top_k)
        return verdicts

    def _verify_lookahead(self, items: list[VerifyItem]) -> dict[str, Verdict]:
        """Lookahead: each sequence's candidates (from its n-gram pool) and its Jacobi chain in one tree-attention
        pass; the candidates are verified as a chain, the cache keeps the accepted ones, the Jacobi outputs feed the
        pool, and the pool proposes the next candidates after the emitted token (a sampled request's q for each is a
        point mass: it was looked up, not drawn)."""
        assert self.lookahead is not None
        settings = self.lookahead
        states = [self._lookahead_state(i) for i in items]
        layouts = [lookahead_layout(i.draft_tokens, state.guesses[: self._guesses_that_fit(i)])
                   for i, state in zip(items, states, strict=True)]
        logits = self.runner.extend_tree([TreeExtend(i.seq_id, i.rollback_to, list(i.new_tokens), layout.tokens,
                                                     layout.parents) for i, layout in zip(items, layouts, strict=True)])
        decided = self._decide_chains(items, [x[: len(i.draft_tokens) + 1] for x, i in zip(logits, items, strict=True)])
        verdicts: dict[str, Verdict] = {}
        for item, state, layout, rows, (accepted, tokens) in zip(items, states, layouts, logits, decided, strict=True):
            self.runner.keep_path(item.seq_id, item.position, list(range(accepted)))
            guesses = layout.guess_rows
            guess_outputs = rows[guesses.start:guesses.stop].argmax(dim=-1).tolist()
            advance(state, int(rows[0].argmax()), guess_outputs, tokens, settings.ngram, settings.pool_size)
            next_tokens = candidates_after(state, tokens[-1], item.draft_next)
            next_top_k = None
            if not item.sampling.greedy and next_tokens:
                next_top_k = (torch.tensor(next_tokens).unsqueeze(1), torch.ones(len(next_tokens), 1))
            verdicts[item.seq_id] = Verdict(item.seq_id, True, accepted, tuple(tokens), item.position + accepted,
                                            next_tokens=next_tokens, next_top_k=next_top_k)
        return verdicts

    def _lookahead_state(self, item: VerifyItem) -> LookaheadState:
        """The sequence's state, new (guesses from its context) when it starts or is sent again whole."""
        assert self.lookahead is not None
        state = self._lookahead_states.get(item.seq_id)
        if state is None or item.rollback_to == 0:
            state = self._lookahead_states[item.seq_id] = LookaheadState(
                initial_guesses(item.new_tokens, self.lookahead.window))
        return state

    def _guesses_that_fit(self, item: VerifyItem) -> int:
        assert self.lookahead is not None
        return max(0, min(self.lookahead.window, self.runner.max_seq_len - item.position - len(item.draft_tokens)))

    def _masks_that_fit(self, item: VerifyItem) -> int:
        """The masks asked for, fewer where the pass would outgrow the sequence's cache (none: no next drafts)."""
        room = self.runner.max_seq_len - item.position - len(item.draft_tokens)
        return max(0, min(item.draft_next, room // (len(item.draft_tokens) + 1)))

    def _next_candidates(self, item: VerifyItem, layout: SpaceLayout, logits: torch.Tensor, accepted: int
                         ) -> tuple[tuple[int, ...], tuple[torch.Tensor, torch.Tensor] | None]:
        assert self.space is not None
        rows = layout.group_rows(accepted)
        if not len(rows):
            return (), None
        # The next step's first candidate sits right after the token this step emits: seeded from where it sits.
        first = item.position + accepted + 1
        tokens, pairs = sample_drafts(logits[rows.start:rows.stop], [item.sampling] * len(rows),
                                      seeded_uniforms(item.seed, first, DRAFT_STREAM, len(rows)).tolist(),
                                      self.space.top_k_pairs)
        if item.sampling.greedy:
            return tuple(tokens), None
        return tuple(tokens), (torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]))

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
