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

The parts, each a plain module:
- `costs`: the cost model, fitted from telemetry (`CostModel`, `CostSample`; time as a function of batch size,
  tokens per sequence and the batch's mean KV length, `ContextCost`), and `price_step`, which prices a step of
  depth plans and tree budgets alike;
- `acceptance`: per-sequence acceptance and offer rates, and the tokens a step is expected to emit;
- `hurdle`: the margin a drafting plan must beat plain decoding by (`DRAFT_HURDLE`, `apply_hurdle`);
- `depths`: a plan's predicted goodput and the searches for the best depths (`choose_depths`), each a function
  returning a plan;
- `tree_budget`: the same for draft trees, a node budget per step (`choose_tree_plan`);
- `catch_up`: whether a drafter's catch-up on the tokens of a sequence it lacks (its prompt, the first time) pays
  over the rest of the request (`price_catch_up`);
- `depth_policy`: `DepthPolicy`, which holds the fitted state for the router.

Decisions (`DepthDecision`, `TreeDecision`) carry the predictions and what their `describe()` needs to write the
reason; the searches write no text.
"""

from specfleet.policy.acceptance import (
    MAX_ALPHA,
    MIN_OFFER_RATE,
    acceptance_estimate,
    expected_emitted,
    offer_estimate,
    tree_expected_emitted,
)
from specfleet.policy.catch_up import CatchUp, price_catch_up
from specfleet.policy.costs import (
    DEFAULT_COSTS,
    MIN_CELL_SAMPLES,
    MIN_STEP_MS,
    PADDING_SHARE,
    PREFILL_ROLE,
    REFERENCE_CONTEXT,
    ROLES,
    TOKEN_BUCKET,
    AheadOverlap,
    AnalyticCost,
    ContextCost,
    CostFn,
    CostModel,
    CostSample,
    CostTable,
    StepCosts,
    context_bucket,
    kv_passes,
    price_step,
    verified_drafts,
)
from specfleet.policy.depth_policy import MODES, DepthPolicy
from specfleet.policy.depths import (
    DepthDecision,
    choose_depths,
    choose_depths_for_latency,
    pinned_decision,
    plan_goodput,
    plan_step_ms,
    plan_time_per_token,
)
from specfleet.policy.hurdle import DRAFT_HURDLE, HeldBack, apply_hurdle
from specfleet.policy.tree_budget import TreeDecision, TreePlan, choose_tree_plan

__all__ = [
    "DEFAULT_COSTS", "DRAFT_HURDLE", "MAX_ALPHA", "MIN_CELL_SAMPLES", "MIN_OFFER_RATE", "MIN_STEP_MS", "MODES",
    "PADDING_SHARE", "PREFILL_ROLE", "REFERENCE_CONTEXT", "ROLES", "TOKEN_BUCKET", "AheadOverlap", "AnalyticCost",
    "CatchUp", "ContextCost", "CostFn", "CostModel", "CostSample", "CostTable", "DepthDecision", "DepthPolicy",
    "HeldBack", "StepCosts", "TreeDecision", "TreePlan", "acceptance_estimate", "apply_hurdle", "choose_depths",
    "choose_depths_for_latency", "choose_tree_plan", "context_bucket", "expected_emitted", "kv_passes",
    "offer_estimate", "pinned_decision", "plan_goodput", "plan_step_ms", "plan_time_per_token", "price_catch_up",
    "price_step", "tree_expected_emitted", "verified_drafts",
]
