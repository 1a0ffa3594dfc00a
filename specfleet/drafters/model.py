"""A small causal LM sharing the target's tokenizer drafts autoregressively, batched: chains, or
trees by RSD-C / RSD-S (`specfleet.trees.build`) with the nodes evaluated by tree attention."""

from __future__ import annotations

import torch

from specfleet.drafters.base import DraftRequest, DraftResult
from specfleet.drafters.tree_drafting import build_tree, tree_logprobs, tree_result, tree_shapes
from specfleet.engine import Extend, ModelRunner, TreeExtend
from specfleet.sampling import DRAFT_STREAM, sample_drafts, seeded_uniforms
from specfleet.trees.shapes import ROOT_PARENT


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
        trees = [r for r in requests if r.seq_id not in results and r.depth > 0 and r.tree is not None]
        results.update(self._propose_trees(trees))
        active = [r for r in requests if r.seq_id not in results and r.depth > 0]
        drafts: dict[str, list[int]] = {r.seq_id: [] for r in active}
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {r.seq_id: [] for r in active}
        uniforms = {r.seq_id: seeded_uniforms(r.seed, r.position, DRAFT_STREAM, r.depth) for r in active}

        # Position 0 consumes the committed tokens; each later position consumes the previous draft.
        steps = [Extend(r.seq_id, r.rollback_to, list(r.new_tokens)) for r in active]
        for position in range(max((r.depth for r in active), default=0)):
            logits = torch.cat(self.runner.extend(steps))  # [len(active), vocab]
            tokens, chosen_pairs = sample_drafts(logits, [r.sampling for r in active],
                                                 [float(uniforms[r.seq_id][position]) for r in active], self.num_pairs)
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
            draft_top_k = None
            if not r.sampling.greedy:
                got = pairs.get(r.seq_id, [])
                k = self.num_pairs
                draft_top_k = (torch.stack([p[0] for p in got]) if got else torch.empty(0, k, dtype=torch.long),
                               torch.stack([p[1] for p in got]) if got else torch.empty(0, k))
            if r.depth == 0:  # nothing drafted: just keep the committed tokens
                self.runner.extend([Extend(r.seq_id, r.rollback_to, list(r.new_tokens))])
            results[r.seq_id] = DraftResult(r.seq_id, known=True, tokens=toks, draft_top_k=draft_top_k,
                                            cached_len=self.runner.cached_len(r.seq_id) or 0)
        return [results[r.seq_id] for r in requests]

    # -- trees ----------------------------------------------------------------------------------

    def _propose_trees(self, requests: list[DraftRequest]) -> dict[str, DraftResult]:
        """Trees for every request, one construction per distinct shape. The committed tokens go in
        first; each level then evaluates the tree so far with ``extend_tree`` after re-feeding the last
        committed token, and at the end the cache is cut back to the committed tokens, so it holds
        nothing a later rollback could not undo (cached_len is the committed length)."""
        if not requests:
            return {}
        root_logits = self.runner.extend([Extend(r.seq_id, r.rollback_to, list(r.new_tokens)) for r in requests])
        last_token = {r.seq_id: (r.new_tokens[-1] if r.new_tokens else None) for r in requests}
        roots = dict(zip((r.seq_id for r in requests), root_logits, strict=True))
        results: dict[str, DraftResult] = {}
        for shape, group in tree_shapes(requests).items():

            def draft_logprobs(rows: torch.Tensor, paths: torch.Tensor, group: list[DraftRequest] = group
                               ) -> torch.Tensor:
                """The draft's processed log-probabilities after each (row, path): one tree-attention pass
                over the trie of every path asked for, per sequence."""
                if paths.shape[1] == 0:
                    logits = torch.cat([roots[group[int(row)].seq_id] for row in rows])
                else:
                    logits = self._path_logits(group, rows.tolist(), paths.tolist(), last_token)
                return tree_logprobs([group[int(row)].sampling for row in rows], logits, self.num_pairs)

            tree = build_tree(shape, group, draft_logprobs, self.runner.vocab_size)
            for row, r in enumerate(group):
                self.runner.truncate(r.seq_id, r.position)
                results[r.seq_id] = tree_result(r, tree, row, self.num_pairs, self.runner.cached_len(r.seq_id) or 0)
        return results

    def _path_logits(self, group: list[DraftRequest], rows: list[int], paths: list[list[int]],
                     last_token: dict[str, int | None]) -> torch.Tensor:  # [len(rows), vocab]
        tries: dict[int, dict[tuple[int, ...], int]] = {}  # per row: path prefix -> node index
        parents: dict[int, list[int]] = {}
        tokens: dict[int, list[int]] = {}
        for row, path in zip(rows, paths, strict=True):
            trie, ps, ts = tries.setdefault(row, {}), parents.setdefault(row, []), tokens.setdefault(row, [])
            for end in range(1, len(path) + 1):
                key = tuple(path[:end])
                if key not in trie:
                    trie[key] = len(ts)
                    ts.append(path[end - 1])
                    ps.append(trie[key[:-1]] if end > 1 else ROOT_PARENT)
        calls = []
        for row in tries:
            r = group[row]
            if last_token[r.seq_id] is None:
                raise ValueError(f"{r.seq_id}: a tree needs at least one new committed token in the request")
            calls.append(TreeExtend(r.seq_id, r.position - 1, [last_token[r.seq_id]], tokens[row], parents[row]))
        outs = dict(zip(tries, self.runner.extend_tree(calls), strict=True))
        return torch.stack([outs[row][1 + tries[row][tuple(path)]] for row, path in zip(rows, paths, strict=True)])
