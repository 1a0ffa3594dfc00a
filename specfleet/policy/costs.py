"""The cost model: how long a step's drafting, verification and router overhead take, fitted from telemetry.

Each role's time is a function of the batch size, the tokens per sequence and the context: the mean KV length per
sequence of the call (the sum of the batch's KV lengths over its size). It has two parts. A (batch, tokens) table,
the cost at the role's reference context: where telemetry has measured a (batch, tokens) cell, its median counts;
elsewhere the defaults' shape is borrowed and rescaled to the nearest measurements (`CostModel.fit`). And a KV
term, `ContextCost`: reading the KV cache past the reference context, linear in batch x context per forward pass
(MagicDec: at long contexts a step is bound by loading the KV, which grows with batch x context), its slope fitted
per role from samples at several contexts. `StepCosts` reads one batch size's curves off for the depth search.
"""

from __future__ import annotations

import dataclasses
import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, combinations, repeat
from statistics import median
from types import MappingProxyType

ROLES = ("draft", "target", "overhead")
PREFILL_ROLE = "draft_prefill"
"""A draft service's call that computed prompts (a catch-up): ``batch_size`` the sequences whose whole context it
was sent, ``tokens_per_seq`` their mean new tokens. Not a role of the step's cost model (whose samples leave such
calls out): `specfleet.policy.catch_up` prices catch-ups from them."""
SAMPLE_ROLES = (*ROLES, PREFILL_ROLE)
TOKEN_BUCKET = 0.5
"""Width of the tokens-per-sequence cells samples are grouped into (the target sees fractional means)."""
MIN_STEP_MS = 1e-6
"""Floor on a predicted step, so an all-zero cost model cannot divide by zero."""
PADDING_SHARE = 0.4
"""Share of a padded token's verify cost that a plan pays for each row shorter than its widest. The target pads
each attention group to its widest row, which costs attention but no projections or MLP, so ragged plans cost
between their real and their fully padded token counts (measured in bench/mixed_depths.md); priced at their real
tokens alone they looked better than one depth for all and ran slower, so the share sits near the top."""
MIN_CELL_SAMPLES = 3
"""Samples a (batch, tokens) cell needs before its median counts as measured. A single slow call (a cold cache,
a pause) must not make a depth look expensive: the policy would stop choosing it and so never measure it again."""
CostFn = Callable[[int, float], float]
"""(batch_size, tokens_per_seq) -> milliseconds at the reference context; must be non-decreasing in both arguments.
A cost function may also carry `per_kv_ms`, its KV term's slope (`AnalyticCost` does; 0 when absent)."""
REFERENCE_CONTEXT = 256.0
"""The mean KV length per sequence a default cost function's (batch, tokens) costs stand for (the short prompts
the defaults were timed with), and the context a sample written without one is taken to have been measured at."""


@dataclass(frozen=True)
class CostSample:
    """One latency measurement from telemetry.

    `role` is "draft" (one Propose: `batch_size` sequences, `tokens_per_seq` the largest depth drafted
    in the call), "target" (one Verify: `tokens_per_seq` the mean tokens fed per sequence, mean(depth + 1))
    or "overhead" (the rest of a router step: gRPC, (de)serialisation, bookkeeping; `tokens_per_seq` 1 plus
    the step's largest depth, so a step that calls the drafters is charged the round trip it adds), or
    `PREFILL_ROLE` (a Propose that computed prompts).
    """

    role: str
    batch_size: int
    tokens_per_seq: float
    ms: float
    context: float | None = None
    """The call's mean KV length per sequence (times `batch_size`: the KV tokens it reads per pass). A target's:
    each sequence's committed length (its first draft token's position); a draft's: the same, whatever its drafter
    reads of it (a window + sink draft reads a bounded part: its fitted slope comes out about 0, measured, not
    assumed); the router's overhead: 0 (it reads no KV). None: unknown (a writer from before contexts were
    recorded), taken as the role's reference context."""
    drafter: str | None = None
    """A draft sample's drafter kind (``ngram``, ``sparse_self``, ...): a fleet with draft pools of several kinds
    fits each kind's costs from its own samples. None: not said (an older writer's, or another role)."""
    widest: float | None = None
    """A target sample's tokens fed to its widest sequence, where the call was ragged: the target pads attention
    to its widest rows, so a ragged call costs more than its mean says, and the fit files it under the tokens a
    plan that ragged is priced at (`priced_tokens`). None: every sequence as wide as the mean (or not said)."""

    def __post_init__(self) -> None:
        if self.role not in SAMPLE_ROLES:
            raise ValueError(f"CostSample.role must be one of {SAMPLE_ROLES}, got {self.role!r}")
        if self.batch_size < 1:
            raise ValueError(f"CostSample.batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.tokens_per_seq) and self.tokens_per_seq >= 0):
            raise ValueError(f"CostSample.tokens_per_seq must be finite and >= 0, got {self.tokens_per_seq}")
        if not (math.isfinite(self.ms) and self.ms >= 0):
            raise ValueError(f"CostSample.ms must be finite and >= 0, got {self.ms}")
        if self.context is not None and not (math.isfinite(self.context) and self.context >= 0):
            raise ValueError(f"CostSample.context must be finite and >= 0 (or None), got {self.context}")
        if self.widest is not None and not (math.isfinite(self.widest) and self.widest >= self.tokens_per_seq):
            raise ValueError(f"CostSample.widest must be finite and >= tokens_per_seq ({self.tokens_per_seq}) (or "
                             f"None), got {self.widest}")

    @property
    def priced_tokens(self) -> float:
        """The tokens per sequence the fit files this sample under: a ragged verify's mean plus `PADDING_SHARE` of
        the padding up to its widest row, as `verified_drafts` prices a ragged plan. Filed under its mean alone, a
        ragged call (prompt lookup's drafts vary from step to step and sequence to sequence) would make every plan
        of that mean look as dear, uniform ones included, which the fit's monotone smoothing then spreads to the
        depths around it."""
        if self.widest is None:
            return self.tokens_per_seq
        # The charge is affine, so per-sequence tokens take it as the plan's draft totals do.
        return verified_drafts(self.tokens_per_seq, self.widest)


@dataclass(frozen=True)
class AnalyticCost:
    """ms = fixed + per_seq * batch + per_token * n + past_knee * max(0, n - knee), n = batch * tokens_per_seq,
    at the reference context; past it, `per_kv_ms` per KV token read (see `ContextCost`).

    The knee models a device that is memory-bound up to `knee_tokens` tokens per forward (extra tokens
    nearly free) and compute-bound beyond it (each token costs `past_knee_ms` more).
    """

    fixed_ms: float = 0.0
    per_seq_ms: float = 0.0
    per_token_ms: float = 0.0
    knee_tokens: float = math.inf
    past_knee_ms: float = 0.0
    per_kv_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed_ms", "per_seq_ms", "per_token_ms", "knee_tokens", "past_knee_ms", "per_kv_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"AnalyticCost.{name} must be >= 0, got {getattr(self, name)}")

    def __call__(self, batch_size: int, tokens_per_seq: float) -> float:
        tokens = batch_size * tokens_per_seq
        return (self.fixed_ms + self.per_seq_ms * batch_size + self.per_token_ms * tokens
                + self.past_knee_ms * max(0.0, tokens - self.knee_tokens))


