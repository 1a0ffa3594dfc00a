"""Sampling: logits -> processed distribution, seeded inverse-CDF sampling, and the wire's top-K pairs.

Plain functions on tensors. Randomness comes in as uniforms (see `seeded_uniforms`), so a step is a
deterministic function of its inputs and tests can seed it. The speculative-sampling algorithms that
use these distributions live in `specfleet.verify` (Leviathan et al. 2023; Chen et al. 2023). A dense
distribution [..., vocab] is a ``*_probs`` tensor; the same distribution on the wire is its top-K pairs
(``draft_top_k``: token ids [n, K] and their probabilities [n, K], see `top_k_pairs`). The per-request
parameters, `SamplingParams`, live in the torch-free `specfleet.sampling_params`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

# Also re-exported: code that loads torch anyway may import it here.
from specfleet.sampling_params import SamplingParams

DRAFT_STREAM = 0
"""Uniforms stream used by the drafter to sample draft tokens."""
VERIFY_STREAM = 1
"""Uniforms stream used by the verifier (acceptance tests, recovered and bonus tokens)."""
FILTER_SHORTLIST = 1024
"""Most probable tokens a top-k/top-p row is first filtered from (see `_top_k_top_p`): top-p's kept set is
almost always far smaller, and sorting a large vocabulary whole costs many softmaxes (bench/engine_kernels.md)."""


def processed_probs(
    logits: torch.Tensor,  # [n, vocab]
    temperature: torch.Tensor,  # [n] float
    top_k: torch.Tensor,  # [n] int, 0 = off
    top_p: torch.Tensor,  # [n] float, 1 = off
) -> torch.Tensor:  # [n, vocab] float32
    """Turn logits into the distribution a token is sampled from, one set of parameters per row.

    Order as in HF / vLLM: temperature, then top-k (keep the k largest), then top-p (keep the smallest
    set of most probable tokens whose mass, renormalised after top-k, is >= top_p; always at least one
    token), then renormalise. Rows with temperature 0 become a one-hot at the argmax of the logits, so
    greedy decoding is the special case where target_probs and draft_probs are point masses
    (Leviathan et al. 2023, section 3). Ties in top-k are broken towards the lower token id.
    Computed in float32 whatever the dtype of the logits.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [n, vocab], got shape {tuple(logits.shape)}")
    n, vocab = logits.shape
    for name, param in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if param.shape != (n,):
            raise ValueError(f"{name} must be [n] = [{n}], got shape {tuple(param.shape)}")

    logits = logits.float()
    temperature = temperature.to(device=logits.device, dtype=torch.float32)
    top_k = top_k.to(device=logits.device, dtype=torch.int64)
    top_p = top_p.to(device=logits.device, dtype=torch.float32)

    greedy = temperature == 0  # [n]
    safe_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
    probs = torch.softmax(logits / safe_temperature[:, None], dim=-1)  # [n, vocab]

    # Only rows that filter pay for the sort a filter needs (it costs ~100 softmaxes over a large vocabulary),
    # and only greedy rows for their one-hot: a batch of plain sampled rows is one softmax.
    filtering = ~greedy & (((top_k > 0) & (top_k < vocab)) | (top_p < 1.0))  # [n]
    if filtering.any():
        rows = filtering.nonzero().squeeze(-1)
        kept = _top_k_top_p(probs[rows], top_k[rows], top_p[rows])
        probs[rows] = kept / kept.sum(dim=-1, keepdim=True)
    if greedy.any():
        rows = greedy.nonzero().squeeze(-1)
        probs[rows] = torch.zeros_like(probs[rows]).scatter_(-1, logits[rows].argmax(dim=-1, keepdim=True), 1.0)
    return probs


