"""A quantized GGUF model drafts on the CPU through llama.cpp (``llama-cpp-python``'s low-level API).

Where a ``model`` drafter runs a float copy of a small LM in torch, this one runs the GGUF as it is packaged, 4-bit
quantized, with llama.cpp's CPU kernels: a fraction of the float copy's memory, and on a 2-core CPU a depth-4 draft
of SmolLM2-135M in about a quarter of the time at batch 1, half at batch 4 (docs/engine.md). Quantization moves its
drafts a little away from the float model's, which costs some acceptance and never correctness: the target
verifies every draft token.

One llama.cpp context holds every sequence. A sequence is a session on a llama.cpp sequence id (a slot) with its own
``max_seq_len`` cells of the context's KV cache; a request rolls its slot back with ``llama_memory_seq_rm`` and
appends what is new. As in `ModelDrafter`, each call runs one batch for the new tokens of all its sequences,
then one batch per further draft position with one token per sequence still drafting.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specfleet.drafters.base import DraftRequest, DraftResult
from specfleet.sampling import DRAFT_STREAM, sample_drafts, seeded_uniforms
from specfleet.sampling_params import SamplingParams

log = logging.getLogger("specfleet.llamacpp")

CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
              "-DGGML_AMX_BF16=OFF")
"""The llama.cpp build CI uses: a native build (-march=native, the default) crashed on its CPUs."""
INSTALL_HINT = (f"install it with CMAKE_ARGS=\"{CMAKE_ARGS}\" pip install 'specfleet[llamacpp]' (it builds llama.cpp "
                "from source: 10-20 minutes on 2 cores)")

Entry = tuple[int, int, int, bool]
"""One token of a llama.cpp batch: (slot, position, token, whether its logits are wanted)."""


def import_llama_cpp() -> Any:
    """The ``llama_cpp`` module, with its log sent to Python logging; ValueError saying how to install it if absent
    (a service that cannot start says so in one line, see ``specfleet.cli``)."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ValueError(f"--drafter llamacpp needs llama-cpp-python, which is not installed: {INSTALL_HINT}") from err
    _route_logs(llama_cpp)
    return llama_cpp


# ggml's enum ggml_log_level in the llama.cpp that llama-cpp-python 0.3.36 builds (NONE 0, DEBUG 1, INFO 2, WARN 3,
# ERROR 4, CONT 5; llama_cpp._logger still maps an older numbering): WARN and ERROR keep their level, the rest is DEBUG.
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_LOG_CONTINUATION = 5  # more of the previous message
_log_state: dict[str, Any] = {}