DEFAULT_COSTS: Mapping[str, CostFn] = MappingProxyType({
    # SmolLM2-135M verifying on a CPU (the timings it fits are in bench/step_costs.md): one and eight tokens at
    # batch 1 and eight at batch 16 need a fixed + per-sequence + per-token form (a single per-token slope cannot
    # fit them all); no knee shows on a CPU. Past the reference context each sequence's verify reads its KV cache,
    # about 0.005 ms a cached token on a CPU (bench/step_costs.md); the n-gram drafter and the router read none.
    "target": AnalyticCost(fixed_ms=16.7, per_seq_ms=6.7, per_token_ms=1.6, per_kv_ms=0.005),
    "draft": AnalyticCost(fixed_ms=0.8, per_token_ms=0.025),  # an n-gram lookup, nearly free
    "overhead": AnalyticCost(fixed_ms=3.0),  # gRPC and bookkeeping of a router step
})
"""Each role's cost until telemetry measures it; a measured role keeps the default's shape only where it has no
samples (see `CostModel`)."""


@dataclass(frozen=True)
class PerLevelCost:
    """A model drafter's Propose: one forward pass per level drafted (each needs the one before), each costing
    ``per_pass`` at (batch, one token); ``per_kv_ms`` as `AnalyticCost`'s."""

    per_pass: AnalyticCost
    per_kv_ms: float = 0.0

    def __call__(self, batch_size: int, tokens_per_seq: float) -> float:
        return max(1.0, tokens_per_seq) * self.per_pass(batch_size, 1.0)


DRAFTER_DEFAULT_COSTS: Mapping[str, CostFn] = MappingProxyType({
    # The target's own weights: each level costs what a one-token verify does at the reference context, and past it
    # nothing more (it reads a fixed sink + window cache).
    "sparse_self": PerLevelCost(AnalyticCost(fixed_ms=16.7, per_seq_ms=6.7, per_token_ms=1.6)),
})
"""The draft role's default per drafter kind, where it differs from `DEFAULT_COSTS`'s (an n-gram lookup's)."""


def drafter_defaults(kind: str, defaults: Mapping[str, CostFn] = DEFAULT_COSTS) -> dict[str, CostFn]:
    """``defaults`` with the draft role's default for a drafter of ``kind``."""
    return {**defaults, "draft": DRAFTER_DEFAULT_COSTS.get(kind, defaults["draft"])}


@dataclass(frozen=True)
class SelfDrafting:
    """How a target drafts in its own verify (GetInfo's ``self_drafting``), as the policy prices its steps: "space"
    (`specfleet target --space-masks`), "lookahead" (``--lookahead-window``, whose Jacobi chain of ``width``
    guesses rides along with every sequence's verify whatever it drafts) or "ngram" (``--prompt-lookup-depth``: the
    candidates alone, looked up after the verdict)."""

    kind: str = "space"
    width: int = 0

    def verify_tokens(self, drafts_per_seq: float) -> float:
        """Tokens a step of d drafts per sequence adds to each sequence's verify beyond its last token: SPACE's d
        candidates and d + 1 groups of d masks (`specfleet.space.space_pass_tokens`), lookahead's candidates and its
        Jacobi chain, or prompt lookup's candidates alone (``width`` 0)."""
        if self.kind == "space":
            return drafts_per_seq + (drafts_per_seq + 1) * drafts_per_seq
        return drafts_per_seq + self.width

    @property
    def looked_up(self) -> bool:
        """Whether the target looks its candidates up after the pass instead of computing them in it (prompt
        lookup): asking costs a step nothing, so every step asks, plain ones included."""
        return self.kind == "ngram"


def kv_width(role: str, tokens_per_seq: float) -> float:
    """Queries per sequence in each of those passes: a Verify's every token fed in its one pass, a Propose's one per
    level (a tree's siblings read the same entries, but the width term is fitted on the target's chains), none for
    the overhead."""
    if role == "target":
        return max(1.0, tokens_per_seq)
    return 1.0 if role == "draft" else 0.0