def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:  # [m, vocab]
    """Zero what top-k, then top-p on the renormalised survivors, leave out (rows not renormalised).

    Tokens rank by probability, ties towards the lower token id. Each row is first filtered from its
    `FILTER_SHORTLIST` most probable tokens (a partial top-k, far cheaper than sorting a large vocabulary);
    a row whose kept set might reach past them (it keeps the whole shortlist, or its last kept token ties
    with the shortlist's last) is filtered again from a shortlist 8 times longer, then from its whole sorted
    vocabulary. Every route gives the same floats.
    """
    row_mass = probs.sum(dim=-1)  # [m]
    out = torch.zeros_like(probs)
    todo = torch.arange(probs.shape[0], device=probs.device)
    for size in (FILTER_SHORTLIST, 8 * FILTER_SHORTLIST, probs.shape[-1]):
        size = min(size, probs.shape[-1])
        rows = probs[todo]
        if size < probs.shape[-1]:
            values, ids = torch.topk(rows, size, dim=-1)  # [r, size]; ties in any order
            by_id = ids.argsort(dim=-1)
            values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
            values, order = torch.sort(values, dim=-1, descending=True, stable=True)
            ids = ids.gather(-1, order)
        else:
            values, ids = torch.sort(rows, dim=-1, descending=True, stable=True)  # [r, vocab]
        keep, last = _kept_prefix(values, row_mass[todo], top_k[todo], top_p[todo])
        # Exact when top-k's survivors are all on the shortlist (their mass renormalises top-p) and the kept
        # set ends above the shortlist's last probability (so every token ranked before it is on the list).
        last_value = values.gather(-1, last[:, None]).squeeze(-1)
        whole = size == probs.shape[-1]  # the full sort: exact whatever it keeps
        exact = ((top_k[todo] <= size) & (last < size - 1) & (last_value > values[:, -1])) | whole
        done = exact.nonzero().squeeze(-1)
        out[todo[done]] = torch.zeros_like(rows[done]).scatter_(-1, ids[done], values[done] * keep[done])
        todo = todo[~exact]
        if not todo.numel():
            break
    return out


