"""Sequences as sessions over the slot KV cache: the model executor both services share.

A caller names sequences by ``seq_id`` and sends, per call, only what is new: the length to roll
back to and the tokens to append. Slots are bounded; when none is free the least recently used
sequence that is not in the current batch is evicted (its owner will see it as unknown and resend).

A sequence sent whole (rolled back to 0) starts from the longest prefix of its tokens that any slot holds, a live
sequence's or a released one's (a slot keeps its last sequence's keys and values until it is taken again): those
entries are copied, not computed. A chat's next turn resends the conversation so far, and every configuration of a
benchmark the same prompts; keys and values depend only on the tokens before them, so the copy is what a prefill
would write.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from specfleet.engine.cpu_attention import FLASH_ONLY, choose_attention_kernels
from specfleet.engine.cpu_linear import prepack_linears
from specfleet.engine.kv_cache import CacheFullError
from specfleet.engine.llama import BatchLayout, LlamaForCausalLM, PassLayout, causal_layout, tree_layout
from specfleet.token_paths import common_prefix_length
from specfleet.trees.shapes import ROOT_PARENT

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The weight dtypes by name (``--dtype``); ``auto`` is `engine_dtype`'s choice."""


def set_cpu_threads(threads: int) -> None:
    """Has torch compute with ``threads`` intra-op threads on the CPU (``--threads``; 0 keeps torch's default, one
    per core)."""
    if threads:
        torch.set_num_threads(threads)


def engine_dtype(name: str | torch.dtype, device: str) -> torch.dtype:
    """The dtype ``name`` stands for on ``device``: ``auto`` is bfloat16 on CUDA, where it halves memory and
    bandwidth at no cost in speed, and float32 elsewhere, where CPU kernels are fastest and exact in it."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(folder: Path, *, device: str = "cpu", dtype: torch.dtype | str = "auto",
               prepack: bool = True) -> LlamaForCausalLM:
    """The model in ``folder`` in ``dtype`` (a torch dtype, a name in `DTYPES`, or ``auto``: see `engine_dtype`);
    ``prepack`` (CPU only) adds oneDNN-packed linear weights for multi-token forwards (see `cpu_linear`)."""
    model = LlamaForCausalLM.from_folder(folder, dtype=engine_dtype(dtype, device), device=device)
    if prepack:
        prepack_linears(model)
    return model


class UnknownSequenceError(KeyError):
    """The runner holds no (or too little) state for a sequence; the caller must resend it whole."""


@dataclass(frozen=True)
class Extend:
    """Append ``tokens`` to ``seq_id`` after rolling it back to ``rollback_to`` tokens, and return
    the logits of its last ``num_logits`` tokens."""

    seq_id: str
    rollback_to: int
    tokens: list[int]
    num_logits: int = 1


@dataclass(frozen=True)
class TreeExtend:
    """Append the committed ``tokens`` to ``seq_id`` after rolling it back to ``rollback_to``, then a
    draft tree: node j holds ``tree_tokens[j]`` and has parent ``tree_parents[j]`` (-1: the last
    committed token; every parent before its children). Returns the logits at the last committed
    token and at every node; ``ModelRunner.keep_path`` then keeps the accepted path."""

    seq_id: str
    rollback_to: int
    tokens: list[int]
    tree_tokens: list[int]
    tree_parents: list[int]

    @property
    def prefix_len(self) -> int:
        """Committed tokens after the call: the tree's nodes sit in the cache right after them."""
        return self.rollback_to + len(self.tokens)


@dataclass(frozen=True)
class _PendingTree:
    prefix_len: int
    parents: list[int]


@dataclass(frozen=True)
class _Group:
    """One attention group of a forward pass: its layout, slots, new tokens per row and the columns
    whose logits are wanted."""

    layout: BatchLayout
    slots: list[int]
    token_rows: list[list[int]]
    logit_cols: list[list[int]]