def kv_passes(role: str, tokens_per_seq: float) -> float:
    """Forward passes over each sequence's KV cache in one call of `role`: a Verify runs one over every token fed
    (a chain or a tree), a Propose one per level drafted (each level needs the one before), and the router's
    overhead reads no KV."""
    if role == "target":
        return 1.0
    if role == "draft":
        return max(1.0, tokens_per_seq)
    return 0.0


def context_bucket(context: float) -> int:
    """`context` rounded up to four significant bits (at most an eighth more): the step-cost memo's key, so it
    holds about eight contexts per doubling; rounding up never prices a step below the context it runs at."""
    n = max(0, math.ceil(context))
    if n < 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


@dataclass(frozen=True)
class ContextCost:
    """One role's KV term: ms = batch * kv_passes(role, tokens) * (per_kv_ms + per_kv_token_ms * (kv_width(role,
    tokens) - 1)) * max(0, context - reference).

    Which statistic: the call's mean KV length per sequence (`CostSample.context`), which times the batch size is
    the KV tokens one pass reads. Why linear in batch x context per pass: each pass loads every sequence's KV once
    (MagicDec, Chen et al. 2024: at long contexts and large batches the KV load dominates a decoding step, and a
    draft over a fixed window + sink cache does not grow with it). Where that load bounds the pass (a GPU's
    attention over a few dozen queries), the tokens a pass carries add nothing to it and `per_kv_token_ms` fits
    about 0; where the attention's arithmetic does (a CPU's few cores), each further token per sequence adds its
    share (on a 2-core CPU a 3-token verify over 7K tokens of 8 sequences costs 1.9x one token,
    bench/engine_kernels.md), and pricing it as free would draft where drafting loses. Below `reference` the (batch,
    tokens) table holds flat: it was measured there, and shorter contexts are not priced below it.
    """

    per_kv_ms: float = 0.0
    """ms per KV token one pass reads (per sequence) for one query per sequence, >= 0."""
    reference: float = REFERENCE_CONTEXT
    """The context the role's (batch, tokens) costs stand for: the shortest context of its samples, or
    `REFERENCE_CONTEXT` when none carried one."""
    fitted: bool = False
    """Whether `per_kv_ms` was fitted from samples at several contexts (else the default cost function's)."""
    per_kv_token_ms: float = 0.0
    """ms more per KV token read for each further query per sequence in the pass (`kv_width`), >= 0."""

    def __post_init__(self) -> None:
        for name in ("per_kv_ms", "per_kv_token_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"ContextCost.{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.reference) and self.reference >= 0):
            raise ValueError(f"ContextCost.reference must be finite and >= 0, got {self.reference}")

    def __call__(self, role: str, batch_size: int, tokens_per_seq: float, context: float | None) -> float:
        """The KV term's ms; 0 for context None (the reference context)."""
        if context is None or context <= self.reference:
            return 0.0
        per_read = self.per_kv_ms + self.per_kv_token_ms * max(0.0, kv_width(role, tokens_per_seq) - 1)
        return per_read * batch_size * kv_passes(role, tokens_per_seq) * (context - self.reference)


def mean_context(contexts: Sequence[float] | None, batch: int) -> float | None:
    """The batch's mean KV length per sequence, the statistic the cost model prices at; None stays None (each role's
    reference context)."""
    if contexts is None:
        return None
    if len(contexts) != batch:
        raise ValueError(f"contexts must have one entry per sequence ({batch}), got {len(contexts)}")
    if any(not (math.isfinite(c) and c >= 0) for c in contexts):
        raise ValueError(f"contexts must be finite and >= 0, got {list(contexts)}")
    return sum(contexts) / batch if batch else None


def context_note(context: int | None) -> str:
    """The reason's note on the context a step was priced at ("" when none was given)."""
    return "" if context is None else f"; context {context} tokens"


def default_context_cost(default: CostFn) -> ContextCost:
    """A role's KV term before any sample with a context: the default cost function's slope (`per_kv_ms`, 0 when
    it has none) past `REFERENCE_CONTEXT`."""
    return ContextCost(float(getattr(default, "per_kv_ms", 0.0)), REFERENCE_CONTEXT)


def _fit_context_cost(role: str, samples: list[CostSample], default: CostFn) -> ContextCost:
    """The role's KV term from its samples that carry a context.

    Reference: their shortest context. Slopes: within each (batch, tokens) cell the batch and tokens are fixed, so
    the cost differences between the cell's contexts are the KV term's; each context bucket (`context_bucket`)
    with `MIN_CELL_SAMPLES` samples gives a point (median context, median ms), and every pair of points in a cell a
    slope (ms difference over the KV tokens read more), the cell's slope the median of its pairs'. The width term
    (`per_kv_token_ms`): the median over pairs of cells of different widths (`kv_width`) of how their slopes differ
    per query, at least 0; `per_kv_ms`: the median of the cells' slopes less their width's share, at least 0.
    Theil-Sen over medians, so neither a slow call nor one noisy cell moves them. A role whose costs do not grow
    with context (a window + sink draft, the router's overhead) gets about 0; cells of one width only, no width
    term. With no cell measured at two contexts, the default's slope, no steeper than the cells allow
    (`_within_measured`)."""
    known = [s for s in samples if s.context is not None]
    if not known:
        return default_context_cost(default)
    reference = min(s.context for s in known if s.context is not None)
    cells: dict[tuple[int, float], dict[int, list[CostSample]]] = {}
    for s in known:
        assert s.context is not None
        cell = cells.setdefault((s.batch_size, round(s.tokens_per_seq / TOKEN_BUCKET) * TOKEN_BUCKET), {})
        cell.setdefault(context_bucket(s.context), []).append(s)
    cell_slopes: list[tuple[float, float]] = []  # (queries per sequence in a pass, the cell's slope)
    measured: list[tuple[int, float, float, float]] = []  # (batch, tokens, context, ms) of each cell's buckets
    for (batch, tokens), by_context in cells.items():
        reads = batch * kv_passes(role, tokens)
        points = sorted((median(s.context for s in ss if s.context is not None), median(s.ms for s in ss))
                        for ss in by_context.values() if len(ss) >= MIN_CELL_SAMPLES)
        measured.extend((batch, tokens, context, ms) for context, ms in points)
        slopes = [(ms_b - ms_a) / (reads * (c_b - c_a))
                  for (c_a, ms_a), (c_b, ms_b) in combinations(points, 2) if c_b > c_a and reads > 0]
        if slopes:
            cell_slopes.append((kv_width(role, tokens), median(slopes)))
    if not cell_slopes:
        return _within_measured(ContextCost(default_context_cost(default).per_kv_ms, reference), role, measured)
    per_query = [(slope_b - slope_a) / (width_b - width_a)
                 for (width_a, slope_a), (width_b, slope_b) in combinations(cell_slopes, 2) if width_b != width_a]
    per_kv_token_ms = max(0.0, median(per_query)) if per_query else 0.0
    per_kv_ms = median(slope - per_kv_token_ms * (width - 1) for width, slope in cell_slopes)
    return ContextCost(max(0.0, per_kv_ms), reference, fitted=True, per_kv_token_ms=per_kv_token_ms)


