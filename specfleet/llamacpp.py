"""A GGUF model as sequences over llama.cpp's KV cache (``llama-cpp-python``'s low-level API): what the llamacpp
drafter and the llamacpp target backend share.

`LlamaCppRunner` offers the session interface of the engine's `ModelRunner` for chains: a caller names sequences by
``seq_id`` and sends, per call, the length to roll back to and the tokens to append; `extend` returns the logits of
the last tokens of each. One llama.cpp context holds every sequence, each on a llama.cpp sequence id (a slot) with
its own ``max_seq_len`` cells; a rollback is ``llama_memory_seq_rm``. Many sequences' tokens go through one
``llama_decode``. Verifying draft trees is not supported: tree attention inside one sequence has no llama.cpp batch
form (its multi-sequence tokens share a cell between sequences, not a path within one), so tree verifies stay with
the engine. A drafter builds trees on scratch slots instead, one branch per slot, each a copy of the sequence's cache
(`copy_slot`).
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

from specfleet.engine.kv_cache import CacheFullError
from specfleet.engine.runner import Extend, TreeExtend, UnknownSequenceError

log = logging.getLogger("specfleet.llamacpp")

def cmake_args(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The llama.cpp build flags CI uses: AVX2, plus AVX-512 where this CPU has it (an AVX-512 build dies with
    "Illegal instruction" on a CPU without), never AMX or -march=native (a native build crashed on CPUs with AMX
    tiles)."""
    try:
        avx512 = "ON" if "avx512f" in cpuinfo.read_text().split() else "OFF"
    except OSError:
        avx512 = "OFF"
    return (f"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512={avx512} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
            "-DGGML_AMX_BF16=OFF")


def install_hint() -> str:
    return (f"install it with CMAKE_ARGS=\"{cmake_args()}\" pip install 'specfleet[llamacpp]' (it builds llama.cpp "
            "from source: 10-20 minutes on 2 cores)")


Entry = tuple[int, int, int, bool]
"""One token of a llama.cpp batch: (slot, position, token, whether its logits are wanted)."""


def import_llama_cpp(needed_by: str = "--drafter llamacpp") -> Any:
    """The ``llama_cpp`` module, with its log sent to Python logging; ValueError saying how to install it if absent
    (a service that cannot start says so in one line, see ``specfleet.cli``)."""
    try:
        import llama_cpp
    except ImportError as err:
        raise ValueError(f"{needed_by} needs llama-cpp-python, which is not installed: {install_hint()}") from err
    _route_logs(llama_cpp)
    return llama_cpp


# ggml's enum ggml_log_level in the llama.cpp that llama-cpp-python 0.3.36 builds (NONE 0, DEBUG 1, INFO 2, WARN 3,
# ERROR 4, CONT 5; llama_cpp._logger still maps an older numbering): WARN and ERROR keep their level, the rest is DEBUG.
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_LOG_CONTINUATION = 5  # more of the previous message
_log_state: dict[str, Any] = {}


def _route_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's log to the ``specfleet.llamacpp`` logger, its many informational lines (the loader's
    metadata dump, buffer sizes) at DEBUG, so that a service's log shows llama.cpp's warnings and errors only.
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


PROBE_WIDTHS = (128, 64, 32, 16, 8, 4, 2)


def exact_micro_batch(lib: Any, model: Any, threads: int) -> int:
    """The widest of `PROBE_WIDTHS` whose tokens, decoded together in one micro-batch, get exactly the logits they
    get decoded one at a time (1 if none does), measured on a scratch context of this model on this machine."""
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 8 + max(PROBE_WIDTHS)
    params.n_threads = params.n_threads_batch = threads
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise ValueError("llama.cpp could not create a scratch context to measure its micro-batch")
    vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    memory = lib.llama_get_memory(ctx)
    batch = lib.llama_batch_init(params.n_batch, 0, 1)
    tokens = [(97 * i) % (vocab - 2) + 1 for i in range(8 + max(PROBE_WIDTHS))]

    def decode(start: int, count: int) -> np.ndarray:
        """Logits of tokens[start: start + count], decoded in one batch after tokens[:start]."""
        batch.n_tokens = count
        for i in range(count):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tokens[start + i], start + i, 1, True
            batch.seq_id[i][0] = 0
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed while measuring the micro-batch")
        return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy()
                         for i in range(count)])

    try:
        decode(0, 8)
        alone = np.concatenate([decode(8 + i, 1) for i in range(max(PROBE_WIDTHS))])
        for width in PROBE_WIDTHS:
            lib.llama_memory_seq_rm(memory, 0, 8, -1)
            if np.array_equal(decode(8, width), alone[:width]):
                return width
        return 1
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)


