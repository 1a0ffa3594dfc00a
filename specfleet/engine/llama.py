"""Our own forward pass for the Llama family (Llama, SmolLM, Mistral, Qwen2, Qwen3) over a slot KV cache.

Module names mirror ``transformers`` so a checkpoint's state dict loads as is. One ``forward`` call
extends a batch of sequences by a ragged number of new tokens each (prefill and decode alike), laid
out as chains (``causal_layout``) or as committed tokens followed by a draft tree (``tree_layout``).

The layers run on the real new tokens packed into one [tokens, hidden] matrix, so a batch costs what its
tokens cost however ragged it is: one sequence verifying 9 tokens next to 31 decoding one does not make
the others pay for 9. Only attention sees sequences padded, in groups of similar width (``PassLayout``).

A sliding window (Mistral, Qwen when enabled) is a mask only: the cache keeps every entry, as it must for
rollback by length, and the windowed layers' attention ignores the ones out of reach (``BatchLayout.windowed``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from specfleet.engine.cpu_attention import BIAS_KERNELS, FLASH_ONLY, AttentionKernels, Kernel
from specfleet.engine.kv_cache import SlotKVCache
from specfleet.engine.rope import RopeScaling, apply_rope, rope_cos_sin
from specfleet.trees.structure import tree_attention_mask, tree_depths, tree_position_ids

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""The ``model_type`` values of a ``config.json`` this forward runs: Llama 1-3 (SmolLM too), Mistral, Qwen2, Qwen3."""

SUPPORTED_HIDDEN_ACTS = ("silu",)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the forward pass needs, read from a Hugging Face ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: RopeScaling = RopeScaling()
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and k before RoPE
    # Each token attends to at most the last ``sliding_window`` positions (itself included) in the layers
    # ``window_layers``; None: every layer attends to the whole sequence.
    sliding_window: int | None = None
    window_layers: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """Reads a ``config.json``; raises ValueError naming what this forward does not implement."""
        model_type = raw.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            architectures = ", ".join(raw.get("architectures") or []) or "no architectures listed"
            raise ValueError(f"unsupported architecture: model_type {model_type!r} ({architectures}); supported "
                             f"model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act not in SUPPORTED_HIDDEN_ACTS:
            raise ValueError(f"unsupported hidden_act {hidden_act!r} in a {model_type} model; supported: "
                             f"{', '.join(SUPPORTED_HIDDEN_ACTS)}")
        if raw.get("mlp_bias"):
            raise ValueError(f"unsupported mlp_bias in a {model_type} model: the MLP here has no biases")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        heads, num_layers = raw["num_attention_heads"], raw["num_hidden_layers"]
        sliding_window, window_layers = _sliding_window(raw, model_type, num_layers)
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            # Qwen2 has biases on q/k/v without saying so in its config.
            attention_bias=raw.get("attention_bias", model_type == "qwen2"),
            rope_scaling=RopeScaling.from_dict(rope),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            window_layers=window_layers,
        )