def _within_measured(cost: ContextCost, role: str, measured: list[tuple[int, float, float, float]]) -> ContextCost:
    """The default's slope ``cost``, taken where no cell spans two contexts, scaled down where needed so that at
    every measured (batch, tokens) cell and context its KV term claims no more than the cell's median above the
    floor the table keeps there: the largest median measured at the reference context by a cell no bigger in batch
    and tokens (the table is non-decreasing in both). The default was measured on one machine and engine; a slope
    above what this one's cells allow prices a step above what it took at the very context it was measured at (a
    plain step of 8 sequences at 7K tokens was priced at twice its time, and the policy drafted where plain decoding
    was faster, bench/long_context.md). A fitted slope is left as fitted: the floor, a maximum over noisy medians,
    would cut it by the noise."""
    at_reference = context_bucket(cost.reference)
    floors = [(batch, tokens, ms) for batch, tokens, context, ms in measured if context_bucket(context) == at_reference]
    ratios = []
    for batch, tokens, context, ms in measured:
        term = cost(role, batch, tokens, context)
        if term > 0 and context_bucket(context) != at_reference:
            floor = max((f_ms for f_batch, f_tokens, f_ms in floors if f_batch <= batch and f_tokens <= tokens),
                        default=0.0)
            ratios.append(max(0.0, ms - floor) / term)
    scale = min([1.0, *ratios])
    if scale == 1.0:
        return cost
    return dataclasses.replace(cost, per_kv_ms=cost.per_kv_ms * scale, per_kv_token_ms=cost.per_kv_token_ms * scale)


Measured = tuple[int, float, float]
"""One sample as the (batch, tokens) table is fitted to it: batch size, tokens per sequence, ms."""


def _at_reference(role: str, samples: list[CostSample], context_cost: ContextCost) -> list[Measured]:
    """The samples with their KV term past the reference taken off: what the (batch, tokens) table is fitted to."""
    return [(s.batch_size, s.tokens_per_seq, s.ms if s.context is None else
             max(0.0, s.ms - context_cost(role, s.batch_size, s.tokens_per_seq, s.context))) for s in samples]


@dataclass(frozen=True)
class CostTable:
    """One role's fitted costs: `values[i][j]` ms at `batch_points[i]`, `token_points[j]`.

    Non-decreasing along both axes; `samples` is how many measurements it was fitted from.
    """

    batch_points: tuple[int, ...]
    token_points: tuple[float, ...]
    values: tuple[tuple[float, ...], ...]
    samples: int


@dataclass(frozen=True)
class StepCosts:
    """Predicted costs of one step at a fixed batch size (and context), precomputed for the depth search.

    `target_ms[n]`: Verify with n draft tokens in total (tokens per sequence 1 + n / batch), linear in
    between for an expected (fractional) total, see `target_at`; `draft_ms[d]`: Propose with largest depth d (0.0
    at d = 0: nothing is drafted); `overhead_ms[d]`: the rest of a step whose largest depth is d. `price_step`
    adds them up for one plan. Each includes its role's KV term at `context`.
    """

    batch_size: int
    target_ms: tuple[float, ...]
    draft_ms: tuple[float, ...]
    overhead_ms: tuple[float, ...]
    ahead_ms: tuple[float, ...] | None = None
    """Drafting ahead (None: off): `ahead_ms[d]`, the Propose of d + 1 levels made while the target verifies, and
    `drafting_now[d]`, the chance that some sequence's drafts made ahead are dropped, so the step drafts now too."""
    drafting_now: tuple[float, ...] = ()
    ahead_contention: float = 0.0
    """Drafting ahead, the share of the shorter of the draft made ahead and the verify that adds to the longer: 0 where
    they run on hardware of their own (the longer of the two counts), 1 where they take turns on the same CPU cores
    (both count), measured in between (`AheadOverlap.measured_contention`)."""
    context: int | None = None
    """The batch's mean KV length per sequence these costs were priced at, rounded up by `context_bucket` (None:
    each role's reference context)."""

    def step_times(self, levels: int, targets: Iterable[float]) -> Iterator[float]:
        """The step's ms at largest depth `levels` for each verify's ms in `targets`: drafting, verifying and the
        overhead one after the other; drafting ahead, the drafts for the next step overlap the verify, so the
        longer of the two counts, and `ahead_contention` of the shorter, plus drafting now when drafts made ahead
        are dropped (as likely as not)."""
        if self.ahead_ms is None:
            return map((self.draft_ms[levels] + self.overhead_ms[levels]).__add__, targets)
        now = self.drafting_now[levels] * self.draft_ms[levels] + self.overhead_ms[levels]
        ahead, contention = self.ahead_ms[levels], self.ahead_contention
        if contention == 0.0:
            return map(now.__add__, map(max, repeat(ahead), targets))
        return (now + max(ahead, t) + contention * min(ahead, t) for t in targets)

    def overlap(self, levels: int, verify_ms: float) -> AheadOverlap | None:
        """A step at largest depth `levels` drafting ahead beside a verify of `verify_ms`, as priced; None when it
        does not draft ahead."""
        if self.ahead_ms is None or levels == 0:
            return None
        return AheadOverlap(self.ahead_ms[levels], verify_ms, self.ahead_contention)

    def padded_targets(self, totals: Iterable[float], widest_total: float) -> Iterator[float]:
        """`target_at(verified_drafts(t, widest_total))` for each total t <= widest_total, with no Python call
        but `target_at` per total (the depth search's inner loop): there the priced total is affine in t."""
        keep, padding = 1.0 - PADDING_SHARE, PADDING_SHARE * widest_total
        return map(self.target_at, map(padding.__add__, map(keep.__mul__, totals)))

    def target_at(self, total_drafts: float) -> float:
        whole = int(total_drafts)
        if whole == total_drafts or whole + 1 >= len(self.target_ms):
            return self.target_ms[min(whole, len(self.target_ms) - 1)]
        low = self.target_ms[whole]
        return low + (total_drafts - whole) * (self.target_ms[whole + 1] - low)


