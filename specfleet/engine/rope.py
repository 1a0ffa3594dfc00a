"""Rotary position embeddings (RoPE): the inverse frequencies of each scaling a checkpoint may ask for.

Each variant computes its frequencies the way ``transformers`` does (``modeling_rope_utils``), in float32, so a
checkpoint's logits match the reference forward; the tests compare the frequencies and the logits. What is not here
is refused when the config is read, by name, with the supported list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
"""The ``rope_type`` values the engine computes. ``dynamic`` (NTK) recomputes its frequencies only once a sequence
grows past ``max_position_embeddings``; the runner caps sequences there, so within the engine it is the default."""


@dataclass(frozen=True)
class RopeScaling:
    """A config's ``rope_parameters`` (or older ``rope_scaling``): the RoPE variant and the numbers it needs."""

    rope_type: str = "default"
    factor: float | None = None
    # llama3 (Llama 3.1+): frequencies between the two wavelengths are blended, those above divided by ``factor``.
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # yarn
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_dict(cls, rope: dict) -> RopeScaling:
        """Reads ``rope_parameters``; raises ValueError naming an unsupported type or a missing number."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported RoPE type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"unsupported partial_rotary_factor {rope['partial_rotary_factor']}: RoPE rotates whole "
                             "heads here")
        needed = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                  "yarn": ("original_max_position_embeddings",)}.get(rope_type, ())
        missing = [name for name in needed if rope.get(name) is None]
        if missing:
            raise ValueError(f"RoPE type {rope_type!r} needs {', '.join(missing)} in rope_parameters")
        return cls(rope_type=rope_type, factor=rope.get("factor"), low_freq_factor=rope.get("low_freq_factor"),
                   high_freq_factor=rope.get("high_freq_factor"),
                   original_max_position_embeddings=rope.get("original_max_position_embeddings"),
                   attention_factor=rope.get("attention_factor"), beta_fast=rope.get("beta_fast"),
                   beta_slow=rope.get("beta_slow"), mscale=rope.get("mscale"),
                   mscale_all_dim=rope.get("mscale_all_dim"), truncate=rope.get("truncate", True))

    def frequencies(self, head_dim: int, theta: float, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
        """(inverse frequencies [head_dim / 2] in float32 on the CPU, the factor cos and sin are scaled by)."""
        inv_freq = default_inverse_frequencies(head_dim, theta)
        if self.rope_type == "linear":
            return inv_freq / self.factor, 1.0
        if self.rope_type == "llama3":
            return self._llama3(inv_freq), 1.0
        if self.rope_type == "yarn":
            return self._yarn(head_dim, theta, max_position_embeddings)
        return inv_freq, 1.0  # default; dynamic up to max_position_embeddings (see ROPE_TYPES)

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """Llama 3.1: wavelengths below ``original / high_freq_factor`` kept, above ``original / low_freq_factor``
        stretched by ``factor``, and a smooth blend between."""
        old_context = self.original_max_position_embeddings
        low_freq_wavelen = old_context / self.low_freq_factor
        high_freq_wavelen = old_context / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (old_context / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(medium, smoothed, scaled)

    def _yarn(self, head_dim: int, theta: float, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
        """YaRN (Peng et al. 2023): interpolated frequencies for the slow dimensions, the original ones for the fast,
        a linear ramp between, and cos/sin scaled by the attention factor."""
        original = self.original_max_position_embeddings
        factor = self.factor if self.factor is not None else max_position_embeddings / original
        attention_factor = self.attention_factor
        if attention_factor is None:
            if self.mscale and self.mscale_all_dim:
                attention_factor = float(_yarn_mscale(factor, self.mscale) / _yarn_mscale(factor, self.mscale_all_dim))
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast, beta_slow = self.beta_fast or 32, self.beta_slow or 1

        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # a ramp of one step, not a division by zero
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
        pos_freqs = theta ** (torch.arange(0, head_dim, 2, device="cpu").to(dtype=torch.float) / head_dim)
        extrapolation = 1 - ramp
        inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv_freq, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def default_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:  # [head_dim / 2], float32, CPU
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings at ``positions`` ([tokens]) -> [tokens, 1, head_dim]; ``inv_freq``
    ([head_dim / 2], float32) on the positions' device."""
    angles = positions.float()[..., None] * inv_freq  # [tokens, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    if scaling == 1.0:
        return angles.cos().to(dtype), angles.sin().to(dtype)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
