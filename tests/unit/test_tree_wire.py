"""Draft trees between the services: shapes and budgets, the wire conversion, and the target's tree
verification in process (drafter -> verifier -> keep_path) against plain greedy decoding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from specfleet.drafters import DraftRequest, NgramDrafter
from specfleet.drafters.model import ModelDrafter
from specfleet.engine import ModelRunner
from specfleet.policy import (
    AnalyticCost,
    CostModel,
    DepthPolicy,
    TreePlan,
    choose_tree_plan,
    expected_emitted,
    tree_expected_emitted,
)
from specfleet.protos import draft_pb2
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import (
    ROOT_PARENT,
    TreeShape,
    TryCounts,
    chain_shape,
    count_tries,
    parse_branching,
    try_outcomes,
)
from specfleet.wire import is_chain, tree_shape_from_proto, tree_shape_to_proto, validate_parents
from target_service.verifier import Verifier, VerifyItem

GREEDY = SamplingParams()


def test_shapes_wire_and_sampling_params_load_without_torch() -> None:
    """The router imports these; in a fresh interpreter none of them may pull torch in (through the
    `specfleet.trees` package or otherwise)."""
    code = ("import sys, specfleet.trees.shapes, specfleet.wire, specfleet.sampling_params; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_root_parent_matches_the_wire() -> None:
    assert ROOT_PARENT == -1  # draft.proto and target.proto give the root's children parent -1
    assert validate_parents([ROOT_PARENT, 0, ROOT_PARENT], 3, "t") is None and is_chain([ROOT_PARENT, 0])


def test_shapes_fit_node_and_depth_budgets() -> None:
    shape = TreeShape("rsd-c", (2, 2, 1))
    assert shape.nodes == 10 and shape.levels == 3 and not shape.is_chain
    assert shape.fit(10, 8) == shape
    assert shape.fit(5, 8) == TreeShape("rsd-c", (2, 1))  # narrows the deepest levels first
    assert shape.fit(16, 1) == TreeShape("rsd-c", (2,))
    assert shape.fit(0, 3) is None and shape.fit(3, 0) is None
    beam = TreeShape("rsd-s", beam_width=3, depth=8)
    assert beam.fit(16, 8) == TreeShape("rsd-s", beam_width=3, depth=5)
    assert beam.fit(2, 8) == TreeShape("rsd-s", beam_width=2, depth=1)
    assert chain_shape(3).is_chain and chain_shape(3).nodes == 3
    assert parse_branching("2,2,1") == (2, 2, 1)
    with pytest.raises(ValueError, match="branching"):
        parse_branching("2,0")


def test_tree_shape_round_trips_the_wire() -> None:
    for shape in (TreeShape("rsd-c", (3, 2)), TreeShape("rsd-s", beam_width=4, depth=5), TreeShape("duo", (4, 1))):
        msg = tree_shape_to_proto(shape, max_nodes=12)
        assert tree_shape_from_proto(draft_pb2.TreeShape.FromString(msg.SerializeToString()), 5) == (shape, 12)
    with pytest.raises(ValueError, match="tree.method"):
        tree_shape_from_proto(draft_pb2.TreeShape(), 3)
    validate_parents([-1, 0, -1, 2], 4, "t")
    with pytest.raises(ValueError, match="earlier node"):
        validate_parents([-1, 1], 2, "t")
    with pytest.raises(ValueError, match="2 nodes but 1 parents"):
        validate_parents([-1], 2, "t")
    assert is_chain([-1, 0, 1]) and not is_chain([-1, -1])


def test_try_outcomes_walk_siblings_in_order_and_the_last_nodes_children() -> None:
    # root children 0, 1; node 1 has child 4; the path took the second root child, then node 4, and stopped
    assert list(try_outcomes([-1, -1, 0, 0, 1], [1, 4])) == [(0, 0, False), (0, 1, True), (1, 0, True)]
    # a chain of three that accepted one draft: the second was tried and rejected, the third never tried
    assert list(try_outcomes([-1, 0, 1], [0])) == [(0, 0, True), (1, 0, False)]


def test_count_tries_splits_first_tries_from_later_siblings() -> None:
    parents = [-1, -1, 0, 0, 1]  # root -> 0, 1; 0 -> 2, 3; 1 -> 4
    assert count_tries(parents, []) == TryCounts(1, 0, 1)  # both of the root's children rejected
    assert count_tries(parents, [1, 4]) == TryCounts(1, 1, 1)  # node 0 rejected, 1 accepted after it; 4 a leaf
    assert count_tries(parents, [0, 3]) == TryCounts(1, 1, 1)  # node 2 rejected before 3
    assert count_tries(parents, [0]) == TryCounts(1, 0, 1)  # both of node 0's children rejected
    assert count_tries([-1, 0, 1], [0]) == TryCounts(1, 0, 0)  # a chain stopped short
    assert count_tries([-1, 0, 1], [0, 1, 2]) == TryCounts(0, 0, 0)



def test_later_siblings_count_at_their_own_rate() -> None:
    # level 1: the first try 0.6, else the second 0.3: 1 - 0.4 * 0.7; level 2 then a single try at 0.6
    assert tree_expected_emitted(0.6, (2, 1), later_sibling_alpha=0.3) == pytest.approx(1 + 0.72 + 0.72 * 0.6)
    assert tree_expected_emitted(0.6, (3, 2)) == pytest.approx(1 + (1 - 0.4 ** 3) * (1 + (1 - 0.4 ** 2)))
    assert tree_expected_emitted(0.6, (1, 1), later_sibling_alpha=0.0) == pytest.approx(expected_emitted(0.6, 2))
    with pytest.raises(ValueError, match="later_sibling_alpha"):
        tree_expected_emitted(0.6, (2,), later_sibling_alpha=1.5)


def test_policy_measures_later_siblings_and_prefers_the_chain_when_they_are_rarely_accepted() -> None:
    flat = {"draft": AnalyticCost(fixed_ms=1.0), "target": AnalyticCost(fixed_ms=20.0), "overhead": AnalyticCost(2.0)}
    two_wide, chain_of_two = [TreePlan(2, (2,))], [TreePlan(2, (1, 1))]
    policy = DepthPolicy(max_depth=4, defaults=flat, prior_weight=8.0)
    policy.update([], fleet_accepted=300, fleet_rejections=700)  # first tries accepted 30% of the time
    assert policy.choose_tree([(0, 0)], [chain_of_two, two_wide]).index == 1  # siblings assumed as likely: wide
    policy.update([], fleet_accepted=300, fleet_rejections=700, fleet_later_siblings_accepted=5,
                  fleet_later_siblings_rejected=95)
    assert policy.choose_tree([(0, 0)], [chain_of_two, two_wide]).index == 0  # measured at 5%: the chain
    # A sequence's own siblings count too, shrunk toward the fleet's rate.
    assert policy.choose_tree([(0, 0)], [chain_of_two, two_wide], later_sibling_counts=[(400, 100)]).index == 1


def test_tree_budget_wider_at_small_batch_narrower_at_large() -> None:
    assert tree_expected_emitted(0.6, (1, 1, 1)) == pytest.approx(expected_emitted(0.6, 3))
    assert tree_expected_emitted(0.6, (2, 2)) > tree_expected_emitted(0.6, (1, 1))
    candidates_for = [[], [chain_shape(d) for d in range(1, 5)], [TreeShape("rsd-c", (2, 2, 1)),
                                                                    TreeShape("rsd-c", (4, 2, 2))]]
    shapes = [None, *candidates_for[1], *candidates_for[2]]

    def chosen(batch: int, costs: CostModel) -> TreeShape | None:
        plans = [[TreePlan(0, ()) if s is None else TreePlan(s.nodes, s.level_tries())] * batch for s in shapes]
        return shapes[choose_tree_plan([0.5] * batch, costs, plans).index]

    small, large = chosen(1, CostModel()), chosen(64, CostModel())
    assert small is not None and not small.is_chain  # verify tokens nearly free: a tree
    assert large is None or large.nodes < small.nodes  # every token costs: less or nothing



def _decode(drafter, verifier: Verifier, prompts: dict[str, list[int]], shape: TreeShape, sampling: SamplingParams,
            new_tokens: int, seed: int = 0) -> dict[str, list[int]]:
    """The router's loop in miniature: propose a tree, verify it, commit, with the sessions' rollbacks."""
    tokens = {name: list(p) for name, p in prompts.items()}
    draft_cached = dict.fromkeys(prompts, 0)
    target_cached = dict.fromkeys(prompts, 0)
    while any(len(tokens[n]) < len(prompts[n]) + new_tokens for n in prompts):
        live = [n for n in prompts if len(tokens[n]) < len(prompts[n]) + new_tokens]
        proposals = drafter.propose([DraftRequest(n, draft_cached[n], tokens[n][draft_cached[n]:], shape.levels,
                                                  sampling, seed, tree=shape) for n in live])
        verdicts = verifier.verify([VerifyItem(n, target_cached[n], tokens[n][target_cached[n]:], p.tokens,
                                               p.draft_top_k, sampling, seed, p.parents)
                                    for n, p in zip(live, proposals, strict=True)])
        for n, p, v in zip(live, proposals, verdicts, strict=True):
            assert list(v.accepted_nodes) == [] or p.parents[v.accepted_nodes[0]] == -1
            draft_cached[n] = min(p.cached_len, len(tokens[n]) + v.accepted)
            target_cached[n] = v.cached_len
            assert v.cached_len == len(tokens[n]) + v.accepted
            tokens[n] += list(v.tokens)
    return {n: t[len(prompts[n]):][:new_tokens] for n, t in tokens.items()}


PROMPTS = {"a": [3, 14, 15, 92, 65, 3, 14], "b": [35, 89, 79, 32, 38, 46, 26, 43, 38, 32]}


@pytest.mark.parametrize("shape", [TreeShape("rsd-c", (2, 2, 1)), TreeShape("rsd-s", beam_width=3, depth=3),
                                   TreeShape("duo", (4, 1, 1))])
def test_greedy_tree_steps_equal_greedy_decoding(tiny_model: Path, shape: TreeShape) -> None:
    """The tiny model drafting for itself (its trees' first paths are always right, the other nodes
    wrong), and the ngram drafter (point-mass tries from prompt lookup, mostly wrong): both must give
    the target's greedy tokens, with the sessions rolled back and the accepted paths kept each step."""
    reference_model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = {n: reference_model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):]
                     .tolist() for n, p in PROMPTS.items()}
    for drafter in (ModelDrafter(ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=128)),
                    NgramDrafter(min_ngram=1)):
        verifier = Verifier(ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=128))
        assert _decode(drafter, verifier, PROMPTS, shape, GREEDY, 12) == reference


def test_sampled_tree_steps_are_reproducible(tiny_model: Path) -> None:
    sampling = SamplingParams(temperature=1.0)
    outs = []
    for _ in range(2):
        drafter = ModelDrafter(ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=128), top_k_pairs=16)
        verifier = Verifier(ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=128))
        outs.append(_decode(drafter, verifier, PROMPTS, TreeShape("rsd-c", (2, 2)), sampling, 10, seed=3))
    assert outs[0] == outs[1]