@dataclass(frozen=True)
class AheadOverlap:
    """A step that drafts ahead, as it was priced: the draft made ahead, the verify beside it, and the contention
    between the two the price assumed (`StepCosts.ahead_contention`)."""

    ahead_ms: float
    verify_ms: float
    contention: float

    def measured_contention(self, predicted_ms: float, measured_ms: float) -> float | None:
        """The contention that would have priced this step at the time it took: the one assumed plus the miss over
        the shorter of the two, the part contention scales (unclamped: one step's miss holds all its noise). None
        where the shorter is nothing."""
        shorter = min(self.ahead_ms, self.verify_ms)
        if shorter <= 0:
            return None
        return self.contention + (measured_ms - predicted_ms) / shorter


def price_step(steps: StepCosts, levels: int, drafts: float, widest: float | None = None) -> float:
    """Predicted ms of a step: draft at its largest depth `levels` (0: nothing is drafted), target at 1 + the
    mean draft tokens verified per sequence plus the padding charge of `verified_drafts`, overhead at `levels`;
    drafting ahead, the drafts for the next step overlap the verify (`StepCosts.step_times`).

    `drafts`: the draft tokens verified in all (expected, so fractional with offer rates under 1); `widest`: what
    would be verified if every row were as wide as the widest (None: all are, no padding). Depth plans and tree
    budgets are priced alike: a tree of n nodes is verified in one forward over every node, so it costs what a
    chain of n tokens does, its drafting and overhead what a chain as deep as its levels does.
    """
    padded = verified_drafts(drafts, drafts if widest is None else widest)
    return next(steps.step_times(levels, (steps.target_at(padded),)))


def verified_drafts(total_drafts: float, widest_total: float) -> float:
    """The draft tokens a verification is priced at: those it verifies, plus `PADDING_SHARE` of the padding
    up to the widest row (`widest_total` >= `total_drafts`: the total if every row were that wide). One depth
    for all: no padding."""
    # Written as `padded_targets` computes it, so the search and the plan's evaluation agree to the last bit.
    return PADDING_SHARE * widest_total + (1.0 - PADDING_SHARE) * total_drafts


def _rescale(value: float, default_from: float, default_to: float) -> float:
    """Move `value` the way the default moves from one point to another (by ratio; additive if it is 0)."""
    if default_from > 0:
        return value * default_to / default_from
    return max(0.0, value + default_to - default_from)


def _interp(xs: Sequence[float], ys: Sequence[float], x: float, outside: Callable[[int, float], float]) -> float:
    """Piecewise-linear through (xs, ys); `outside(edge_index, x)` answers beyond the first or last point."""
    j = bisect_right(xs, x)
    if 0 < j < len(xs):
        x0, y0 = xs[j - 1], ys[j - 1]
        return y0 + (ys[j] - y0) * (x - x0) / (xs[j] - x0)
    return outside(0 if j == 0 else len(xs) - 1, x)


class _Curve:
    """ms against tokens per sequence at one batch size: linear between the table's token points; past
    the last one the edge value scaled as the default scales; below the first (under one token, which
    the search never asks) held flat, which keeps it monotone in batch size too."""

    __slots__ = ("_batch", "_default", "_ts", "_vs")

    def __init__(self, batch: int, default: CostFn, ts: tuple[float, ...], vs: list[float]) -> None:
        self._batch, self._default, self._ts, self._vs = batch, default, ts, vs

    def _outside(self, edge: int, t: float) -> float:
        if edge == 0:
            return self._vs[0]
        return _rescale(self._vs[edge], self._default(self._batch, self._ts[edge]), self._default(self._batch, t))

    def __call__(self, tokens_per_seq: float) -> float:
        return _interp(self._ts, self._vs, tokens_per_seq, self._outside)


class _DefaultCurve:
    """A role with no samples: its default cost function at one batch size."""

    __slots__ = ("_batch", "_default")

    def __init__(self, batch: int, default: CostFn) -> None:
        self._batch, self._default = batch, default

    def __call__(self, tokens_per_seq: float) -> float:
        return max(0.0, self._default(self._batch, tokens_per_seq))