def _sliding_window(raw: dict, model_type: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """The window and the layers using it, as ``transformers`` reads them: Mistral windows every layer whenever
    ``sliding_window`` is set; Qwen2 and Qwen3 only with ``use_sliding_window``, in the layers ``layer_types``
    marks ``sliding_attention`` (by default those from ``max_window_layers`` on); Llama has none."""
    window = raw.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, ()
    if model_type == "mistral":
        layers = tuple(range(num_layers))
    else:
        if not raw.get("use_sliding_window", False):
            return None, ()
        layer_types = raw.get("layer_types") or [
            "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
            for i in range(num_layers)]
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    if window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {window}")
    return (window, layers) if layers else (None, ())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@dataclass
class BatchLayout:
    """Where one attention group's new tokens go (sequences padded to its widest): built once per forward,
    shared by every layer."""

    slots: torch.Tensor  # [batch] cache slot of each sequence
    positions: torch.Tensor  # [batch, tokens] position (RoPE) of each new token (0 for padding)
    valid: torch.Tensor  # [batch, tokens] True for real tokens, False for padding
    attn_mask: torch.Tensor  # [batch, 1, tokens, kv_len] True where a token may attend to a cache entry
    kv_len: int  # cache entries gathered per sequence: the longest sequence after the extend
    # [batch, tokens] cache entry each new token's key/value is written to; None: its position. Tree
    # nodes differ: siblings share a position but each has its own entry.
    cache_index: torch.Tensor | None = None

    @property
    def write_index(self) -> torch.Tensor:  # [batch, tokens]
        return self.positions if self.cache_index is None else self.cache_index

    @cached_property
    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every real new token, each [real tokens], row by row: the packed order."""
        rows, cols = self.valid.nonzero(as_tuple=True)
        return rows, cols

    @cached_property
    def unpadded(self) -> bool:
        """Every row is full: the packed tokens are the padded group, flattened."""
        return len(self.packed[0]) == self.valid.numel()

    def packed_index(self, rows: list[int], cols: list[int]) -> torch.Tensor:
        """Where the new tokens at (``rows``, ``cols``) of the padded group sit in the packed order."""
        index = torch.full(self.valid.shape, -1, dtype=torch.long, device=self.valid.device)
        packed_rows, packed_cols = self.packed
        index[packed_rows, packed_cols] = torch.arange(len(packed_rows), device=self.valid.device)
        return index[torch.tensor(rows, device=index.device), torch.tensor(cols, device=index.device)]

    def kernel(self, kernels: AttentionKernels) -> Kernel:
        """The attention kernel ``kernels`` chooses for this group's width, the rows it reads and their entries on
        CPU; the flash kernel elsewhere."""
        if self.valid.device.type != "cpu":
            return Kernel.FLASH
        rows_read = len(self.slots) if self.slot_span is None else self.slot_span.stop - self.slot_span.start
        return kernels.kernel(self.valid.shape[1], rows_read, self.kv_len)

    def attend(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               kernel: Kernel = Kernel.FLASH) -> torch.Tensor:
        """Attention for this group's packed queries ``q`` ([tokens, heads, head_dim]) over the cache, by
        ``kernel``."""
        keys, values = self.read(key_cache), self.read(value_cache)
        width = self.valid.shape[1]
        if self.span_rows is None and self.unpadded:  # the rows read are the group, in order, every row full
            out = self._attention(q.view(len(self.slots), width, *q.shape[1:]).transpose(1, 2), keys, values, kernel)
            return out.transpose(1, 2).reshape(q.shape)
        rows, cols = self.packed_rows, self.packed[1]
        padded = q.new_zeros(keys.shape[0], width, *q.shape[1:])
        padded[rows, cols] = q
        return self._attention(padded.transpose(1, 2), keys, values, kernel).transpose(1, 2)[rows, cols]

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        """q [rows, heads, width, head_dim] over the rows read; the same shape out."""
        if kernel is Kernel.FLASH:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.read_mask, enable_gqa=True)
        return BIAS_KERNELS[kernel](q, keys, values, self.read_bias)

    @cached_property
    def read_bias(self) -> torch.Tensor:  # [rows, 1, 1, width, kv_len]
        """``read_mask`` as an additive bias (0 or -inf), laid out for `grouped_attention`; built once per pass."""
        mask = self.read_mask
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
        return bias.unsqueeze(1)

    @cached_property
    def slot_span(self) -> slice | None:
        """The cache rows lo..hi this group reads through a view, or None to gather its own rows: a view when its
        slots span at most twice as many rows as it has sequences, where the filler rows' attention costs less
        than copying every member's keys and values in each layer (measured in bench/engine_kernels.md)."""
        lo, hi = int(self.slots.min()), int(self.slots.max())
        return slice(lo, hi + 1) if hi + 1 - lo <= 2 * len(self.slots) else None

    def read(self, cache_layer: torch.Tensor) -> torch.Tensor:  # [rows, kv_heads, kv_len, head_dim]
        """The rows of one layer's keys or values ([slots, kv_heads, max_len, head_dim]) that attention reads."""
        if self.slot_span is not None:
            return cache_layer[self.slot_span, :, : self.kv_len]
        # index_select copies whole [kv_len, head_dim] runs; advanced indexing goes element by element.
        return cache_layer[:, :, : self.kv_len].index_select(0, self.slots)

    @cached_property
    def span_rows(self) -> torch.Tensor | None:
        """Each sequence's row among those read; None when they are rows 0, 1, ... in order (a gather, or a
        span of exactly the group's slots in slot order)."""
        if self.slot_span is None:
            return None
        rows = self.slots - self.slot_span.start
        in_order = torch.arange(self.slot_span.stop - self.slot_span.start, device=rows.device)
        return None if torch.equal(rows, in_order) else rows

    @cached_property
    def packed_rows(self) -> torch.Tensor:  # [real tokens] the row read for each packed token
        rows = self.packed[0]
        return rows if self.span_rows is None else self.span_rows[rows]

    @cached_property
    def read_mask(self) -> torch.Tensor:
        """``attn_mask`` laid over the rows read; a filler row sees key 0 alone, so its softmax stays finite."""
        if self.span_rows is None:
            return self.attn_mask
        mask = torch.zeros(self.slot_span.stop - self.slot_span.start, *self.attn_mask.shape[1:], dtype=torch.bool,
                           device=self.attn_mask.device)
        mask[..., 0] = True
        mask[self.span_rows] = self.attn_mask
        return mask

    def windowed(self, window: int) -> BatchLayout:
        """This layout with each new token seeing only the keys fewer than ``window`` positions before its own
        (itself included), as ``transformers``' sliding-window mask does. The distance is by position, not cache
        entry, so a tree node sees the ancestors its path run as a chain would. Self when no key is that far."""
        if self.kv_len <= window:  # every position is below kv_len, so no two are window apart
            return self
        key_positions = torch.arange(self.kv_len, device=self.positions.device).repeat(len(self.slots), 1)
        if self.cache_index is not None:  # tree nodes sit at an entry past their position
            rows, cols = self.packed
            key_positions[rows, self.cache_index[rows, cols]] = self.positions[rows, cols]
        near = key_positions[:, None, :] > self.positions[:, :, None] - window  # [batch, tokens, kv_len]
        return replace(self, attn_mask=self.attn_mask & near[:, None])


def causal_layout(slots: list[int], start_lens: list[int], new_lens: list[int], device: torch.device
                  ) -> BatchLayout:
    """Layout for appending ``new_lens[i]`` tokens to slot ``slots[i]`` which holds ``start_lens[i]`` tokens."""
    width = max(new_lens)
    offsets = torch.arange(width, device=device)
    start = torch.tensor(start_lens, device=device)[:, None]
    valid = offsets[None, :] < torch.tensor(new_lens, device=device)[:, None]
    positions = torch.where(valid, start + offsets, torch.zeros_like(offsets))
    kv_len = max(s + n for s, n in zip(start_lens, new_lens, strict=True))
    key_pos = torch.arange(kv_len, device=device)
    attn_mask = (key_pos[None, None, :] <= positions[:, :, None])[:, None]
    return BatchLayout(torch.tensor(slots, device=device), positions, valid, attn_mask, kv_len)


def tree_layout(slots: list[int], start_lens: list[int], new_lens: list[int], tree_parents: list[list[int]],
                device: torch.device) -> BatchLayout:
    """Layout for appending to slot ``slots[i]`` (holding ``start_lens[i]`` tokens) ``new_lens[i]`` committed
    tokens, as a causal chain, then a draft tree whose node j has parent ``tree_parents[i][j]`` (-1: the
    last committed token; parents before children).

    Node j is written to cache entry start + new + j, sits at position start + new + depth(j), and
    attends to every committed entry and to its own ancestors and itself only (SpecInfer's tree
    attention, Miao et al. 2024), so its logits are those of its path run as a chain. With every
    parent the node before it this is ``causal_layout`` over new + nodes tokens.
    """
    totals = [n + len(parents) for n, parents in zip(new_lens, tree_parents, strict=True)]
    width = max(totals)
    kv_len = max(s + t for s, t in zip(start_lens, totals, strict=True))
    positions = torch.zeros(len(slots), width, dtype=torch.long)
    cache_index = torch.zeros(len(slots), width, dtype=torch.long)
    valid = torch.zeros(len(slots), width, dtype=torch.bool)
    attn_mask = torch.zeros(len(slots), width, kv_len, dtype=torch.bool)
    for row, (start, new, parents) in enumerate(zip(start_lens, new_lens, tree_parents, strict=True)):
        total, prefix = new + len(parents), start + new
        parents_t = torch.tensor(parents, dtype=torch.long)
        positions[row, :new] = torch.arange(start, prefix)
        positions[row, new:total] = tree_position_ids(tree_depths(parents_t), prefix)
        cache_index[row, :total] = torch.arange(start, start + total)
        valid[row, :total] = True
        attn_mask[row, :new, :prefix] = torch.ones(new, prefix, dtype=torch.bool).tril(start)
        attn_mask[row, new:total, :prefix] = True
        attn_mask[row, new:total, prefix:start + total] = tree_attention_mask(parents_t)
    return BatchLayout(torch.tensor(slots, device=device), positions.to(device), valid.to(device),
                       attn_mask[:, None].to(device), kv_len, cache_index.to(device))


@dataclass
class PassLayout:
    """One forward pass: the attention groups, whose packed tokens follow one another in this order, and the CPU
    attention kernel each group's width and size call for (`cpu_attention`)."""

    groups: list[BatchLayout]
    kernels: AttentionKernels = FLASH_ONLY

    @cached_property
    def group_kernels(self) -> list[Kernel]:
        """Each group's attention kernel (`BatchLayout.kernel`): decided once per pass, not in every layer."""
        return [group.kernel(self.kernels) for group in self.groups]

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        """Each group's [start, end) among the pass's packed tokens."""
        ends = list(accumulate(len(g.packed[0]) for g in self.groups))
        return list(zip([0, *ends[:-1]], ends, strict=True))

    @cached_property
    def positions(self) -> torch.Tensor:  # [tokens] RoPE position of each packed token
        return torch.cat([g.positions[g.packed] for g in self.groups])

    @cached_property
    def writes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot, cache entry) of every packed token, each [tokens]: where every layer writes its keys/values
        (worked out once per forward, not once per layer)."""
        return (torch.cat([g.slots[g.packed[0]] for g in self.groups]),
                torch.cat([g.write_index[g.packed] for g in self.groups]))

    def windowed(self, window: int) -> PassLayout:
        """The same pass with every group's attention limited to ``window`` positions (`BatchLayout.windowed`)."""
        return PassLayout([group.windowed(window) for group in self.groups], self.kernels)

    def attend(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        if len(self.groups) == 1:
            return self.groups[0].attend(q, key_cache, value_cache, self.group_kernels[0])
        out = torch.empty_like(q)
        for group, kernel, (start, end) in zip(self.groups, self.group_kernels, self.spans, strict=True):
            out[start:end] = group.attend(q[start:end], key_cache, value_cache, kernel)
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_index = layer_index
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PassLayout,
                cache: SlotKVCache) -> torch.Tensor:
        """``x``: the pass's packed new tokens [tokens, hidden]; returns the same shape."""
        tokens, head_dim = x.shape[0], self.cfg.head_dim
        q = self.q_proj(x).view(tokens, -1, head_dim)
        k = self.k_proj(x).view(tokens, -1, head_dim)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(tokens, -1, head_dim)

        # Every new key/value goes into the cache first; then each group attends over its sequences' entries.
        key_cache, value_cache = cache.keys[self.layer_index], cache.values[self.layer_index]
        slot_idx, entry_idx = layout.writes
        key_cache[slot_idx, :, entry_idx] = k
        value_cache[slot_idx, :, entry_idx] = v
        return self.o_proj(layout.attend(q, key_cache, value_cache).reshape(tokens, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: PassLayout,
                cache: SlotKVCache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer whose ``forward`` extends sequences held in a ``SlotKVCache``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # RoPE's frequencies stay float32 whatever the weights' dtype, so they are not a buffer that .to() casts.
        with torch.device("cpu"):
            self.inv_freq, self.rope_attention_scaling = cfg.rope_scaling.frequencies(
                cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self.windowed_layers = tuple(i in cfg.window_layers for i in range(cfg.num_layers))

    @classmethod
    def from_folder(cls, folder: Path, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> LlamaForCausalLM:
        """Loads ``config.json`` and ``*.safetensors`` from a Hugging Face model folder."""
        folder = Path(folder)
        try:
            cfg = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
        except ValueError as error:
            raise ValueError(f"model {folder}: {error}") from None
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {folder}")
        with torch.device("meta"):
            model = cls(cfg)
        state = {}
        for file in files:
            state.update(load_file(file, device=str(device)))
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.to(device=device, dtype=dtype).eval()

    def new_cache(self, num_slots: int, max_seq_len: int) -> SlotKVCache:
        weight = self.lm_head.weight
        return SlotKVCache(num_layers=self.cfg.num_layers, num_slots=num_slots, max_seq_len=max_seq_len,
                           num_kv_heads=self.cfg.num_kv_heads, head_dim=self.cfg.head_dim,
                           dtype=weight.dtype, device=weight.device)

    def forward(self, input_ids: torch.Tensor, layout: PassLayout, cache: SlotKVCache,
                logit_index: torch.Tensor) -> torch.Tensor:
        """Runs the pass's packed new tokens ``input_ids`` ([tokens]) through the model, writing their
        keys/values into ``cache``; returns logits [n, vocab] at the packed tokens ``logit_index`` ([n])."""
        x = self.model.embed_tokens(input_ids)
        if self.inv_freq.device != x.device:
            self.inv_freq = self.inv_freq.to(x.device)
        cos, sin = rope_cos_sin(layout.positions, self.inv_freq, x.dtype, self.rope_attention_scaling)
        windowed = layout if self.cfg.sliding_window is None else layout.windowed(self.cfg.sliding_window)
        for layer, in_window in zip(self.model.layers, self.windowed_layers, strict=True):
            x = layer(x, cos, sin, windowed if in_window else layout, cache)
        return self.lm_head(self.model.norm(x[logit_index])).float()
