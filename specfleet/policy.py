"""Batch-aware, per-sequence speculation depth: a cost model times an acceptance model gives the depths.

Su, Giannoula & Pekhimenko, "The Synergy of Speculative Decoding and Batching in Serving Large Language
Models" (2023): the best speculation length depends on the batch size. A small batch leaves the target
memory-bound, so verifying extra tokens is nearly free and deep drafts pay; a large batch makes it
compute-bound, every drafted token costs real time, and the best depth falls. Here that is made
per-sequence: each step, given every live sequence's estimated acceptance rate and the fitted costs of
drafting and verifying at this batch size, pick the depths that maximise predicted goodput (or minimise
time per output token above a goodput floor).

A drafter may also offer nothing when asked (an n-gram drafter without a match). Such a miss costs no
verification and says nothing about how well drafts are accepted, so each sequence has an *offer rate* m
(the chance that it gets a draft when it asks) apart from its acceptance rate alpha: a step at depth d is
expected to emit 1 + m * sum_{k<=d} alpha^k tokens and to verify m * d draft tokens.

Everything is plain Python: no I/O, no Redis, no gRPC. Telemetry arrives as `CostSample` records and
per-sequence (accepted, rejections) and (offers, misses) counts; `DepthPolicy` holds the fitted state for
the router.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import add, mul, sub, truediv
from statistics import median
from types import MappingProxyType

ROLES = ("draft", "target", "overhead")
MODES = ("throughput", "latency")
MAX_ALPHA = 0.999
"""Acceptance estimates are capped below 1 so a lucky streak never makes unbounded depth look free."""
TOKEN_BUCKET = 0.5
"""Width of the tokens-per-sequence cells samples are grouped into (the target sees fractional means)."""
MIN_STEP_MS = 1e-6
"""Floor on a predicted step, so an all-zero cost model cannot divide by zero."""
MIN_OFFER_RATE = 1e-3
"""Offer rates are kept above 0: the depth search ranks draft tokens by gain per expected verified token."""
PADDING_SHARE = 0.4
"""Share of a padded token's verify cost that a plan pays for each row shorter than its widest. The target
pads each attention group to its widest row: the padding costs attention but no projections or MLP, and
splitting ragged rows into several groups costs extra calls. Measured on the CPU with SmolLM2-135M
(`python -m bench.mixed_depths`): mixed plans cost between their real and their fully padded token counts,
0.12-0.49 of the way, mostly 0.15-0.35. Priced at their real tokens alone they ran 3-38% over their price, and
plans predicted 1-3% better than one depth for all ran slower; a share near the top keeps them honest."""
DRAFT_HURDLE = 0.1
"""The smallest predicted gain over plain decoding for which the router's policy drafts at all (`min_gain`).
A prediction is a fit of noisy timings: where drafting is predicted to gain a few percent, the gain is within
the model's error and the real sign can be either. Measured on the CPU with SmolLM2-135M and the n-gram
drafter (`python -m bench.adaptive`): at batch 16 and 32 plans predicted 3-10% above plain decoding ran
10-25% below it, while at batch 1-4, where drafting pays, the median predicted gain was 14-25%. It also holds
back some plans that would have gained (at batch 4, predicted 2-10%, measured 7-9%): a fixed margin cannot tell
where the model is optimistic from where it is right. The router therefore scales the predicted gain by how its own
drafting steps at that batch size measured against their predictions (the `calibration` argument) before it
applies the hurdle."""
MIN_CELL_SAMPLES = 3
"""Samples a (batch, tokens) cell needs before its median counts as measured. A single slow call (a cold cache,
a pause) must not make a depth look expensive: the policy would stop choosing it and so never measure it again."""

CostFn = Callable[[int, float], float]
"""(batch_size, tokens_per_seq) -> milliseconds; must be non-decreasing in both arguments."""


@dataclass(frozen=True)
class CostSample:
    """One latency measurement from telemetry.

    `role` is "draft" (one Propose: `batch_size` sequences, `tokens_per_seq` the largest depth drafted
    in the call), "target" (one Verify: `tokens_per_seq` the mean tokens fed per sequence, mean(depth + 1))
    or "overhead" (the rest of a router step: gRPC, (de)serialisation, bookkeeping; `tokens_per_seq` 1 plus
    the step's largest depth, so a step that calls the drafters is charged the round trip it adds).
    """

    role: str
    batch_size: int
    tokens_per_seq: float
    ms: float

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"CostSample.role must be one of {ROLES}, got {self.role!r}")
        if self.batch_size < 1:
            raise ValueError(f"CostSample.batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.tokens_per_seq) and self.tokens_per_seq >= 0):
            raise ValueError(f"CostSample.tokens_per_seq must be finite and >= 0, got {self.tokens_per_seq}")
        if not (math.isfinite(self.ms) and self.ms >= 0):
            raise ValueError(f"CostSample.ms must be finite and >= 0, got {self.ms}")


@dataclass(frozen=True)
class AnalyticCost:
    """ms = fixed + per_seq * batch + per_token * n + past_knee * max(0, n - knee), n = batch * tokens_per_seq.

    The knee models a device that is memory-bound up to `knee_tokens` tokens per forward (extra tokens
    nearly free) and compute-bound beyond it (each token costs `past_knee_ms` more).
    """

    fixed_ms: float = 0.0
    per_seq_ms: float = 0.0
    per_token_ms: float = 0.0
    knee_tokens: float = math.inf
    past_knee_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed_ms", "per_seq_ms", "per_token_ms", "knee_tokens", "past_knee_ms"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"AnalyticCost.{name} must be >= 0, got {getattr(self, name)}")

    def __call__(self, batch_size: int, tokens_per_seq: float) -> float:
        tokens = batch_size * tokens_per_seq
        return (self.fixed_ms + self.per_seq_ms * batch_size + self.per_token_ms * tokens
                + self.past_knee_ms * max(0.0, tokens - self.knee_tokens))


DEFAULT_COSTS: Mapping[str, CostFn] = MappingProxyType({
    # Rough CPU numbers for SmolLM2-135M: one token at batch 1 is 25 ms; 8 tokens at batch 1 about 1.45x
    # that; 8 tokens at batch 16 about 2.2x one token at batch 16. A fixed + per-sequence + per-token form
    # fits all three (a single per-token slope cannot); no knee is visible on CPU.
    "target": AnalyticCost(fixed_ms=16.7, per_seq_ms=6.7, per_token_ms=1.6),
    "draft": AnalyticCost(fixed_ms=0.8, per_token_ms=0.025),  # ngram lookup: about 1 ms a call
    "overhead": AnalyticCost(fixed_ms=3.0),  # gRPC and bookkeeping of a router step
})


# ---------------------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------------------


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
    """Predicted costs of one step at a fixed batch size, precomputed for the depth search.

    `target_ms[n]`: Verify with n draft tokens in total (tokens per sequence 1 + n / batch), linear in
    between for an expected (fractional) total, see `target_at`; a plan whose rows differ in width is also
    charged for its padding, see `verified_drafts`;
    `draft_ms[d]`: Propose with largest depth d (0.0 at d = 0: nothing is drafted); `overhead_ms[d]`: the rest
    of a step whose largest depth is d.
    """

    batch_size: int
    target_ms: tuple[float, ...]
    draft_ms: tuple[float, ...]
    overhead_ms: tuple[float, ...]

    def step_ms(self, max_depth: int, total_drafts: float, widest_total: float | None = None) -> float:
        """A step whose largest depth is `max_depth` verifying `total_drafts` draft tokens in all, where
        `widest_total` would be verified if every sequence drafted `max_depth` (None: they all do, no padding)."""
        widest = total_drafts if widest_total is None else widest_total
        return (self.draft_ms[max_depth] + self.target_at(verified_drafts(total_drafts, widest))
                + self.overhead_ms[max_depth])

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


def _fit_table(samples: list[CostSample], default: CostFn, max_batch: int, max_tokens: int) -> CostTable | None:
    """Median per (batch, token bucket) cell, filled out to a fixed grid, then made monotone; None when no cell
    has `MIN_CELL_SAMPLES` samples yet."""
    cells: dict[tuple[int, float], list[float]] = {}
    for s in samples:
        key = (s.batch_size, round(s.tokens_per_seq / TOKEN_BUCKET) * TOKEN_BUCKET)
        cells.setdefault(key, []).append(s.ms)
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

    Why a table rather than a fitted formula: real costs have knees (memory- to compute-bound, kernel
    tile sizes) that a small formula misses, and the search only asks about batch sizes and depths the
    fleet runs at, which are exactly where the samples are. The default carries the rest.

    Immutable once built (`fit` makes a new one); per-batch curves are memoised, so `predict` and
    `step_costs` are cheap on the hot path.
    """

    def __init__(self, defaults: Mapping[str, CostFn] | None = None,
                 tables: Mapping[str, CostTable] | None = None) -> None:
        self._defaults = dict(DEFAULT_COSTS if defaults is None else defaults)
        missing = [role for role in ROLES if role not in self._defaults]
        if missing:
            raise ValueError(f"CostModel defaults need every role {ROLES}; missing {missing}")
        self._tables = dict(tables or {})
        self._curves: dict[tuple[str, int], Callable[[float], float]] = {}
        self._steps: dict[tuple[int, int], StepCosts] = {}

    @classmethod
    def fit(cls, samples: Iterable[CostSample], defaults: Mapping[str, CostFn] | None = None, *,
            max_batch: int = 256, max_tokens: int = 33) -> CostModel:
        """A model fitted from a window of samples (all of it, each time); roles without samples use defaults."""
        if max_batch < 1 or max_tokens < 1:
            raise ValueError(f"max_batch and max_tokens must be >= 1, got {max_batch}, {max_tokens}")
        model = cls(defaults)
        by_role: dict[str, list[CostSample]] = {}
        for s in samples:
            by_role.setdefault(s.role, []).append(s)
        tables = {role: _fit_table(ss, model._defaults[role], max_batch, max_tokens) for role, ss in by_role.items()}
        return cls(model._defaults, {role: table for role, table in tables.items() if table is not None})

    @property
    def fitted_roles(self) -> dict[str, int]:
        """Roles fitted from samples, with how many samples each (for a log line)."""
        return {role: table.samples for role, table in self._tables.items()}

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

    def predict(self, role: str, batch_size: int, tokens_per_seq: float) -> float:
        """Predicted ms of one call of `role` with `batch_size` sequences and `tokens_per_seq` tokens each."""
        return self.curve(role, batch_size)(tokens_per_seq)

    def step_costs(self, batch_size: int, max_depth: int) -> StepCosts:
        """Everything the depth search needs at one batch size, precomputed once per model (memoised)."""
        key = (batch_size, max_depth)
        found = self._steps.get(key)
        if found is None:
            target, draft = self.curve("target", batch_size), self.curve("draft", batch_size)
            overhead = self.curve("overhead", batch_size)
            found = StepCosts(
                batch_size=batch_size,
                target_ms=tuple(target(1 + n / batch_size) for n in range(batch_size * max_depth + 1)),
                draft_ms=(0.0, *(draft(float(d)) for d in range(1, max_depth + 1))),
                overhead_ms=tuple(max(MIN_STEP_MS, overhead(1.0 + d)) for d in range(max_depth + 1)),
            )
            self._steps[key] = found
        return found


# ---------------------------------------------------------------------------------------------------------
# Acceptance model
# ---------------------------------------------------------------------------------------------------------


def acceptance_estimate(accepted: int, rejections: int, prior_alpha: float, prior_weight: float) -> float:
    """A sequence's per-token acceptance rate alpha, shrunk toward the fleet-wide rate.

    `accepted`: draft tokens accepted so far; `rejections`: steps that ended in a rejected draft token.
    Returns (accepted + w * prior) / (accepted + rejections + w), clamped to [0, MAX_ALPHA].
    """
    # Why accepted / (accepted + rejections): if each draft token is accepted independently with
    # probability alpha, a step of depth d accepts a = min(G, d) tokens with G geometric, so its
    # likelihood is alpha^a * (1 - alpha) when a rejection ended it and alpha^d when all d were accepted.
    # Over many steps the log-likelihood is accepted * log(alpha) + rejections * log(1 - alpha), maximised
    # at accepted / (accepted + rejections). accepted / proposed is biased low at larger depth: the tokens
    # drafted after a rejection are never tested but still count as proposed. The prior acts as w
    # pseudo-observations at the fleet rate, so a new sequence starts there and moves as evidence comes.
    if accepted < 0 or rejections < 0:
        raise ValueError(f"accepted and rejections must be >= 0, got {accepted}, {rejections}")
    return min(max(_shrunk_rate(accepted, rejections, prior_alpha, prior_weight), 0.0), MAX_ALPHA)


def _shrunk_rate(successes: int, failures: int, prior: float, prior_weight: float) -> float:
    """successes / (successes + failures), with ``prior_weight`` pseudo-observations at ``prior``."""
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    total = successes + failures + prior_weight
    return (successes + prior_weight * prior) / total if total > 0 else prior


def offer_estimate(offers: int, misses: int, prior_rate: float, prior_weight: float) -> float:
    """A sequence's offer rate m: the chance that its drafter offers a draft when asked, shrunk toward the fleet's.

    `offers`: steps in which the drafter offered at least one token; `misses`: steps in which it was asked and
    offered none. Returns (offers + w * prior) / (offers + misses + w), clamped to [MIN_OFFER_RATE, 1].
    """
    if offers < 0 or misses < 0:
        raise ValueError(f"offers and misses must be >= 0, got {offers}, {misses}")
    return min(max(_shrunk_rate(offers, misses, prior_rate, prior_weight), MIN_OFFER_RATE), 1.0)


def expected_emitted(alpha: float, depth: int, offer_rate: float = 1.0) -> float:
    """Expected tokens one step emits at depth `depth`: accepted drafts plus the recovered or bonus token.

    sum_{k=0..depth} alpha^k = (1 - alpha^(depth + 1)) / (1 - alpha) under i.i.d. acceptance (Leviathan et
    al., 2023); depth 0 is plain decoding: 1. With an offer rate m < 1 the drafts come only in a fraction m
    of the steps: 1 + m * sum_{k=1..depth} alpha^k.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not 0.0 <= offer_rate <= 1.0:
        raise ValueError(f"offer_rate must be in [0, 1], got {offer_rate}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    drafts = float(depth) if alpha == 1.0 else (alpha - alpha ** (depth + 1)) / (1.0 - alpha)
    return 1.0 + offer_rate * drafts


# ---------------------------------------------------------------------------------------------------------
# Plans: evaluation
# ---------------------------------------------------------------------------------------------------------


def plan_step_ms(costs: CostModel, depths: Sequence[int], offer_rates: Sequence[float] | None = None) -> float:
    """Predicted ms of a step: draft at the largest depth (if any), target at 1 + the mean expected draft
    tokens offered (depth times offer rate) plus the padding charge of `verified_drafts`, overhead; read off
    `StepCosts`, as the depth search does."""
    batch = len(depths)
    if batch == 0:
        return 0.0
    deepest = max(depths)
    rates = _checked_offer_rates(offer_rates, batch)
    return costs.step_costs(batch, deepest).step_ms(deepest, sum(map(mul, rates, depths)), deepest * sum(rates))


def plan_goodput(alphas: Sequence[float], depths: Sequence[int], costs: CostModel,
                 offer_rates: Sequence[float] | None = None) -> float:
    """Predicted tokens per second of a plan: expected tokens emitted over predicted step time."""
    rates = _check_plan(alphas, depths, offer_rates)
    if not depths:
        return 0.0
    return 1000.0 * sum(map(expected_emitted, alphas, depths, rates)) / plan_step_ms(costs, depths, rates)


def plan_time_per_token(alphas: Sequence[float], depths: Sequence[int], costs: CostModel,
                        offer_rates: Sequence[float] | None = None) -> float:
    """Predicted ms per output token, averaged over the sequences: mean_i(step_ms / expected_emitted_i)."""
    rates = _check_plan(alphas, depths, offer_rates)
    if not depths:
        return 0.0
    step = plan_step_ms(costs, depths, rates)
    return step * sum(1.0 / expected_emitted(a, d, m) for a, d, m in zip(alphas, depths, rates, strict=True)
                      ) / len(depths)


def _check_plan(alphas: Sequence[float], depths: Sequence[int], offer_rates: Sequence[float] | None
                ) -> Sequence[float]:
    """Validates a plan; its offer rates (all 1 when not given)."""
    if len(alphas) != len(depths):
        raise ValueError(f"alphas and depths must have the same length, got {len(alphas)} and {len(depths)}")
    if any(d < 0 for d in depths):
        raise ValueError(f"depths must be >= 0, got {list(depths)}")
    return _checked_offer_rates(offer_rates, len(alphas))


def _checked_offer_rates(offer_rates: Sequence[float] | None, batch: int) -> list[float]:
    """Given offer rates, checked (one per sequence, each in (0, 1]); all 1 when not given."""
    if offer_rates is None:
        return [1.0] * batch
    rates = [float(m) for m in offer_rates]
    if len(rates) != batch:
        raise ValueError(f"offer_rates must have one entry per sequence ({batch}), got {len(rates)}")
    if any(not 0.0 < m <= 1.0 for m in rates):
        raise ValueError(f"offer rates must be in (0, 1], got {rates}")
    return rates


# ---------------------------------------------------------------------------------------------------------
# Plans: search
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthDecision:
    """The depths for one step and the predictions behind them (for logs and metrics)."""

    depths: tuple[int, ...]
    """Per sequence, in the order given."""
    goodput: float
    """Predicted tokens per second of this plan."""
    step_ms: float
    """Predicted ms of the step."""
    time_per_token_ms: float
    """Predicted ms per output token, averaged over the sequences."""
    uniform_goodput: tuple[float, ...]
    """Predicted tokens per second if every sequence used depth d, for d = 0..max_depth."""
    reason: str
    """One human-readable line: the choice against the uniform alternatives."""


class _Margins:
    """Per-sequence expected tokens by depth, and the marginal gain of each extra draft token.

    Item (k, i) is sequence i's k-th draft token, k = 1..limit_i, listed k-major. Its throughput gain is
    m_i * alpha_i^k (expected emitted rises by that much); its latency gain is 1/E_i(k-1) - 1/E_i(k); its
    weight is m_i, the draft tokens it adds to the verification on average. Gains per weight fall as k
    grows (E is concave and increasing), which makes the greedy allocations below exact when the weights
    are equal (every drafter always offers, or all offer alike).
    """

    def __init__(self, alphas: Sequence[float], limits: Sequence[int], max_depth: int, latency: bool,
                 offer_rates: Sequence[float]) -> None:
        batch = len(alphas)
        everyone = list(range(batch))
        power, emitted = list(offer_rates), [1.0] * batch  # power: m_i * alpha_i^k
        self.emitted_by_depth = [emitted]  # [depth][sequence]: E_i(depth), depth capped by the sequence's limit
        self.unit_weights = all(m == 1.0 for m in offer_rates)  # n drafts verify n tokens: the table's own grid
        self.seq: list[int] = []
        self.k: list[int] = []
        self.gain: list[float] = []
        self.weight: list[float] = []
        self.latency_gain: list[float] = []
        prev_latency = [math.inf] * batch
        for k in range(1, max_depth + 1):
            power = list(map(mul, power, alphas))
            live = [i for i in everyone if limits[i] >= k]
            if len(live) == batch:
                grown = list(map(add, emitted, power))
                self.gain.extend(power)
                self.weight.extend(offer_rates)
            else:
                grown = [e + p if k <= lim else e for e, p, lim in zip(emitted, power, limits, strict=True)]
                self.gain.extend(power[i] for i in live)
                self.weight.extend(offer_rates[i] for i in live)
            self.seq.extend(live)
            self.k.extend([k] * len(live))
            if latency:
                # Running min: rounding must never make a later token look better than an earlier one.
                prev_latency = [min(1.0 / e - 1.0 / g, prev)
                                for e, g, prev in zip(emitted, grown, prev_latency, strict=True)]
                self.latency_gain.extend(prev_latency[i] for i in live)
            emitted = grown
            self.emitted_by_depth.append(emitted)


def _ranked(gains: list[float], weights: list[float]) -> list[int]:
    """Item indices by falling gain per weight (the knapsack's ratio rule)."""
    # Python's sort is stable even with reverse=True: equal ratios keep their k-major order, so within one
    # sequence its k-th token always comes before its (k+1)-th and every prefix is a valid plan.
    ratios = list(map(truediv, gains, weights))
    return sorted(range(len(gains)), key=ratios.__getitem__, reverse=True)


def _allocate(margins: _Margins, order: list[int], batch: int, cap: int, total: int) -> list[int]:
    """Depths from taking the first `total` items of `order` whose k is at most `cap`."""
    depths = [0] * batch
    taken = 0
    for j in order:
        if taken == total:
            break
        if margins.k[j] <= cap:
            depths[margins.seq[j]] += 1
            taken += 1
    return depths


@dataclass(frozen=True)
class _Candidate:
    cap: int
    total: int
    order: int  # index into the orders searched


def _search(margins: _Margins, orders: list[list[int]], steps: StepCosts, max_depth: int, offered: float,
            latency: bool, min_goodput: float) -> tuple[_Candidate, bool]:
    """Best (cap D, total drafts N, allocation order); True when the goodput floor is met.

    For a fixed cap D (the largest depth, which sets the draft cost) and total N (which sets the target
    cost), the step time is fixed, so the best plan maximises the summed gains: greedy by marginal gain
    is exact because each sequence's gains fall with depth. Enumerating D and N then gives the optimum.
    With unequal offer rates the target cost follows the expected verified tokens (the items' summed
    weights), the order is by gain per weight, and each prefix is the best plan for its own verified total
    (a knapsack solved greedily where the greedy fills it exactly); a plan in between prefixes can be a
    little better, so there the result is near-optimal rather than exact.
    The padding charge (`verified_drafts`) depends on D and N alone (`offered`: the summed offer rates, so
    D x offered is what everyone at depth D would verify), which keeps this exact.
    A plan whose actual largest depth is below D is charged D's draft cost and padding here, but the same
    plan is also found, correctly charged, under its own cap, so the maximum is still exact.
    Cost: one sort of B*D items, then O(B*D) work per cap, all of it inside C loops (map, compress,
    accumulate), so O(B*D^2) cheap steps rather than a heap per cap.
    """
    batch = steps.batch_size
    floor_per_ms = min_goodput / 1000.0
    plain = steps.step_ms(0, 0)
    feasible = batch >= floor_per_ms * plain
    # Score, maximised: throughput is tokens per ms; latency is minus the mean ms per token.
    best_score = (-plain if feasible else -math.inf) if latency else batch / plain
    best = _Candidate(0, 0, 0)
    for o, order in enumerate(orders):
        ks = [margins.k[j] for j in order]
        gains = [margins.gain[j] for j in order]
        weights = [] if margins.unit_weights else [margins.weight[j] for j in order]
        latency_gains = [margins.latency_gain[j] for j in order] if latency else []
        for cap in range(1, max_depth + 1):
            count = bisect_right(margins.k, cap)  # items with k <= cap (margins.k is k-major, so sorted)
            if count == 0:
                continue
            # At the largest cap every item qualifies; below it, keep those with k <= cap, in ranked order.
            sel = gains if cap == max_depth else compress(gains, map(cap.__ge__, ks))
            emitted = accumulate(sel, initial=float(batch))
            next(emitted)  # skip the zero-draft total: the n-th value is n drafts, as step below
            fixed = steps.draft_ms[cap] + steps.overhead_ms[cap]
            totals: Iterable[float]
            if margins.unit_weights:
                totals = range(1, count + 1)
            else:  # the verified total after each item: the summed expected drafts so far
                sel_weights = weights if cap == max_depth else compress(weights, map(cap.__ge__, ks))
                totals = accumulate(sel_weights)
            step = map(fixed.__add__, steps.padded_targets(totals, cap * offered))
            if not latency:
                scores = list(map(truediv, emitted, step))
                top = max(scores)
                at = scores.index(top)
            else:
                step = list(step)
                sel_latency = latency_gains if cap == max_depth else compress(latency_gains, map(cap.__ge__, ks))
                inverse = accumulate(sel_latency, sub, initial=float(batch))  # sum_i 1/E_i
                next(inverse)
                per_token = list(map(mul, step, inverse))  # batch x the mean ms per token
                low = min(per_token)
                at = per_token.index(low)
                if floor_per_ms > 0:
                    emitted = list(emitted)
                    if emitted[at] < floor_per_ms * step[at]:  # the floor binds: mask the plans below it
                        per_token = [t if e >= floor_per_ms * s else math.inf
                                     for t, s, e in zip(per_token, step, emitted, strict=True)]
                        low = min(per_token)
                        at = per_token.index(low)
                top = -low / batch
            # Ties go to the earlier candidate: smaller cap, fewer drafts (relative slack for rounding).
            if top > best_score and (best_score == -math.inf or top > best_score + 1e-12 * abs(best_score)):
                best_score, best, feasible = top, _Candidate(cap, at + 1, o), True
    return best, feasible


def _uniform_depths(limits: Sequence[int], depth: int) -> list[int]:
    return [min(depth, lim) for lim in limits]


def _decide(alphas: Sequence[float], costs: CostModel, max_depth: int, limits: Sequence[int] | None,
            latency: bool, min_goodput: float, uniform: bool, pinned: int | None,
            offer_rates: Sequence[float] | None, min_gain: float = 0.0, calibration: float = 1.0) -> DepthDecision:
    alphas = [float(a) for a in alphas]
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas must be in [0, 1], got {alphas}")
    rates = _checked_offer_rates(offer_rates, len(alphas))
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    if min_goodput < 0:
        raise ValueError(f"min_goodput must be >= 0, got {min_goodput}")
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    if not calibration > 0:
        raise ValueError(f"calibration must be > 0, got {calibration}")
    batch = len(alphas)
    if batch == 0:
        return DepthDecision((), 0.0, 0.0, 0.0, (0.0,) * (max_depth + 1), "no sequences")
    caps = [max_depth] * batch if limits is None else [min(max(int(lim), 0), max_depth) for lim in limits]
    if len(caps) != batch:
        raise ValueError(f"limits must have one entry per sequence ({batch}), got {len(caps)}")

    steps = costs.step_costs(batch, max_depth)
    margins = _Margins(alphas, caps, max_depth, latency and not uniform and pinned is None, rates)

    offered = sum(rates)

    def evaluate(depths: Sequence[int]) -> tuple[float, float, float]:
        """(goodput tok/s, step ms, mean ms per token) from the precomputed step costs."""
        deepest = max(depths)
        step = steps.step_ms(deepest, sum(map(mul, rates, depths)), deepest * offered)
        emitted = [margins.emitted_by_depth[d][i] for i, d in enumerate(depths)]
        return 1000.0 * sum(emitted) / step, step, step * sum(1.0 / e for e in emitted) / batch

    def uniform_goodput_at(depth: int) -> float:
        """As `evaluate` for everyone at `depth` (capped), read straight off the expected-tokens table."""
        total = sum(map(mul, rates, map(min, caps, repeat(depth))))
        widest = min(depth, deepest)
        return 1000.0 * sum(margins.emitted_by_depth[depth]) / steps.step_ms(widest, total, widest * offered)

    deepest = max(caps)
    uniform_goodput = tuple(map(uniform_goodput_at, range(max_depth + 1)))
    floor_met = True
    if pinned is not None:
        depths = _uniform_depths(caps, pinned)
    elif uniform:
        # The best single depth: throughput maximises goodput; latency minimises time per token above the floor.
        best_goodput = max(range(max_depth + 1), key=lambda d: (uniform_goodput[d], -d))
        if latency:
            ok = [d for d in range(max_depth + 1) if uniform_goodput[d] >= min_goodput]
            floor_met = bool(ok)
            chosen = min(ok, key=lambda d: (evaluate(_uniform_depths(caps, d))[2], d)) if ok else best_goodput
        else:
            chosen = best_goodput
        depths = _uniform_depths(caps, chosen)
    else:
        by_gain = _ranked(margins.gain, margins.weight)
        if not latency:
            found, _ = _search(margins, [by_gain], steps, max_depth, offered, False, 0.0)
            depths = _allocate(margins, by_gain, batch, found.cap, found.total)
        else:
            # First the unconstrained optimum (exact); if it meets the floor it is the answer.
            by_latency = _ranked(margins.latency_gain, margins.weight)
            found, _ = _search(margins, [by_latency], steps, max_depth, offered, True, 0.0)
            depths = _allocate(margins, by_latency, batch, found.cap, found.total)
            if min_goodput > 0 and evaluate(depths)[0] < min_goodput:
                # The floor binds: search the latency-greedy and goodput-greedy allocations with the floor
                # checked per allocation; the goodput-optimal plan, which meets the floor whenever any plan
                # does, is among them. If none meets it: the throughput-maximising plan.
                orders = [by_latency, by_gain]
                found, floor_met = _search(margins, orders, steps, max_depth, offered, True, min_goodput)
                if not floor_met:
                    orders = [by_gain]
                    found, _ = _search(margins, orders, steps, max_depth, offered, False, 0.0)
                depths = _allocate(margins, orders[found.order], batch, found.cap, found.total)

    goodput, step, per_token = evaluate(depths)
    hurdle = ""
    if pinned is None and (min_gain > 0 or calibration != 1.0) and any(depths):
        plain = [0] * batch
        plain_goodput, plain_step, plain_per_token = evaluate(plain)
        # Latency mode compares time per token, but keeps a drafting plan that plain decoding's goodput can't match.
        gain = calibration * (plain_per_token / per_token if latency else goodput / plain_goodput) - 1
        if gain < min_gain and (not latency or plain_goodput >= min_goodput):
            hurdle = _held_back(_depth_span(depths), gain, min_gain, calibration)
            depths, goodput, step, per_token = plain, plain_goodput, plain_step, plain_per_token
    reason = _reason(depths, goodput, uniform_goodput, pinned is not None) + hurdle
    if pinned is None and any(depths) and calibration != 1.0:
        reason += f"; gain x{calibration:.2f} as drafting steps measured"
    if latency and pinned is None:
        reason += f"; {per_token:.1f} ms/token per sequence"
        if min_goodput > 0:
            reason += f", floor {min_goodput:.0f} tok/s " + ("met" if floor_met else "unreachable: best goodput plan")
    return DepthDecision(tuple(depths), goodput, step, per_token, uniform_goodput, reason)


def _depth_span(depths: Sequence[int]) -> str:
    """"depth 3" for one depth, "depths 1-4" for a spread."""
    lo, hi = min(depths), max(depths)
    return f"depth {lo}" if lo == hi else f"depths {lo}-{hi}"


def _held_back(what: str, gain: float, min_gain: float, calibration: float = 1.0) -> str:
    """The reason's note when plain decoding wins because drafting's predicted gain is under the hurdle."""
    measured = "" if calibration == 1.0 else f" (x{calibration:.2f} as drafting steps measured)"
    return f"; {what} would gain {gain:.0%}{measured}, under the {min_gain:.0%} hurdle"


def _reason(depths: Sequence[int], goodput: float, uniform_goodput: Sequence[float], pinned: bool) -> str:
    lo, hi = min(depths), max(depths)
    if lo == hi:
        head = f"{'pinned ' if pinned else ''}{_depth_span(depths)} ({goodput:.0f} tok/s) vs "
        others = ", ".join(f"{d}: {g:.0f}" for d, g in enumerate(uniform_goodput) if d != lo)
    else:
        head = f"{_depth_span(depths)} (mean {sum(depths) / len(depths):.1f}, {goodput:.0f} tok/s) vs uniform "
        others = ", ".join(f"{d}: {g:.0f}" for d, g in enumerate(uniform_goodput))
    return head + (others or "nothing else")


def choose_depths(alphas: Sequence[float], costs: CostModel, max_depth: int, *,
                  limits: Sequence[int] | None = None, uniform: bool = False,
                  offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                  calibration: float = 1.0) -> DepthDecision:
    """Throughput mode: per-sequence depths in [0, max_depth] maximising predicted goodput,

        sum_i expected_emitted(alpha_i, d_i, m_i) / (draft_ms(B, max d) [if max d > 0]
                                                     + target_ms(B, mean(1 + m * d) [+ padding])
                                                     + overhead_ms(B, max d)),

    where a plan with unequal depths pays `PADDING_SHARE` of the tokens padding every row to the widest.

    Exact when the offer rates m_i are equal (all 1 when not given), near-optimal otherwise (see `_search`).
    Depth 0 for everyone (plain decoding) is always a candidate. `limits` caps each sequence's depth (room
    left in the request or the caches); `uniform` restricts the search to one depth for the whole batch,
    for comparison. A plan predicted to beat plain decoding by less than `min_gain` (0.1: 10%) gives way to it
    (see `DRAFT_HURDLE`); the plain functions default to 0, the exact optimum. `calibration` scales drafting's
    predicted gain over plain decoding before that test: how far measured drafting steps beat their predictions,
    relative to plain ones (see `router.prediction_audit.Calibration`; 1: as predicted).
    """
    return _decide(alphas, costs, max_depth, limits, False, 0.0, uniform, None, offer_rates, min_gain, calibration)


def choose_depths_for_latency(alphas: Sequence[float], costs: CostModel, max_depth: int, min_goodput: float = 0.0,
                              *, limits: Sequence[int] | None = None, uniform: bool = False,
                              offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                              calibration: float = 1.0) -> DepthDecision:
    """Latency mode: depths minimising the predicted time per output token, averaged over the sequences,

        step_ms * mean_i(1 / expected_emitted(alpha_i, d_i)),

    among plans whose goodput is at least `min_goodput` tokens/s; when no plan reaches it, the
    throughput-maximising plan. (Each sequence's own time per token is step_ms / E_i; the step time over
    the *mean* E_i would just be batch / goodput, the throughput objective again. Averaging per-sequence
    times weighs poorly-accepting sequences more: this mode drafts less for a good sequence when that
    slows every other sequence's tokens, and more for poorer ones where a little depth lifts them.)

    Exact (with equal offer rates), like throughput mode, when the unconstrained optimum meets the floor.
    When the floor binds,
    it is checked on each (cap, total) candidate's latency-greedy and goodput-greedy allocations: the
    result then meets the floor whenever any plan can and is never slower per token than the
    goodput-optimal plan, but a floor-bound optimum that is neither greedy allocation can be missed.
    With `min_gain`, plain decoding wins unless drafting cuts the time per token by that share (and plain decoding
    meets the floor); `calibration` as in `choose_depths`.
    """
    return _decide(alphas, costs, max_depth, limits, True, min_goodput, uniform, None, offer_rates, min_gain,
                   calibration)


def pinned_decision(alphas: Sequence[float], costs: CostModel, depth: int, *, max_depth: int = 0,
                    limits: Sequence[int] | None = None, offer_rates: Sequence[float] | None = None
                    ) -> DepthDecision:
    """Every sequence at `depth` (capped by `limits`), with uniform predictions up to max(depth, max_depth)."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    return _decide(alphas, costs, max(depth, max_depth), limits, False, 0.0, True, depth, offer_rates)


# ---------------------------------------------------------------------------------------------------------
# The router's policy object
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fitted:
    costs: CostModel
    fleet_alpha: float
    fleet_offer_rate: float = 1.0


class DepthPolicy:
    """The router's speculation-depth policy: fitted costs and fleet acceptance in, depths per step out.

    `update` (off the hot path, about once a second) refits from telemetry; `choose` (every step) turns
    each sequence's (accepted, rejections) and (offers, misses) counts into acceptance and offer-rate
    estimates and picks depths.
    Thread-safe without locks: `update` builds a new immutable state and swaps one reference, which
    Python assigns atomically, so `choose` sees either the old state or the new one, never a mix.
    """

    def __init__(self, max_depth: int, mode: str = "throughput", min_goodput: float = 0.0,
                 prior_weight: float = 8.0, default_alpha: float = 0.5, *, uniform: bool = False,
                 pinned_depth: int | None = None, defaults: Mapping[str, CostFn] | None = None,
                 min_gain: float = 0.0) -> None:
        """
        max_depth: the deepest draft any sequence gets.
        mode: "throughput" (maximise goodput) or "latency" (minimise time per token above `min_goodput`).
        min_goodput: the latency mode's floor in tokens/s (0: none).
        prior_weight: how many observations the fleet-wide rate counts as in each sequence's estimate.
        default_alpha: the fleet-wide acceptance rate assumed before any has been measured.
        uniform: one depth for the whole batch instead of per sequence.
        pinned_depth: always this depth (as `--depth K`), still reporting predictions.
        defaults: cost functions per role used where there are no samples (DEFAULT_COSTS if None).
        min_gain: the predicted gain over plain decoding below which it decodes plainly (the router passes
            `DRAFT_HURDLE` unless told otherwise; 0: the exact optimum).
        """
        if max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {max_depth}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if min_goodput < 0:
            raise ValueError(f"min_goodput must be >= 0, got {min_goodput}")
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
        if not 0.0 <= default_alpha <= MAX_ALPHA:
            raise ValueError(f"default_alpha must be in [0, {MAX_ALPHA}], got {default_alpha}")
        if pinned_depth is not None and pinned_depth < 0:
            raise ValueError(f"pinned_depth must be >= 0, got {pinned_depth}")
        if min_gain < 0:
            raise ValueError(f"min_gain must be >= 0, got {min_gain}")
        self.max_depth = max_depth if pinned_depth is None else max(max_depth, pinned_depth)
        self.mode = mode
        self.min_goodput = min_goodput
        self.prior_weight = prior_weight
        self.default_alpha = default_alpha
        self.uniform = uniform
        self.pinned_depth = pinned_depth
        self.min_gain = min_gain
        self._defaults = dict(DEFAULT_COSTS if defaults is None else defaults)
        self._state = _Fitted(CostModel(self._defaults), default_alpha)

    @classmethod
    def fixed(cls, depth: int, *, defaults: Mapping[str, CostFn] | None = None) -> DepthPolicy:
        """A policy that always answers `depth` (the `--depth K` setting)."""
        return cls(max_depth=depth, pinned_depth=depth, defaults=defaults)

    @property
    def costs(self) -> CostModel:
        return self._state.costs

    @property
    def fleet_alpha(self) -> float:
        return self._state.fleet_alpha

    @property
    def fleet_offer_rate(self) -> float:
        return self._state.fleet_offer_rate

    def update(self, samples: Iterable[CostSample], fleet_accepted: int, fleet_rejections: int,
               fleet_offers: int = 0, fleet_misses: int = 0) -> None:
        """Refit from the recent window of cost samples (the whole window, each time) and the fleet's
        acceptance and offer counts. An empty window means the defaults; when telemetry cannot be read, skip
        the call and the last model stays."""
        costs = CostModel.fit(samples, self._defaults, max_tokens=max(33, self.max_depth + 1))
        alpha = acceptance_estimate(fleet_accepted, fleet_rejections, self.default_alpha, self.prior_weight)
        offer_rate = offer_estimate(fleet_offers, fleet_misses, 1.0, self.prior_weight)
        self._state = _Fitted(costs, alpha, offer_rate)  # one reference swap: atomic

    def alphas(self, per_sequence_counts: Sequence[tuple[int, int]]) -> list[float]:
        """Each sequence's acceptance estimate from its (accepted, rejections) counts."""
        return self._alphas(per_sequence_counts, self._state.fleet_alpha)

    def _alphas(self, per_sequence_counts: Sequence[tuple[int, int]], fleet_alpha: float) -> list[float]:
        return [acceptance_estimate(a, r, fleet_alpha, self.prior_weight) for a, r in per_sequence_counts]

    def offer_rates(self, offer_counts: Sequence[tuple[int, int]]) -> list[float]:
        """Each sequence's offer-rate estimate from its (offers, misses) counts."""
        return self._offer_rates(offer_counts, self._state.fleet_offer_rate, len(offer_counts))

    def _offer_rates(self, offer_counts: Sequence[tuple[int, int]] | None, fleet_rate: float, batch: int
                     ) -> list[float]:
        if offer_counts is None:
            return [fleet_rate] * batch
        if len(offer_counts) != batch:
            raise ValueError(f"offer_counts must have one entry per sequence ({batch}), got {len(offer_counts)}")
        return [offer_estimate(o, m, fleet_rate, self.prior_weight) for o, m in offer_counts]

    def choose(self, per_sequence_counts: Sequence[tuple[int, int]], limits: Sequence[int] | None = None,
               offer_counts: Sequence[tuple[int, int]] | None = None, calibration: float = 1.0) -> DepthDecision:
        """Depths for one step; `per_sequence_counts[i]` is sequence i's (accepted, rejections), `offer_counts[i]`
        its (offers, misses) (the fleet's offer rate for everyone when not given); `calibration` as in
        `choose_depths`."""
        state = self._state  # read once: one consistent model for the whole decision
        alphas = self._alphas(per_sequence_counts, state.fleet_alpha)
        rates = self._offer_rates(offer_counts, state.fleet_offer_rate, len(alphas))
        if self.pinned_depth is not None:
            return pinned_decision(alphas, state.costs, self.pinned_depth, max_depth=self.max_depth, limits=limits,
                                   offer_rates=rates)
        if self.mode == "latency":
            return choose_depths_for_latency(alphas, state.costs, self.max_depth, self.min_goodput,
                                             limits=limits, uniform=self.uniform, offer_rates=rates,
                                             min_gain=self.min_gain, calibration=calibration)
        return choose_depths(alphas, state.costs, self.max_depth, limits=limits, uniform=self.uniform,
                             offer_rates=rates, min_gain=self.min_gain, calibration=calibration)

    def choose_tree(self, per_sequence_counts: Sequence[tuple[int, int]],
                    candidates: Sequence[Sequence[TreePlan]],
                    offer_counts: Sequence[tuple[int, int]] | None = None, calibration: float = 1.0
                    ) -> TreeDecision:
        """The best of ``candidates`` (each one plan per sequence) for one step; see `choose_tree_plan`."""
        state = self._state
        alphas = self._alphas(per_sequence_counts, state.fleet_alpha)
        rates = self._offer_rates(offer_counts, state.fleet_offer_rate, len(alphas))
        return choose_tree_plan(alphas, state.costs, candidates, rates, self.min_gain, calibration)


# ---------------------------------------------------------------------------------------------------------
# Draft trees: the node budget per step
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreePlan:
    """What one sequence drafts in a step, as the policy sees it: ``nodes`` draft tokens in all, and the
    candidates recursive rejection tries at each level below the accepted path (``tries[l]``: the accepted
    node's children at depth l; a chain of depth d is nodes d, tries (1,) * d; nothing is nodes 0, tries ())."""

    nodes: int
    tries: tuple[int, ...]

    @property
    def levels(self) -> int:
        return len(self.tries)


def tree_expected_emitted(alpha: float, tries: Sequence[int]) -> float:
    """Expected tokens a step emits with a tree: 1 + sum_L prod_{l <= L} (1 - (1 - alpha)^tries[l]).

    An approximation: each of the b candidates at a level is taken to be accepted independently with the
    sequence's per-token rate alpha, so the level is passed with probability 1 - (1 - alpha)^b. It ignores
    that siblings drawn without replacement are less likely than the first (optimistic) and that recursive
    rejection tries later siblings against the residual, which raises their chance (pessimistic). For a
    chain (every b = 1) it is `expected_emitted` exactly.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    total, reach = 1.0, 1.0
    for b in tries:
        reach *= 1.0 - (1.0 - alpha) ** b
        total += reach
    return total


@dataclass(frozen=True)
class TreeDecision:
    """The plan chosen for one step (``index`` into the candidates) and its predictions."""

    index: int
    goodput: float
    step_ms: float
    reason: str


def choose_tree_plan(alphas: Sequence[float], costs: CostModel, candidates: Sequence[Sequence[TreePlan]],
                     offer_rates: Sequence[float] | None = None, min_gain: float = 0.0,
                     calibration: float = 1.0) -> TreeDecision:
    """The candidate (one `TreePlan` per sequence; the batch drafts one shape, fitted to each sequence's
    room) maximising predicted goodput, with offer rates m_i (all 1 when not given):

        sum_i (1 + m_i (tree_expected_emitted(alpha_i, tries_i) - 1)) / (draft_ms(B, max levels) [if any] +
                                                                    target_ms(B, 1 + mean m * nodes [+ padding]) +
                                                                    overhead_ms(B, max levels)).

    The verify cost of a tree is that of a chain with as many tokens (one forward over every node), so
    at small batch, where extra tokens are nearly free, wide trees win, and at large batch chains or
    plain decoding. Ties go to the earlier candidate (list cheaper ones first). A candidate that drafts nothing
    wins unless the best beats it by `min_gain` (see `DRAFT_HURDLE`), its gain first scaled by `calibration` (as
    in `choose_depths`).
    """
    if not candidates:
        raise ValueError("need at least one candidate plan")
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    if not calibration > 0:
        raise ValueError(f"calibration must be > 0, got {calibration}")
    batch = len(alphas)
    rates = _checked_offer_rates(offer_rates, batch)
    best: TreeDecision | None = None
    scores, steps = [], []
    for index, plans in enumerate(candidates):
        if len(plans) != batch:
            raise ValueError(f"candidate {index} has {len(plans)} plans for {batch} sequences")
        if batch == 0:
            return TreeDecision(index, 0.0, 0.0, "no sequences")
        levels = max(p.levels for p in plans)
        draft = costs.predict("draft", batch, float(levels)) if levels else 0.0
        verified = verified_drafts(sum(m * p.nodes for m, p in zip(rates, plans, strict=True)),
                                   max(p.nodes for p in plans) * sum(rates))
        step = (draft + costs.predict("target", batch, 1 + verified / batch)
                + max(MIN_STEP_MS, costs.predict("overhead", batch, 1.0 + levels)))
        emitted = sum(1 + m * (tree_expected_emitted(a, p.tries) - 1)
                      for a, m, p in zip(alphas, rates, plans, strict=True))
        goodput = 1000.0 * emitted / step
        scores.append(goodput)
        steps.append(step)
        if best is None or goodput > best.goodput * (1 + 1e-12):
            best = TreeDecision(index, goodput, step, "")
    assert best is not None
    hurdle = ""
    plain = next((i for i, plans in enumerate(candidates) if not any(p.nodes for p in plans)), None)
    if plain is not None and best.index != plain and calibration * best.goodput < (1 + min_gain) * scores[plain]:
        hurdle = _held_back("the best", calibration * best.goodput / scores[plain] - 1, min_gain, calibration)
        best = TreeDecision(plain, scores[plain], steps[plain], "")
    mean_nodes = sum(p.nodes for p in candidates[best.index]) / batch
    others = ", ".join(f"{sum(p.nodes for p in plans) / batch:.0f}: {g:.0f}"
                       for plans, g in zip(candidates, scores, strict=True) if plans is not candidates[best.index])
    reason = f"tree budget {mean_nodes:.1f} nodes ({best.goodput:.0f} tok/s) vs {others or 'nothing else'}{hurdle}"
    if best.index != plain and calibration != 1.0:
        reason += f"; gain x{calibration:.2f} as drafting steps measured"
    return TreeDecision(best.index, best.goodput, best.step_ms, reason)