def _isotonic(values: list[float], weights: list[int]) -> list[float]:
    """The non-decreasing sequence closest to ``values`` in weighted least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, cells]
    for value, weight in zip(values, weights, strict=True):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            mean, w, n = blocks.pop()
            blocks[-1] = [(blocks[-1][0] * blocks[-1][1] + mean * w) / (blocks[-1][1] + w), blocks[-1][1] + w,
                          blocks[-1][2] + n]
    return [mean for mean, _, n in blocks for _ in range(int(n))]


def _extend_deeper(ts: Sequence[float], vs: Sequence[float], t: float) -> float:
    """A row measured at two or more token points, past its deepest: the last segment's slope, at least flat."""
    slope = max(0.0, (vs[-1] - vs[-2]) / (ts[-1] - ts[-2]))
    return vs[-1] + slope * (t - ts[-1])


def _along_row(ts: Sequence[float], vs: Sequence[float], t: float) -> float:
    """A row measured at two or more token points, at `t` >= its first: linear between them, then
    `_extend_deeper`."""
    return _interp(ts, vs, t, lambda _, t: _extend_deeper(ts, vs, t))


def _borrowed_shape(shapes: Mapping[int, tuple[list[float], list[float]]], default: CostFn, batch: int,
                    measured_t: float, measured_ms: float, t: float) -> float:
    """cost(batch, t) for a row with nothing measured between `measured_t` and `t`: its `measured_ms` times
    cost(t) / cost(measured_t) in the nearest rows measured at two or more token points from min(t, measured_t)
    on, linear in batch between the nearest below and above; with rows on one side only, that row's ratio moved
    as the default's ratio moves from its batch size to this one; with none, the default's shape.

    Why not the default's shape alone: a batch size the fleet only passes through (a burst's tail, a few
    requests just finished) is measured at plain decoding only, and the default, a rough three-number fit, can
    price deep drafts there far cheaper than the well-measured batch sizes on either side say they cost."""
    def ratio_in(b: int) -> float:
        ts, vs = shapes[b]
        return _along_row(ts, vs, t) / _along_row(ts, vs, measured_t)

    def default_ratio(b: int) -> float:
        return _rescale(1.0, default(b, measured_t), default(b, t))

    lowest = min(t, measured_t)
    usable = sorted(b for b, (ts, vs) in shapes.items()
                    if b != batch and ts[0] <= lowest and _along_row(ts, vs, measured_t) > 0)
    below = [b for b in usable if b < batch]
    above = [b for b in usable if b > batch]
    if measured_ms > 0 and below and above:
        low, high = below[-1], above[0]
        u = (batch - low) / (high - low)
        return measured_ms * ((1 - u) * ratio_in(low) + u * ratio_in(high))
    if measured_ms > 0 and usable:
        # The nearest row's ratio, moved as the default's ratio moves from that row's batch size to this one.
        nearest = below[-1] if below else above[0]
        if default_ratio(nearest) > 0:
            return measured_ms * ratio_in(nearest) * default_ratio(batch) / default_ratio(nearest)
    return _rescale(measured_ms, default(batch, measured_t), default(batch, t))


def _fit_table(samples: list[Measured], default: CostFn, max_batch: int, max_tokens: int) -> CostTable | None:
    """Median per (batch, token bucket) cell, filled out to a fixed grid, then made monotone; None when no cell
    has `MIN_CELL_SAMPLES` samples yet."""
    cells: dict[tuple[int, float], list[float]] = {}
    for batch, tokens, ms in samples:
        cells.setdefault((batch, round(tokens / TOKEN_BUCKET) * TOKEN_BUCKET), []).append(ms)
    # Medians: a GC pause or a cold cache is one outlier. Cells with fewer samples are left to interpolation.
    measured = {key: median(v) for key, v in cells.items() if len(v) >= MIN_CELL_SAMPLES}
    if not measured:
        return None
    by_row: dict[int, list[tuple[float, float, int]]] = {}
    for (b, t), ms in sorted(measured.items()):
        by_row.setdefault(b, []).append((t, ms, len(cells[b, t])))
    # More tokens never cost less: within a row, the monotone fit weighted by each cell's samples, so a few slow
    # calls at one depth cannot raise every deeper depth above a well-measured cheaper one.
    # Each row as (token points, ascending; fitted ms).
    rows = {b: ([t for t, _, _ in row], _isotonic([ms for _, ms, _ in row], [n for _, _, n in row]))
            for b, row in by_row.items()}

    # The grid covers what the search will ask for (powers of two up to max_batch, whole tokens up to
    # max_tokens) plus every measured point, so the fitted medians are reproduced exactly.
    batch_points = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | set(rows))
    token_points = sorted({float(t) for t in range(1, max_tokens + 1)} | {t for (_, t) in measured})

    # Within a measured batch row: linear between measured token cells. Deeper than the deepest measured
    # cell: the last segment's slope (at least flat), as measured; if that is optimistic the policy will
    # choose those depths and measure them, so the error corrects itself. Shallower than the shallowest, or
    # with one measured cell: the shape of the rows measured there, see `_borrowed_shape`.
    shapes = {b: row for b, row in rows.items() if len(row[0]) > 1}
    filled_rows: dict[int, list[float]] = {}
    for b, (ts, vs) in rows.items():

        def row_outside(edge: int, t: float, b: int = b, ts: list[float] = ts, vs: list[float] = vs) -> float:
            if edge > 0 and len(ts) > 1:
                return _extend_deeper(ts, vs, t)
            return _borrowed_shape(shapes, default, b, ts[edge], vs[edge], t)

        filled_rows[b] = [_interp(ts, vs, t, row_outside) for t in token_points]

    # More sequences never cost less either: per token point, the monotone fit across the measured batch sizes,
    # weighted by each row's samples, so a few slow calls at a batch size the fleet only passes through (a
    # burst's tail) cannot lift every larger batch above its own well-measured cost.
    measured_batches = sorted(filled_rows)
    row_samples = [sum(n for _, _, n in by_row[b]) for b in measured_batches]
    for j in range(len(token_points)):
        column = _isotonic([filled_rows[b][j] for b in measured_batches], row_samples)
        for b, ms in zip(measured_batches, column, strict=True):
            filled_rows[b][j] = ms

    # Across batch sizes, per token point: linear between measured rows, the default's shape beyond them.
    # (The policy does not choose the batch size, so no exploration would correct a bad extrapolation,
    # and a slope from two nearby batch sizes is too noisy to carry far.)
    values = [[0.0] * len(token_points) for _ in batch_points]
    for j, t in enumerate(token_points):
        col = [filled_rows[b][j] for b in measured_batches]

        def col_outside(edge: int, b: float, t: float = t, col: list[float] = col) -> float:
            return _rescale(col[edge], default(measured_batches[edge], t), default(int(b), t))

        for i, b in enumerate(batch_points):
            values[i][j] = max(0.0, _interp(measured_batches, col, b, col_outside))

    # More work never costs less: a running max along batch, then along tokens, keeps the filled grid monotone
    # in both (the default's shape beyond the measured points need not be); bilinear keeps it so.
    for i in range(1, len(batch_points)):
        values[i] = [max(a, b) for a, b in zip(values[i], values[i - 1], strict=True)]
    values = [list(accumulate(row, max)) for row in values]
    return CostTable(tuple(batch_points), tuple(token_points), tuple(tuple(r) for r in values), len(samples))