class ModelRunner:
    """A ``LlamaForCausalLM`` plus its KV cache, addressed by sequence id."""

    supports_trees = True  # extend_tree and keep_path (the llamacpp backend's runner has no tree attention)
    supports_prefix_reuse = True  # a cache entry per token, at the token's position: entries can be copied

    def __init__(self, model: LlamaForCausalLM, *, num_slots: int, max_seq_len: int,
                 max_batch_tokens: int = 2048, prefix_reuse: bool = True) -> None:
        self.model = model
        self.cache = model.new_cache(num_slots, max_seq_len)
        self.max_batch_tokens = max_batch_tokens
        # On CPU, which kernel attends each group, timed here for these heads, slots and lengths (`cpu_attention`).
        cfg, cache_dtype = model.cfg, self.cache.keys[0].dtype
        self.attention_kernels = (FLASH_ONLY if self.cache.keys[0].device.type != "cpu" else choose_attention_kernels(
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cache_dtype, max_rows=num_slots, max_len=max_seq_len))
        self._slots: OrderedDict[str, int] = OrderedDict()  # seq_id -> slot, least recently used first
        # Sequences whose cache ends with a draft tree (nodes in tree order, not a sequence) until
        # keep_path or a rollback to at most the tree's prefix.
        self._trees: dict[str, _PendingTree] = {}
        self.prefix_reuse = prefix_reuse and self.supports_prefix_reuse
        # With prefix reuse, the token behind each entry of each slot; a free slot keeps its last sequence's.
        self._held: list[list[int]] = [[] for _ in range(num_slots)]
        self.reused_tokens = 0  # prefill tokens copied from cached prefixes instead of computed, since start

    @classmethod
    def from_folder(cls, folder: Path, *, num_slots: int, max_seq_len: int, device: str = "cpu",
                    dtype: torch.dtype | str = "auto", prepack: bool = True, prefix_reuse: bool = True
                    ) -> ModelRunner:
        """A runner over the model in ``folder`` in ``dtype`` (a torch dtype, a name in `DTYPES`, or ``auto``: see
        `engine_dtype`); ``prepack`` (CPU only) adds oneDNN-packed linear weights for multi-token forwards (see
        `specfleet.engine.cpu_linear`)."""
        model = load_model(folder, device=device, dtype=dtype, prepack=prepack)
        max_seq_len = min(max_seq_len, model.cfg.max_position_embeddings)
        return cls(model, num_slots=num_slots, max_seq_len=max_seq_len, prefix_reuse=prefix_reuse)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def live_sequences(self) -> int:
        return len(self._slots)

    def cached_len(self, seq_id: str) -> int | None:
        slot = self._slots.get(seq_id)
        return None if slot is None else self._sequence_length(slot)

    def _sequence_length(self, slot: int) -> int:
        """Tokens of the sequence in ``slot``: here its cache entries, one per token."""
        return self.cache.lengths[slot]

    def _entry(self, slot: int, length: int) -> int:
        """The cache entry of the sequence in ``slot`` that holds its token ``length``: here the same index."""
        return length

    def _roll_back(self, slot: int, rollback_to: int, new_tokens: int) -> None:
        """Rolls the sequence in ``slot`` back to ``rollback_to`` tokens before ``new_tokens`` more are written."""
        self.cache.truncate(slot, rollback_to)

    def can_extend(self, seq_id: str, rollback_to: int) -> bool:
        """Whether a call with this rollback point can be served without resending the sequence."""
        if rollback_to == 0:
            return True
        cached = self.cached_len(seq_id)
        return cached is not None and cached >= rollback_to

    def warm_up(self, widths: tuple[int, ...] = (1, 2, 3, 5, 9, 17)) -> None:
        """Runs one forward at each width on a scratch sequence, then frees it: the first forward of a shape pays
        one-off costs (kernel selection, packed-weight and allocator warm-up) that would otherwise land on the
        first requests and in the latency telemetry the depth policy fits."""
        scratch = "__warm_up__"
        for width in widths:
            if width < self.max_seq_len:
                self.extend([Extend(scratch, 0, [0] * width, num_logits=width)])
        self.release([scratch])

    def release(self, seq_ids: list[str]) -> int:
        released = 0
        for seq_id in seq_ids:
            if seq_id in self._trees:
                self._leave_tree(seq_id, self._trees[seq_id].prefix_len)
            slot = self._slots.pop(seq_id, None)
            if slot is not None:
                self.cache.free(slot)  # its entries stay, with `_held` saying what they are, until it is taken again
                released += 1
        return released

    def truncate(self, seq_id: str, length: int) -> None:
        self._leave_tree(seq_id, length)
        slot = self._slots[seq_id]
        self.cache.truncate(slot, self._entry(slot, length))
        del self._held[slot][length:]

    def _leave_tree(self, seq_id: str, rollback_to: int) -> None:
        """A sequence ending with a draft tree may only roll back to the tree's prefix or before it."""
        pending = self._trees.get(seq_id)
        if pending is None:
            return
        if rollback_to > pending.prefix_len:
            raise ValueError(f"{seq_id}: its cache ends with a draft tree after {pending.prefix_len} tokens; "
                             f"roll back to at most that or call keep_path, not to {rollback_to}")
        del self._trees[seq_id]
        del self._held[self._slots[seq_id]][pending.prefix_len:]  # the nodes are no sequence's tokens

    @torch.inference_mode()
    def extend(self, requests: list[Extend]) -> list[torch.Tensor]:
        """Runs every request in as few forward passes as padding allows; returns per request its
        logits [num_logits, vocab] (float32). Raises UnknownSequenceError before touching anything
        if a request cannot be served, and ValueError if a sequence would outgrow the cache."""
        for r in requests:
            if not r.tokens or not 1 <= r.num_logits <= len(r.tokens):
                raise ValueError(f"{r.seq_id}: need >= 1 new token and 1 <= num_logits <= tokens")
        slots, requests = self._claim_slots(requests)
        return self._run_passes([len(r.tokens) for r in requests], slots, lambda group: self._chain_group(
            [requests[i] for i in group], [slots[i] for i in group]))

    @torch.inference_mode()
    def extend_tree(self, requests: list[TreeExtend]) -> list[torch.Tensor]:
        """Like ``extend``, with a draft tree after each sequence's committed tokens, verified in one
        forward pass with tree attention. Returns per request its logits [1 + nodes, vocab] (float32):
        row 0 at the last committed token, row j + 1 at node j, each equal to running node j's path as
        a chain. The cache then holds the nodes after the committed tokens; follow with ``keep_path``
        (or roll back to at most ``prefix_len``) before extending the sequence again."""
        for r in requests:
            if not r.tokens:
                raise ValueError(f"{r.seq_id}: need >= 1 new committed token (the tree's root)")
            if len(r.tree_parents) != len(r.tree_tokens) or any(
                    not ROOT_PARENT <= parent < j for j, parent in enumerate(r.tree_parents)):
                raise ValueError(f"{r.seq_id}: tree_parents must give each node {ROOT_PARENT} or an earlier node, "
                                 "one per tree token")
        slots, requests = self._claim_slots(requests)
        logits = self._run_passes([_new_tokens(r) for r in requests], slots, lambda group: (
            self._tree_group([requests[i] for i in group], [slots[i] for i in group])))
        for r in requests:
            self._trees[r.seq_id] = _PendingTree(r.prefix_len, list(r.tree_parents))
        return logits

    def _claim_slots(self, requests: list[Extend] | list[TreeExtend]) -> tuple[list[int], list[Any]]:
        """Checks what every extend needs (each sequence once, known to the cache, room for its new tokens), raising
        before anything changes; then gives each its slot, rolled back to ``rollback_to``. Returns the slots and the
        requests as they will run: one sent whole that starts from a cached prefix runs only what follows it."""
        ids = [r.seq_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a sequence may appear only once per extend call")
        for r in requests:
            if not self.can_extend(r.seq_id, r.rollback_to):
                raise UnknownSequenceError(r.seq_id)
            if r.rollback_to + _new_tokens(r) > self.max_seq_len:
                raise ValueError(f"{r.seq_id}: {r.rollback_to + _new_tokens(r)} tokens exceed the "
                                 f"cache's {self.max_seq_len}-token limit")
        for r in requests:
            self._leave_tree(r.seq_id, r.rollback_to)
        busy = set(ids)
        slots: list[int] = []
        claimed: list[Any] = []
        for r in requests:
            slot, r = self._claim(r, busy)
            slots.append(slot)
            claimed.append(r)
        for r, slot in zip(claimed, slots, strict=True):
            self._roll_back(slot, r.rollback_to, _new_tokens(r))
            del self._held[slot][r.rollback_to:]
        return slots, claimed

    def _claim(self, request: Extend | TreeExtend, busy: set[str]) -> tuple[int, Extend | TreeExtend]:
        """The slot of ``request``'s sequence (see `_acquire`) and the request as it will run there: one sent whole
        that starts from a cached prefix runs only what follows it."""
        prefix = self._cached_prefix(request) if self.prefix_reuse and request.rollback_to == 0 else None
        slot = self._acquire(request.seq_id, busy, prefix)
        if prefix is not None:
            request = self._start_from_prefix(request, slot, *prefix)
        return slot, request

    def _cached_prefix(self, request: Extend | TreeExtend) -> tuple[int, int] | None:
        """(slot, tokens): the longest prefix of a sequence sent whole that a slot holds, leaving at least the tokens
        whose logits the call returns to compute and that the slot can be cut back to (`_restorable`); among equals,
        the sequence's own slot, then a free one (which the sequence may move into instead of copying: see
        `_free_slot_for`). None when no slot holds one token of it that way."""
        tokens = request.tokens
        limit = len(tokens) - (request.num_logits if isinstance(request, Extend) else 1)
        if limit < 1:
            return None
        own = self._slots.get(request.seq_id)
        # A live sequence's draft tree is no prefix of anything: only the committed tokens before it count.
        committed = {self._slots[seq_id]: tree.prefix_len for seq_id, tree in self._trees.items()}
        best: tuple[int, bool, bool, int] | None = None  # (length, own, free, -slot): the largest wins
        for slot, held in enumerate(self._held):
            if not held or held[0] != tokens[0]:
                continue
            length = common_prefix_length(held, tokens, min(limit, committed.get(slot, limit)))
            if not self._restorable(slot, length):
                continue
            rank = (length, slot == own, self.cache.is_free(slot), -slot)
            if best is None or rank > best:
                best = rank
        return None if best is None else (-best[3], best[0])

    def _restorable(self, slot: int, length: int) -> bool:
        """Whether ``slot`` can be cut back to its first ``length`` tokens: here always, every entry is kept."""
        return True

    def _start_from_prefix(self, request: Extend | TreeExtend, slot: int, source: int, length: int
                           ) -> Extend | TreeExtend:
        """Gives ``slot`` the first ``length`` entries of ``source`` (copied unless they are the same slot) and
        returns ``request`` as the rest to run after them."""
        entries = self._entry(source, length)
        if source != slot:
            self.cache.copy_prefix(source, slot, entries)
            self._held[slot] = self._held[source][:length]
        self.cache.lengths[slot] = entries
        del self._held[slot][length:]
        self.reused_tokens += length
        log.debug("%s starts from %d cached tokens (slot %d) of the %d sent", request.seq_id, length, source,
                  len(request.tokens))
        return replace(request, rollback_to=length, tokens=request.tokens[length:])

    def keep_path(self, seq_id: str, prefix_len: int, node_indices: list[int]) -> None:
        """After ``extend_tree``, keep only the accepted path ``node_indices`` (root's child first):
        its keys/values move to positions prefix_len, prefix_len + 1, ... and the length becomes
        prefix_len + len(node_indices), exactly as if the path had been appended as a chain."""
        pending = self._trees.get(seq_id)
        if pending is None or pending.prefix_len != prefix_len:
            raise ValueError(f"{seq_id}: no draft tree after {prefix_len} committed tokens to keep a path of")
        parent = ROOT_PARENT
        for node in node_indices:
            if not 0 <= node < len(pending.parents) or pending.parents[node] != parent:
                raise ValueError(f"{seq_id}: {node_indices} is not a path from the root of its draft tree")
            parent = node
        slot = self._slots[seq_id]
        self.cache.compact(slot, self._entry(slot, prefix_len), node_indices)
        del self._trees[seq_id]
        if self.prefix_reuse:
            held = self._held[slot]
            held[prefix_len:] = [held[prefix_len + node] for node in node_indices]

    def _chain_group(self, requests: list[Extend], slots: list[int]) -> _Group:
        new_lens = [len(r.tokens) for r in requests]
        start_lens = [self.cache.lengths[s] for s in slots]
        layout = causal_layout(slots, start_lens, new_lens, self.model.lm_head.weight.device)
        logit_cols = [list(range(n - r.num_logits, n)) for r, n in zip(requests, new_lens, strict=True)]
        return _Group(layout, slots, [r.tokens for r in requests], logit_cols)

    def _tree_group(self, requests: list[TreeExtend], slots: list[int]) -> _Group:
        start_lens = [self.cache.lengths[s] for s in slots]
        layout = tree_layout(slots, start_lens, [len(r.tokens) for r in requests],
                             [r.tree_parents for r in requests], self.model.lm_head.weight.device)
        logit_cols = [list(range(len(r.tokens) - 1, len(r.tokens) + len(r.tree_tokens))) for r in requests]
        return _Group(layout, slots, [r.tokens + r.tree_tokens for r in requests], logit_cols)

    def _run_passes(self, widths: list[int], slots: list[int], group_of: Callable[[list[int]], _Group]
                    ) -> list[torch.Tensor]:
        """Runs requests (by their new-token ``widths``, in cache ``slots``) in as few forward passes as
        ``max_batch_tokens`` allows, each made of attention groups of similar width; returns each request's logits."""
        logits: list[torch.Tensor] = [torch.empty(0)] * len(widths)
        for groups in self._plan_passes(widths, slots):
            outputs = self._run([group_of(g) for g in groups])
            for i, out in zip([i for g in groups for i in g], outputs, strict=True):
                logits[i] = out
        return logits

    def _run(self, groups: list[_Group]) -> list[torch.Tensor]:
        """One forward over the groups' packed tokens; returns per row (group by group) the logits at its
        ``logit_cols``, and sets every slot's length to cover all of its new tokens."""
        device = self.model.lm_head.weight.device
        tokens = [t for g in groups for row in g.token_rows for t in row]
        layout = PassLayout([g.layout for g in groups], self.attention_kernels)
        logit_index = torch.cat([g.layout.packed_index([row for row, cols in enumerate(g.logit_cols) for _ in cols],
                                                       [col for cols in g.logit_cols for col in cols]) + start
                                 for g, (start, _) in zip(groups, layout.spans, strict=True)])
        out = self.model(torch.tensor(tokens, device=device), layout, self.cache, logit_index)
        for g in groups:
            for slot, row in zip(g.slots, g.token_rows, strict=True):
                self.cache.lengths[slot] += len(row)
                if self.prefix_reuse:
                    self._held[slot].extend(row)
        return list(out.split([len(cols) for g in groups for cols in g.logit_cols]))

    def _plan_passes(self, widths: list[int], slots: list[int]) -> list[list[list[int]]]:
        """Forward passes, each a list of attention groups (request indices). The layers run on packed tokens,
        so a pass costs what its real tokens cost: groups share a pass up to ``max_batch_tokens`` tokens.
        Each group lists its requests by slot, so attention can read the span of cache rows they cover through
        a view rather than gather a copy of every key and value in each layer (see `BatchLayout.slot_span`)."""
        passes: list[list[list[int]]] = []
        tokens = 0
        for group in self._plan_groups(widths):
            group.sort(key=slots.__getitem__)
            size = sum(widths[i] for i in group)
            if not passes or tokens + size > self.max_batch_tokens:
                passes.append([])
                tokens = 0
            passes[-1].append(group)
            tokens += size
        return passes

    def _plan_groups(self, widths: list[int]) -> list[list[int]]:
        """Attention groups: requests of similar width (new tokens), so that padding each to its group's
        widest wastes at most about half of the attention work."""
        order = sorted(range(len(widths)), key=lambda i: widths[i])
        groups: list[list[int]] = []
        current: list[int] = []
        for i in order:
            candidate = current + [i]
            width = widths[i]  # sorted: the newest is the widest
            real = sum(widths[j] for j in candidate)
            if current and (width * len(candidate) > 2 * real or width * len(candidate) > self.max_batch_tokens):
                groups.append(current)
                candidate = [i]
            current = candidate
        if current:
            groups.append(current)
        return groups

    def _acquire(self, seq_id: str, busy: set[str], prefix: tuple[int, int] | None = None) -> int:
        """The slot of ``seq_id``, given one if it has none (see `_free_slot_for`), after evicting the least recently
        used sequence outside ``busy`` if no slot is free. ``prefix``: the (slot, tokens) its start is taken from."""
        slot = self._slots.get(seq_id)
        if slot is not None:
            self._slots.move_to_end(seq_id)
            return slot
        if self.cache.num_free == 0:
            victim = next((s for s in self._slots if s not in busy), None)
            if victim is None:
                raise CacheFullError(f"all {self.num_slots} slots hold sequences of this batch")
            log.info("evicting sequence %s (least recently used) to make room for %s", victim, seq_id)
            self.release([victim])
        slot = self.cache.allocate(self._free_slot_for(prefix))
        if prefix is None or slot != prefix[0]:
            self._forget(slot)
        self._slots[seq_id] = slot
        return slot

    def _free_slot_for(self, prefix: tuple[int, int] | None) -> int:
        """The free slot a new sequence goes to. A free slot still holds its last sequence's entries for later
        prompts to start from, so a new sequence takes the one whose loss costs least: the slot its own prefix is
        in when most of what that slot holds is that prefix (a chat's next turn moves into its last turn's slot),
        else the free slot holding the fewest tokens it does not reuse (empty slots first, the lowest among equals).
        A new conversation that shares only a system prompt with a finished one copies those entries elsewhere
        rather than writing over the conversation, which its own next turn will need."""
        free = [s for s in range(self.num_slots) if self.cache.is_free(s)]
        source, length = prefix if prefix is not None else (-1, 0)
        if source in free and len(self._held[source]) - length <= length:
            return source
        return min(free, key=lambda s: (len(self._held[s]) - (length if s == source else 0), s))

    def _forget(self, slot: int) -> None:
        """A slot given to a new sequence that does not take over its entries: nothing in it is a prefix any more."""
        self._held[slot] = []


def _new_tokens(request: Extend | TreeExtend) -> int:
    """Cache entries a request writes: its tokens, and a tree's nodes."""
    return len(request.tokens) + (len(request.tree_tokens) if isinstance(request, TreeExtend) else 0)