def _kept_prefix(
    ranked: torch.Tensor,  # [m, L] probabilities, descending
    row_mass: torch.Tensor,  # [m] total mass of each whole row
    top_k: torch.Tensor,  # [m]
    top_p: torch.Tensor,  # [m]
) -> tuple[torch.Tensor, torch.Tensor]:  # keep [m, L] bool, index of the last kept [m]
    ranks = torch.arange(ranked.shape[-1], device=ranked.device)[None, :]  # [1, L]
    keep = (top_k[:, None] <= 0) | (ranks < top_k[:, None])
    survivors = ranked * keep
    # Top-p on the top-k survivors, renormalised: keep a token iff the mass strictly before it is < top_p.
    # The first token always survives (exclusive mass 0 < top_p), and top_p >= 1 keeps everything
    # whatever the float rounding of the cumulative sum.
    mass = torch.where(top_k > 0, survivors.sum(dim=-1), row_mass)  # [m]
    renormalised = survivors / mass[:, None]
    mass_before = torch.cumsum(renormalised, dim=-1) - renormalised  # [m, L]
    keep &= (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    return keep, (keep * ranks).amax(dim=-1)


def sample_from_probs(
    probs: torch.Tensor,  # [n, vocab], non-negative, each row with positive mass
    uniforms: torch.Tensor,  # [n] in [0, 1)
) -> torch.Tensor:  # [n] int64
    """Inverse-CDF sampling: the token whose cumulative-mass interval contains `uniforms * row mass`.

    Deterministic given the uniforms. Rows need not be normalised (each is scaled by its own mass), so
    a residual max(0, p - q) can be passed as is. A token with zero probability is never returned: the
    cumulative sum runs in float64, and a uniform that rounds onto the total mass is clamped to the
    last token with nonzero mass.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [n, vocab], got shape {tuple(probs.shape)}")
    n, vocab = probs.shape
    if uniforms.shape != (n,):
        raise ValueError(f"uniforms must be [n] = [{n}], got shape {tuple(uniforms.shape)}")

    cdf = torch.cumsum(probs.double(), dim=-1)  # [n, vocab]
    targets = uniforms.to(device=probs.device, dtype=torch.float64) * cdf[:, -1]  # [n]
    # First token whose cumulative mass exceeds the target: a zero-probability token has the same
    # cumulative mass as the token before it, so it can never be the first to exceed.
    tokens = torch.searchsorted(cdf, targets[:, None], right=True).squeeze(-1)  # [n]
    nonzero = probs > 0  # [n, vocab]
    last_nonzero = vocab - 1 - nonzero.flip(-1).to(torch.uint8).argmax(dim=-1)  # [n]
    return torch.minimum(tokens, last_nonzero)


def sample_drafts(
    logits: torch.Tensor,  # [n, vocab]
    params: Sequence[SamplingParams],  # [n]
    uniforms: Sequence[float],  # [n] in [0, 1)
    num_pairs: int,
) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """One draft token per row, as every model drafter picks it: greedy rows take the argmax; sampled rows draw
    (with their uniform) from their processed distribution truncated to its top ``num_pairs`` pairs, returned with
    the token: the exact q sent to the target (None for greedy rows)."""
    if all(p.greedy for p in params):  # nothing to sample: skip the softmax and top-K over the whole vocabulary
        return [int(t) for t in logits.argmax(dim=-1).tolist()], [None] * len(params)
    probs = processed_probs(
        logits,
        torch.tensor([p.temperature for p in params]),
        torch.tensor([p.top_k for p in params]),
        torch.tensor([p.top_p for p in params]),
    )
    ids, pair_probs = top_k_pairs(probs, min(num_pairs, probs.shape[-1]))
    picks = sample_from_probs(pair_probs, torch.tensor(list(uniforms), dtype=torch.float64))
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


def seeded_uniforms(seed: int, position: int, stream: int, count: int) -> torch.Tensor:  # [count] float64
    """`count` uniforms in [0, 1), a pure function of (seed, position, stream).

    The generator is seeded from a BLAKE2b hash of the triple (stable across processes and machines,
    unlike Python's salted `hash()`) and always runs on the CPU, so a request with a seed reproduces
    its tokens whatever replica serves it. `position` is the sequence position the step starts at;
    `stream` separates independent uses at the same position (DRAFT_STREAM, VERIFY_STREAM).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return torch.rand(count, generator=seeded_generator(seed, position, stream), dtype=torch.float64)


def seeded_generator(seed: int, position: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from a BLAKE2b hash of (seed, position, stream), as `seeded_uniforms` uses;
    for randomness of variable size (a draft tree's Gumbel noise)."""
    digest = hashlib.blake2b(f"specfleet:{seed}:{position}:{stream}".encode(), digest_size=8).digest()
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int.from_bytes(digest, "little"))
    return generator


def top_k_pairs(
    probs: torch.Tensor,  # [n, vocab]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([n, k] int64, [n, k] float32)
    """The k most probable tokens and their probabilities renormalised to sum 1.

    This is the draft distribution q as it travels on the wire (``draft_top_k``): the drafter samples
    from this truncated, renormalised distribution, so the q the verifier sees is exactly the one the
    draft token was drawn from, as lossless speculative sampling requires (Leviathan et al. 2023). If fewer
    than k tokens have nonzero probability, the extra pairs have probability 0.
    """
    if probs.dim() != 2:
        raise ValueError(f"probs must be [n, vocab], got shape {tuple(probs.shape)}")
    if not 1 <= k <= probs.shape[1]:
        raise ValueError(f"k must be in [1, vocab] = [1, {probs.shape[1]}], got {k}")
    values, token_ids = torch.topk(probs.float(), k, dim=-1)  # [n, k]
    pair_probs = values / values.sum(dim=-1, keepdim=True)
    return token_ids, pair_probs


def dense_from_top_k(
    token_ids: torch.Tensor,  # [n, k] int64
    pair_probs: torch.Tensor,  # [n, k]
    vocab_size: int,
) -> torch.Tensor:  # [n, vocab_size] float32
    """Inverse of `top_k_pairs`: scatter the wire's top-K (token, probability) pairs into a dense distribution.

    Repeated token ids add up, so pairs from any source give a proper distribution.
    """
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be [n, k], got shape {tuple(token_ids.shape)}")
    if pair_probs.shape != token_ids.shape:
        raise ValueError(
            f"pair_probs must have the shape of token_ids {tuple(token_ids.shape)}, "
            f"got {tuple(pair_probs.shape)}"
        )
    dense = torch.zeros(token_ids.shape[0], vocab_size, dtype=torch.float32, device=pair_probs.device)
    return dense.scatter_add_(-1, token_ids.long(), pair_probs.float())