def _route_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's log to the ``specfleet.llamacpp`` logger, its many informational lines (the loader's
    metadata dump, buffer sizes) at DEBUG, so that a draft service's log shows llama.cpp's warnings and errors only.
    Once per process: the log callback is global."""
    if "callback" in _log_state:
        return

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level != _LOG_CONTINUATION:
            _log_state["level"] = _LOG_LEVELS.get(level, logging.DEBUG)
        message = text.decode("utf-8", "replace").rstrip("\n")
        if message:
            log.log(_log_state.get("level", logging.DEBUG), "%s", message)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    _log_state["callback"] = callback  # llama.cpp keeps only the C pointer: the Python object must stay alive


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The cores this process may keep busy: its affinity mask, capped by its cgroup's CPU quota (a container's CPU
    limit, which the mask does not show), rounded down: llama.cpp's threads meet at a barrier after every operation,
    so one thread more than the quota allows stalls them all whenever the quota throttles it."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        return max(1, min(cores, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 quota file, or "max": no quota
        return cores


class LlamaCppDrafter:
    """Drafts with a GGUF model in one llama.cpp context, each sequence a session on a slot of its KV cache."""

    kind = "llamacpp"

    def __init__(self, gguf: Path, *, num_slots: int = 32, max_seq_len: int = 2048, threads: int = 0,
                 top_k_pairs: int = 64, target_vocab_size: int | None = None) -> None:
        """``threads``: llama.cpp's threads for both single-token and batch decoding; 0 takes every core this process
        may use (llama.cpp's own default, 4, oversubscribes a small node and leaves most of a large one idle)."""
        lib = import_llama_cpp()
        lib.llama_backend_init()
        self._lib = lib
        model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if not model:
            raise ValueError(f"llama.cpp could not load {gguf} (not a GGUF model it supports?)")
        self.vocab_size: int = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        if target_vocab_size is not None and target_vocab_size != self.vocab_size:
            lib.llama_model_free(model)
            raise ValueError(
                f"draft model vocabulary ({self.vocab_size} tokens) differs from the target's "
                f"({target_vocab_size}): a llamacpp drafter must share the target's tokenizer")
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len, lib.llama_model_n_ctx_train(model))  # capped by the model, as the engine
        self.num_pairs = top_k_pairs
        self.threads = threads or available_cores()

        params = lib.llama_context_default_params()
        params.n_seq_max = num_slots
        params.n_ctx = num_slots * self.max_seq_len
        # One KV stream per slot, of n_ctx / n_seq_max = max_seq_len cells each, rather than one unified pool: with
        # the unified cache of llama-cpp-python 0.3.36's llama.cpp, a sequence's logits depended on the other
        # sequences of its batch once rollbacks had left holes in the cache (off by up to ~0.7, enough to change
        # greedy drafts), while separate streams give each sequence exactly what it gets alone.
        params.kv_unified = False
        # A whole sequence fits one decode, so a lone prompt is never split; larger first batches are (`_decode_all`).
        params.n_batch = self.max_seq_len
        params.n_threads = params.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            raise ValueError(f"llama.cpp could not create a context of {num_slots} sequences x {self.max_seq_len} "
                             f"tokens for {gguf} (too many slots, or out of memory?)")
        self._ctx = ctx
        self._memory = lib.llama_get_memory(ctx)
        self._n_batch: int = lib.llama_n_batch(ctx)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        # The native objects are freed when the drafter is closed or collected, the context before its model.
        self._free_native = weakref.finalize(self, _free_native, lib, self._batch, ctx, model)

        self._slots: OrderedDict[str, int] = OrderedDict()  # seq_id -> slot, least recently used first
        self._lengths = [0] * num_slots  # tokens each slot holds
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        log.info("llamacpp drafter: %s, vocabulary %d, %d slots x %d tokens, %d threads", gguf.name,
                 self.vocab_size, num_slots, self.max_seq_len, self.threads)

    def close(self) -> None:
        """Frees the llama.cpp model, context and batch now (otherwise when the drafter is collected)."""
        self._free_native()

    def warm_up(self, widths: tuple[int, ...] = (1, 2, 3, 5, 9, 17)) -> None:
        """Drafts one token after a prompt of each width on a scratch sequence, then frees it: the first decodes pay
        one-off costs (thread start, buffer set-up) that would otherwise land on the first requests and in the
        latency telemetry the depth policy fits."""
        scratch = "__warm_up__"
        for width in widths:
            if width < self.max_seq_len:
                self.propose([DraftRequest(scratch, 0, [0] * width, 1, SamplingParams())])
        self.release([scratch])

    # -- sessions -----------------------------------------------------------------------------------

    @property
    def live_sequences(self) -> int:
        return len(self._slots)

    def cached_len(self, seq_id: str) -> int | None:
        slot = self._slots.get(seq_id)
        return None if slot is None else self._lengths[slot]

    def release(self, seq_ids: list[str]) -> int:
        released = 0
        for seq_id in seq_ids:
            slot = self._slots.pop(seq_id, None)
            if slot is not None:
                self._lib.llama_memory_seq_rm(self._memory, slot, 0, -1)  # the whole sequence: never fails
                self._lengths[slot] = 0
                self._free.append(slot)
                released += 1
        return released

    def _known(self, request: DraftRequest) -> bool:
        """Whether the request can be served without resending its sequence (a new one starts at 0)."""
        if request.rollback_to == 0:
            return True
        cached = self.cached_len(request.seq_id)
        return cached is not None and cached >= request.rollback_to

    def _acquire(self, seq_id: str, busy: set[str]) -> int:
        """The slot of ``seq_id``, made most recently used; a new sequence takes a free slot, else that of the least
        recently used sequence outside this call (its owner will see it unknown and resend it)."""
        slot = self._slots.get(seq_id)
        if slot is not None:
            self._slots.move_to_end(seq_id)
            return slot
        if not self._free:
            victim = next(s for s in self._slots if s not in busy)  # `propose` checked that one exists
            log.info("evicting sequence %s (least recently used) to make room for %s", victim, seq_id)
            self.release([victim])
        slot = self._free.pop()
        self._slots[seq_id] = slot
        return slot

    # -- drafting -------------------------------------------------------------------------------------

    def propose(self, requests: list[DraftRequest]) -> list[DraftResult]:
        """Drafts for every request. This drafter builds no trees: a tree request gets a chain (a valid tree, one
        child per node) of as many tokens as its shape's levels and node budget allow, returned as a chain
        (``parents`` None), which the target verifies as one."""
        ids = [r.seq_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a sequence may appear only once per propose call")
        results = {r.seq_id: DraftResult.unknown(r.seq_id) for r in requests if not self._known(r)}
        active = [r for r in requests if r.seq_id not in results]
        for r in active:
            if r.depth > 0 and not r.new_tokens:
                raise ValueError(f"{r.seq_id}: need >= 1 new token to draft from")
            if r.position > self.max_seq_len:
                raise ValueError(f"{r.seq_id}: {r.position} tokens exceed the cache's {self.max_seq_len}-token limit")
        if len(active) > self.num_slots:
            raise ValueError(f"{len(active)} sequences in one call, more than the drafter's {self.num_slots} slots")

        busy = {r.seq_id for r in active}
        slots = {r.seq_id: self._acquire(r.seq_id, busy) for r in active}
        try:
            drafts, pairs = self._draft(active, slots)
        except BaseException:
            # A failed decode may leave part of a batch in the cache: forget these sequences rather than hold
            # a cache that differs from what cached_len says (their owners resend them).
            self.release(list(busy))
            raise
        for r in active:
            tokens = drafts[r.seq_id]
            draft_top_k = None
            if not r.sampling.greedy:
                got = pairs[r.seq_id]
                k = self.num_pairs
                draft_top_k = (torch.stack([p[0] for p in got]) if got else torch.empty(0, k, dtype=torch.long),
                               torch.stack([p[1] for p in got]) if got else torch.empty(0, k))
            results[r.seq_id] = DraftResult(r.seq_id, known=True, tokens=tokens, draft_top_k=draft_top_k,
                                            cached_len=self._lengths[slots[r.seq_id]])
        return [results[r.seq_id] for r in requests]

    def _draft_count(self, request: DraftRequest) -> int:
        """Tokens to draft: the depth asked for (for a tree, what a chain of its shape and node budget holds),
        cut so that the drafts fed back (all but the last) stay within max_seq_len."""
        count = request.depth
        if request.tree is not None:
            budget = request.tree.nodes if request.max_nodes == 0 else min(request.tree.nodes, request.max_nodes)
            count = min(count, request.tree.levels, budget)
        return max(0, min(count, self.max_seq_len - request.position + 1))

    def _draft(self, requests: list[DraftRequest], slots: dict[str, int]
               ) -> tuple[dict[str, list[int]], dict[str, list[tuple[torch.Tensor, torch.Tensor]]]]:
        counts = {r.seq_id: self._draft_count(r) for r in requests}
        drafts: dict[str, list[int]] = {r.seq_id: [] for r in requests}
        pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {r.seq_id: [] for r in requests}
        uniforms = {r.seq_id: seeded_uniforms(r.seed, r.position, DRAFT_STREAM, r.depth)
                    for r in requests if not r.sampling.greedy}

        # Position 0: roll back, then the new tokens of every sequence, logits at the last one of each that drafts.
        entries: list[Entry] = []
        for r in requests:
            slot = slots[r.seq_id]
            if not self._lib.llama_memory_seq_rm(self._memory, slot, r.rollback_to, -1):
                raise ValueError(f"{r.seq_id}: llama.cpp cannot roll this model's cache back to {r.rollback_to} "
                                 "tokens (a recurrent or sliding-window model?)")
            self._lengths[slot] = r.position
            last = len(r.new_tokens) - 1
            entries += [(slot, r.rollback_to + i, token, i == last and counts[r.seq_id] > 0)
                        for i, token in enumerate(r.new_tokens)]
        drafting = [r for r in requests if counts[r.seq_id] > 0]
        logits = self._decode_all(entries)
        for step in range(max(counts.values(), default=0)):
            if step > 0:  # each later position feeds every sequence still drafting its previous draft
                logits = self._decode_all([(slots[r.seq_id], r.position + step - 1, drafts[r.seq_id][-1], True)
                                           for r in drafting])
                for r in drafting:
                    self._lengths[slots[r.seq_id]] += 1
            tokens, chosen = sample_drafts(logits, [r.sampling for r in drafting],
                                           [float(uniforms[r.seq_id][step]) if r.seq_id in uniforms else 0.0
                                            for r in drafting], self.num_pairs)
            for r, token, pair in zip(drafting, tokens, chosen, strict=True):
                drafts[r.seq_id].append(token)
                if pair is not None:
                    pairs[r.seq_id].append(pair)
            drafting = [r for r in drafting if len(drafts[r.seq_id]) < counts[r.seq_id]]
        return drafts, pairs

    def _decode_all(self, entries: list[Entry]) -> torch.Tensor:
        """Decodes ``entries`` in batches of at most n_batch tokens; the logits wanted, in order, [n, vocab] float32.
        One batch's are a view on llama.cpp's output buffer (valid until the next decode); several batches' are
        copied out as each next one overwrites the buffer."""
        if len(entries) <= self._n_batch:
            return self._decode(entries)
        parts = [self._decode(entries[start: start + self._n_batch]).clone()
                 for start in range(0, len(entries), self._n_batch)]
        return torch.cat(parts)

    def _decode(self, entries: list[Entry]) -> torch.Tensor:
        """One ``llama_decode``; the logits of the entries that want them, in order, as a view on llama.cpp's output
        buffer when its rows lie in that order (as they do), else a copy."""
        lib, batch = self._lib, self._batch
        batch.n_tokens = len(entries)
        for i, (slot, position, token, wants_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = wants_logits
        if entries:
            status = lib.llama_decode(self._ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode of {len(entries)} tokens failed with status {status}")
        rows = [lib.llama_get_logits_ith(self._ctx, i) for i, entry in enumerate(entries) if entry[3]]
        if not rows:
            return torch.empty(0, self.vocab_size)
        if not all(rows):
            raise RuntimeError("llama.cpp returned no logits for a token that asked for them")
        addresses = [ctypes.addressof(row.contents) for row in rows]
        row_bytes = self.vocab_size * ctypes.sizeof(ctypes.c_float)
        if all(b - a == row_bytes for a, b in zip(addresses, addresses[1:], strict=False)):
            return torch.from_numpy(np.ctypeslib.as_array(rows[0], shape=(len(rows), self.vocab_size)))
        return torch.stack([torch.from_numpy(np.ctypeslib.as_array(row, shape=(self.vocab_size,))) for row in rows])


def _free_native(lib: Any, batch: Any, ctx: Any, model: Any) -> None:
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    lib.llama_model_free(model)