class CostModel:
    """Predicted milliseconds of a step's parts as a function of batch size and tokens per sequence.

    The choice: a table of medians, interpolated. Samples are grouped into cells by (batch size, tokens per
    sequence rounded to `TOKEN_BUCKET`) and each cell with at least `MIN_CELL_SAMPLES` samples keeps its
    median, so noisy outliers do not move it. Within a batch size the medians get a monotone fit weighted by
    their samples and are filled out to whole tokens (plus every measured point): linear between measured
    points; deeper than the deepest, the last segment's slope (kept non-negative); shallower, or deeper than a
    single measured point, the nearest measured value scaled as the batch sizes measured at several depths
    around it scale (as the default cost function scales when there are none). Then, per token point, the
    measured batch sizes get the same weighted monotone fit, and the grid's other batch sizes (powers of two)
    are linear between them or, outside, scaled like the default; so a role measured at one batch size and
    depth still gets sensible costs everywhere (the default's shape at the measured level). A running max keeps
    the grid non-decreasing in both arguments, and prediction is bilinear on it (so monotone too); past the
    grid, the edge value is again scaled like the default. A role with no samples uses its default directly.

    Context: the table is each role's cost at its reference context; a `ContextCost` per role adds the KV read
    past it (fitted by `fit` from samples at several contexts, else the default's `per_kv_ms`), and the table is
    fitted to the samples with that term taken off. When every sample has the same context, or none has one, the
    table is what it would be without contexts, and a context of None (the callers that do not say) prices at it.

    Why a table rather than a fitted formula: real costs have knees (memory- to compute-bound, kernel
    tile sizes) that a small formula misses, and the search only asks about batch sizes and depths the
    fleet runs at, which are exactly where the samples are. The default carries the rest.

    Immutable once built (`fit` makes a new one); per-batch curves are memoised, so `predict` and
    `step_costs` are cheap on the hot path.
    """

    def __init__(self, defaults: Mapping[str, CostFn] | None = None,
                 tables: Mapping[str, CostTable] | None = None, *, ahead_alpha: float | None = None,
                 ahead_contention: float = 0.0, context_costs: Mapping[str, ContextCost] | None = None,
                 self_drafted: SelfDrafting | None = None) -> None:
        """``ahead_alpha``: the router drafts ahead (--draft-ahead), and a draft comes true this often (the fleet's
        acceptance rate); None: drafting and verifying take turns. ``ahead_contention``: how much the drafts made
        ahead and the verify slow each other (`StepCosts.ahead_contention`). ``context_costs``: each role's KV
        term (a role not given: its default's, `default_context_cost`). ``self_drafted``: the target drafts in its
        verify (SPACE, lookahead): no draft call, and d drafts per sequence make the verify feed
        `SelfDrafting.verify_tokens` (d) tokens more."""
        self.ahead_alpha = ahead_alpha
        if not 0.0 <= ahead_contention <= 1.0:
            raise ValueError(f"ahead_contention must be in [0, 1], got {ahead_contention}")
        self.ahead_contention = ahead_contention
        self.self_drafted = self_drafted
        self._defaults = dict(DEFAULT_COSTS if defaults is None else defaults)
        missing = [role for role in ROLES if role not in self._defaults]
        if missing:
            raise ValueError(f"CostModel defaults need every role {ROLES}; missing {missing}")
        self._tables = dict(tables or {})
        given = dict(context_costs or {})
        self._context_costs = {role: given.get(role) or default_context_cost(self._defaults[role]) for role in ROLES}
        self._curves: dict[tuple[str, int], Callable[[float], float]] = {}
        self._steps: dict[tuple[int, int, int | None], StepCosts] = {}

    @classmethod
    def fit(cls, samples: Iterable[CostSample], defaults: Mapping[str, CostFn] | None = None, *,
            max_batch: int = 256, max_tokens: int = 33, ahead_alpha: float | None = None,
            ahead_contention: float = 0.0, self_drafted: SelfDrafting | None = None) -> CostModel:
        """A model fitted from a window of samples (all of it, each time); roles without samples use defaults.
        Each role's KV term first (`_fit_context_cost`), then its table from the samples at its reference context;
        a ragged verify counts at its `CostSample.priced_tokens`."""
        if max_batch < 1 or max_tokens < 1:
            raise ValueError(f"max_batch and max_tokens must be >= 1, got {max_batch}, {max_tokens}")
        model = cls(defaults)
        by_role: dict[str, list[CostSample]] = {}
        for s in samples:
            if s.role not in ROLES:  # a catch-up's, priced apart (`PREFILL_ROLE`)
                continue
            if s.widest is not None:
                s = dataclasses.replace(s, tokens_per_seq=s.priced_tokens, widest=None)
            by_role.setdefault(s.role, []).append(s)
        context_costs = {role: _fit_context_cost(role, ss, model._defaults[role]) for role, ss in by_role.items()}
        tables = {role: _fit_table(_at_reference(role, ss, context_costs[role]), model._defaults[role], max_batch,
                                   max_tokens) for role, ss in by_role.items()}
        return cls(model._defaults, {role: table for role, table in tables.items() if table is not None},
                   ahead_alpha=ahead_alpha, ahead_contention=ahead_contention, context_costs=context_costs,
                   self_drafted=self_drafted)

    def with_contention(self, contention: float) -> CostModel:
        """This model with drafting ahead priced at ``contention`` (`StepCosts.ahead_contention`)."""
        return CostModel(self._defaults, self._tables, ahead_alpha=self.ahead_alpha, ahead_contention=contention,
                         context_costs=self._context_costs, self_drafted=self.self_drafted)

    @property
    def fitted_roles(self) -> dict[str, int]:
        """Roles fitted from samples, with how many samples each (for a log line)."""
        return {role: table.samples for role, table in self._tables.items()}

    def context_cost(self, role: str) -> ContextCost:
        """The role's KV term."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return self._context_costs[role]

    def curve(self, role: str, batch_size: int) -> Callable[[float], float]:
        """ms as a function of tokens per sequence at one batch size (memoised)."""
        key = (role, batch_size)
        found = self._curves.get(key)
        if found is not None:
            return found
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        default = self._defaults[role]
        table = self._tables.get(role)
        curve: Callable[[float], float]
        if table is None:
            curve = _DefaultCurve(batch_size, default)
        else:
            curve = _Curve(batch_size, default, table.token_points, self._table_row(table, default, batch_size))
        self._curves[key] = curve  # a dict store is atomic; a racing thread at worst builds the same curve
        return curve

    @staticmethod
    def _table_row(table: CostTable, default: CostFn, batch_size: int) -> list[float]:
        bs, ts, vs = table.batch_points, table.token_points, table.values
        i = bisect_right(bs, batch_size)
        if 0 < i < len(bs):
            u = (batch_size - bs[i - 1]) / (bs[i] - bs[i - 1])
            return [(1 - u) * a + u * b for a, b in zip(vs[i - 1], vs[i], strict=True)]
        edge = 0 if i == 0 else len(bs) - 1
        row = [_rescale(v, default(bs[edge], t), default(batch_size, t)) for v, t in zip(vs[edge], ts, strict=True)]
        return list(accumulate(row, max))  # keep it monotone in tokens whatever the default's shape

    def predict(self, role: str, batch_size: int, tokens_per_seq: float, context: float | None = None) -> float:
        """Predicted ms of one call of `role` with `batch_size` sequences and `tokens_per_seq` tokens each, at a
        mean KV length per sequence of `context` (None: the role's reference context)."""
        return self.curve(role, batch_size)(tokens_per_seq) + self._context_costs[role](
            role, batch_size, tokens_per_seq, context)

    def step_costs(self, batch_size: int, max_depth: int, context: float | None = None) -> StepCosts:
        """Everything the depth search needs at one batch size and the batch's mean KV length per sequence
        (`context`, rounded up by `context_bucket`; None: each role's reference context), precomputed once per
        model (memoised)."""
        bucket = None if context is None else context_bucket(context)
        key = (batch_size, max_depth, bucket)
        found = self._steps.get(key)
        if found is None:
            target, draft = self._priced("target", batch_size, bucket), self._priced("draft", batch_size, bucket)
            overhead = self._priced("overhead", batch_size, bucket)
            drafting = self.self_drafted
            fed = float if drafting is None else drafting.verify_tokens  # tokens a sequence's d drafts add
            found = StepCosts(
                batch_size=batch_size,
                target_ms=tuple(target(1 + fed(n / batch_size)) for n in range(batch_size * max_depth + 1)),
                draft_ms=(0.0, *((draft(float(d)) if drafting is None else 0.0) for d in range(1, max_depth + 1))),
                overhead_ms=tuple(max(MIN_STEP_MS, overhead(1.0 + d)) for d in range(max_depth + 1)),
                context=bucket,
            )
            if self.ahead_alpha is not None:
                # Drafts made ahead at depth d are used when all d drafts and the guess of the target's own token
                # came true, for every sequence of the batch (one dropped: the step drafts now for it).
                found = dataclasses.replace(
                    found, ahead_ms=(0.0, *(draft(float(d + 1)) for d in range(1, max_depth + 1))),
                    drafting_now=(0.0, *(1.0 - self.ahead_alpha ** (batch_size * (d + 1))
                                         for d in range(1, max_depth + 1))),
                    ahead_contention=self.ahead_contention)
            self._steps[key] = found
        return found

    def _priced(self, role: str, batch_size: int, context: int | None) -> Callable[[float], float]:
        """The role's ms against tokens per sequence at one batch size and context: its curve plus its KV term."""
        curve, kv = self.curve(role, batch_size), self._context_costs[role]
        if context is None or kv(role, batch_size, 1.0, context) == 0.0:
            return curve
        return lambda tokens_per_seq: curve(tokens_per_seq) + kv(role, batch_size, tokens_per_seq, context)