class LlamaCppRunner:
    """A GGUF model in one llama.cpp context, each sequence a session on a slot of its KV cache."""

    supports_trees = False  # see the module's docstring
    reused_tokens = 0  # every prompt is computed in full: no prefix of one sequence's cache is given to another

    def __init__(self, gguf: Path, *, num_slots: int = 32, max_seq_len: int = 2048, threads: int = 0,
                 batch_invariant: bool = False, scratch_slots: int = 0, needed_by: str = "--drafter llamacpp") -> None:
        """``threads``: llama.cpp's threads for both single-token and batch decoding; 0 takes every core this process
        may use (llama.cpp's own default, 4, oversubscribes a small node and leaves most of a large one idle).

        ``scratch_slots``: slots beyond ``num_slots`` that hold no sequence of their own, each with its own
        ``max_seq_len`` cells: `copy_slot` fills one with a copy of a sequence's cache, for a draft that continues
        it in several ways at once (the branches of a draft tree).

        ``batch_invariant``: every token's logits are exactly those of decoding it alone, one token at a time,
        whatever else shares its decode (what a lossless target needs). llama.cpp's CPU matrix products switch to
        another kernel, with another rounding, once a micro-batch holds enough tokens (64 on the machine this was
        measured on: logits off by up to ~1, enough to flip a greedy near-tie); so the runner measures at load the
        widest micro-batch whose logits are still exact (`exact_micro_batch`) and has llama.cpp split every decode
        into micro-batches of that size. Prefills get slower (1.5x for 1000 tokens on a 2-core CPU), verifies of a
        few tokens per sequence do not."""
        lib = import_llama_cpp(needed_by)
        lib.llama_backend_init()
        self._lib = lib
        self.gguf = gguf
        model = lib.llama_model_load_from_file(str(gguf).encode(), lib.llama_model_default_params())
        if not model:
            raise ValueError(f"llama.cpp could not load {gguf} (not a GGUF model it supports?)")
        vocab = lib.llama_model_get_vocab(model)
        self.vocab_size: int = lib.llama_vocab_n_tokens(vocab)
        # llama.cpp's own end-of-generation tokens (end of sequence, end of turn, ...), where its decoding stops.
        self.eos_token_ids = [t for t in range(self.vocab_size) if lib.llama_vocab_is_eog(vocab, t)]
        self.num_slots = num_slots
        self.max_seq_len = min(max_seq_len, lib.llama_model_n_ctx_train(model))  # capped by the model, as the engine
        self.threads = threads or available_cores()

        params = lib.llama_context_default_params()
        params.n_seq_max = num_slots + scratch_slots
        params.n_ctx = params.n_seq_max * self.max_seq_len
        # One KV stream per slot, of n_ctx / n_seq_max = max_seq_len cells each, rather than one unified pool: with
        # the unified cache of llama-cpp-python 0.3.36's llama.cpp, a sequence's logits depended on the other
        # sequences of its batch once rollbacks had left holes in the cache (off by up to ~0.7, enough to change
        # greedy tokens), while separate streams give each sequence exactly what it gets alone.
        params.kv_unified = False
        # A whole sequence fits one decode, so a lone prompt is never split; larger batches are (`decode`).
        params.n_batch = self.max_seq_len
        params.n_threads = params.n_threads_batch = self.threads
        self.micro_batch = exact_micro_batch(lib, model, self.threads) if batch_invariant else params.n_ubatch
        params.n_ubatch = min(self.micro_batch, params.n_batch)
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            raise ValueError(f"llama.cpp could not create a context of {num_slots} sequences x {self.max_seq_len} "
                             f"tokens for {gguf} (too many slots, or out of memory?)")
        self._ctx = ctx
        self._memory = lib.llama_get_memory(ctx)
        self._n_batch: int = lib.llama_n_batch(ctx)
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        # The native objects are freed when the runner is closed or collected, the context before its model.
        self._free_native = weakref.finalize(self, _free_native, lib, self._batch, ctx, model)

        self._slots: OrderedDict[str, int] = OrderedDict()  # seq_id -> slot, least recently used first
        self._lengths = [0] * (num_slots + scratch_slots)  # tokens each slot holds
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.scratch_slots = list(range(num_slots, num_slots + scratch_slots))
        log.info("llama.cpp: %s, vocabulary %d, %d slots x %d tokens, %d threads, micro-batches of %d tokens%s",
                 gguf.name, self.vocab_size, num_slots, self.max_seq_len, self.threads, self.micro_batch,
                 " (the widest whose logits equal one-token decoding)" if batch_invariant else "")

    def close(self) -> None:
        """Frees the llama.cpp model, context and batch now (otherwise when the runner is collected)."""
        self._free_native()

    def warm_up(self, widths: tuple[int, ...] = (1, 2, 3, 5, 9, 17)) -> None:
        """Runs one decode at each width on a scratch sequence, then frees it: the first decodes pay one-off costs
        (thread start, buffer set-up) that would otherwise land on the first requests and in the latency telemetry
        the depth policy fits."""
        scratch = "__warm_up__"
        for width in widths:
            if width < self.max_seq_len:
                self.extend([Extend(scratch, 0, [0] * width, num_logits=width)])
        self.release([scratch])

    # -- sessions -----------------------------------------------------------------------------------

    @property
    def live_sequences(self) -> int:
        return len(self._slots)

    def cached_len(self, seq_id: str) -> int | None:
        slot = self._slots.get(seq_id)
        return None if slot is None else self._lengths[slot]

    def can_extend(self, seq_id: str, rollback_to: int) -> bool:
        """Whether a call with this rollback point can be served without resending the sequence."""
        if rollback_to == 0:
            return True
        cached = self.cached_len(seq_id)
        return cached is not None and cached >= rollback_to

    def release(self, seq_ids: list[str]) -> int:
        released = 0
        for seq_id in seq_ids:
            slot = self._slots.pop(seq_id, None)
            if slot is not None:
                self.clear_slot(slot)
                self._free.append(slot)
                released += 1
        return released

    def truncate(self, seq_id: str, length: int) -> None:
        """Keeps the first ``length`` tokens of ``seq_id`` (a verify drops its rejected drafts)."""
        self.roll_back(self._slots[seq_id], length)

    def roll_back(self, slot: int, length: int) -> None:
        """Drops every token of the sequence in ``slot`` from ``length`` on."""
        if not self._lib.llama_memory_seq_rm(self._memory, slot, length, -1):
            raise ValueError(f"llama.cpp cannot roll {self.gguf.name}'s cache back to {length} tokens (a recurrent or "
                             "sliding-window model?)")
        self._lengths[slot] = min(self._lengths[slot], length)

    def copy_slot(self, source: int, destination: int, length: int) -> None:
        """Makes ``destination`` hold the first ``length`` tokens that ``source`` holds. llama.cpp copies a slot's
        whole cache (all ``max_seq_len`` cells, however few hold tokens) at the start of the next decode, before that
        decode's tokens enter ``source``."""
        self.clear_slot(destination)
        self._lib.llama_memory_seq_cp(self._memory, source, destination, -1, -1)
        self._lengths[destination] = self._lengths[source]
        self.roll_back(destination, length)

    def clear_slot(self, slot: int) -> None:
        """Empties a slot (removing a whole sequence never fails)."""
        self._lib.llama_memory_seq_rm(self._memory, slot, 0, -1)
        self._lengths[slot] = 0

    def claim(self, requests: list[tuple[str, int, int]]) -> list[int]:
        """Checks what every call needs ((seq_id, rollback_to, new tokens): each sequence once, known, room for its
        new tokens), raising before anything changes; then gives each its slot, rolled back to ``rollback_to``. A new
        sequence takes a free slot, else that of the least recently used sequence outside this call (its owner will
        see it unknown and resend it)."""
        ids = [seq_id for seq_id, _, _ in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a sequence may appear only once per call")
        for seq_id, rollback_to, new in requests:
            if not self.can_extend(seq_id, rollback_to):
                raise UnknownSequenceError(seq_id)
            if rollback_to + new > self.max_seq_len:
                raise ValueError(f"{seq_id}: {rollback_to + new} tokens exceed the cache's {self.max_seq_len}-token "
                                 "limit")
        if len(requests) > self.num_slots:
            raise CacheFullError(f"{len(requests)} sequences in one call, more than the {self.num_slots} slots")
        busy = set(ids)
        slots = [self._acquire(seq_id, busy) for seq_id in ids]
        for slot, (_, rollback_to, _) in zip(slots, requests, strict=True):
            self.roll_back(slot, rollback_to)
        return slots

    def _acquire(self, seq_id: str, busy: set[str]) -> int:
        slot = self._slots.get(seq_id)
        if slot is not None:
            self._slots.move_to_end(seq_id)
            return slot
        if not self._free:
            victim = next(s for s in self._slots if s not in busy)  # `claim` checked that one exists
            log.info("evicting sequence %s (least recently used) to make room for %s", victim, seq_id)
            self.release([victim])
        slot = self._free.pop()
        self._slots[seq_id] = slot
        return slot

    # -- decoding -------------------------------------------------------------------------------------

    def extend(self, requests: list[Extend]) -> list[torch.Tensor]:
        """Rolls each sequence back and appends its tokens, all in as few decodes as llama.cpp's batch allows;
        returns per request the logits of its last ``num_logits`` tokens [num_logits, vocab] (float32, copies).
        Raises UnknownSequenceError before touching anything if a request cannot be served."""
        for r in requests:
            if not r.tokens or not 1 <= r.num_logits <= len(r.tokens):
                raise ValueError(f"{r.seq_id}: need >= 1 new token and 1 <= num_logits <= tokens")
        slots = self.claim([(r.seq_id, r.rollback_to, len(r.tokens)) for r in requests])
        entries: list[Entry] = []
        for r, slot in zip(requests, slots, strict=True):
            first_logit = len(r.tokens) - r.num_logits
            entries += [(slot, r.rollback_to + i, token, i >= first_logit) for i, token in enumerate(r.tokens)]
        try:
            logits = self.decode(entries)
        except BaseException:
            # A failed decode may leave part of a batch in the cache: forget these sequences rather than hold a
            # cache that differs from what cached_len says (their owners resend them).
            self.release([r.seq_id for r in requests])
            raise
        if len(requests) == 1:
            return [logits.clone()]
        return list(torch.split(logits.clone(), [r.num_logits for r in requests]))

    def extend_tree(self, requests: list[TreeExtend]) -> list[torch.Tensor]:
        raise ValueError("the llamacpp backend verifies draft chains, not trees (llama.cpp has no tree attention "
                         "within a sequence): use the engine backend for --tree")

    def keep_path(self, seq_id: str, prefix_len: int, node_indices: list[int]) -> None:
        raise ValueError("the llamacpp backend holds no draft trees")

    def decode(self, entries: list[Entry]) -> torch.Tensor:
        """Decodes ``entries`` in batches of at most n_batch tokens (a sequence's tokens in position order); the
        logits wanted, in order, [n, vocab] float32. Each slot then holds the tokens up to its last entry. One
        batch's logits are a view on llama.cpp's output buffer (valid until the next decode); several batches' are
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
            for slot, position, _, _ in entries:
                self._lengths[slot] = position + 1
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
