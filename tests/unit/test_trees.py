"""Tests for specfleet.trees and tree verification: layout, sampling without replacement, losslessness.

The statistical harness runs whole speculative steps with draft trees on toy Markov models over 6
tokens and compares the joint histogram of the first three emitted tokens with the exact target
joint by a chi-square test; the same harness must reject deliberately wrong trees.

Thresholds: seeds are fixed, so every test is deterministic. Under a correct implementation the
p-value is uniform over seeds (checked over 8 seeds per lossless case when this was written), so a
test with threshold ALPHA fails for a given seed with probability ALPHA. There are 19 chi-square
tests with ALPHA = 2e-5 (16 lossless cases: 8 tree shapes x 2 models; Gumbel-Top-k order; stochastic
beam search order; point-mass candidates) and 6 inclusion-probability z-tests with |z| < 5 (5.7e-7
each, two-sided), so the chance that a correct implementation fails any of them for a fresh choice of
seeds is at most 19 * 2e-5 + 6 * 5.7e-7 < 4e-4 < 1e-3 (union bound). The wrong trees give p-values
below 1e-70 at these trial counts, far below WRONG = 1e-12.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from chi_square import chi_square_pvalue

from specfleet.sampling import processed_probs
from specfleet.trees.build import build_tree_rsd_c, build_tree_rsd_s
from specfleet.trees.duo import build_tree_duo
from specfleet.trees.structure import (
    DraftTree,
    point_mass_tree,
    sibling_links,
    tree_attention_mask,
    tree_depths,
    tree_from_paths,
    tree_position_ids,
)
from specfleet.trees.without_replacement import gumbel_top_k, without_replacement_probs
from specfleet.verify import verify_chain, verify_tree

VOCAB = 6
BOS = VOCAB
TRIALS = 30_000
EMITTED = 3
ALPHA = 2e-5
WRONG = 1e-12


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny ([trials, 6]); on a busy machine intra-op threads only add waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Layout: masks, positions, depths.

# root ─┬─ 0 ─┬─ 2 ── 5
#       │     └─ 3
#       └─ 1 ── 4
PARENTS = torch.tensor([-1, -1, 0, 0, 1, 2])


def test_tree_attention_mask_is_ancestor_or_self() -> None:
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],
        [0, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree_attention_mask(PARENTS), want)
    # Batched: every row on its own.
    batched = tree_attention_mask(torch.stack([PARENTS, torch.tensor([-1, 0, 1, 2, 3, 4])]))
    assert torch.equal(batched[0], want)
    assert torch.equal(batched[1], torch.ones(6, 6, dtype=torch.bool).tril())  # a chain is causal


def test_depths_and_position_ids() -> None:
    depths = tree_depths(PARENTS)
    assert depths.tolist() == [0, 0, 1, 1, 1, 2]
    assert tree_position_ids(depths, 10).tolist() == [10, 10, 11, 11, 11, 12]
    batched = tree_position_ids(torch.stack([depths, depths]), torch.tensor([3, 7]))
    assert batched.tolist() == [[3, 3, 4, 4, 4, 5], [7, 7, 8, 8, 8, 9]]


def test_draft_tree_checks_structure() -> None:
    tokens = torch.zeros(1, 3, dtype=torch.long)
    probs = torch.zeros(1, 3, VOCAB)
    with pytest.raises(ValueError, match="earlier node"):
        DraftTree(tokens, torch.tensor([[-1, 2, 0]]), torch.tensor([[0, 1, 1]]), probs, torch.tensor([3]))
    with pytest.raises(ValueError, match="depths"):
        DraftTree(tokens, torch.tensor([[-1, 0, 0]]), torch.tensor([[0, 1, 2]]), probs, torch.tensor([3]))
    with pytest.raises(ValueError, match="draft_probs"):
        DraftTree(tokens, torch.tensor([[-1, 0, 0]]), torch.tensor([[0, 1, 1]]), probs[:, :2], torch.tensor([3]))


def test_sibling_links_follow_drawn_order() -> None:
    tree = point_mass_tree(PARENTS[None] * 0 + 1, PARENTS[None], torch.tensor([6]), VOCAB)
    first_child, next_sibling = sibling_links(tree)
    assert first_child.tolist() == [[0, 2, 4, 5, -1, -1, -1]]  # root, then nodes 0..5
    assert next_sibling.tolist() == [[1, -1, 3, -1, -1, -1]]


def test_tree_from_paths_merges_prefixes_in_order() -> None:
    tree = tree_from_paths([[4, 2, 3], [4, 5], [1], [4, 2, 0]], VOCAB)
    assert tree.tokens.tolist() == [[4, 2, 3, 5, 1, 0]]
    assert tree.parents.tolist() == [[-1, 0, 1, 0, -1, 1]]
    assert tree.depths.tolist() == [[0, 1, 2, 1, 0, 2]]
    assert torch.equal(tree.draft_probs[0].argmax(-1), tree.tokens[0])
    assert tree.path_tokens(0, 5) == [4, 2, 0]


# ---------------------------------------------------------------------------------------------------
# Sampling without replacement.


def test_without_replacement_probs_remove_earlier_siblings() -> None:
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    got = without_replacement_probs(q, torch.tensor([[3, 1, -1]]))
    want = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [1 / 6, 2 / 6, 3 / 6, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(got, want)


def test_gumbel_top_k_skips_impossible_tokens() -> None:
    logprobs = torch.tensor([[0.0, -torch.inf, -torch.inf, -1.0]]).expand(100, -1)
    drawn = gumbel_top_k(logprobs, 3, torch.rand(100, 4, generator=torch.Generator().manual_seed(0)))
    assert (drawn.tokens[:, 2] == -1).all()
    assert set(drawn.tokens[:, :2].flatten().tolist()) == {0, 3}
    assert (drawn.perturbed[:, 0] >= drawn.perturbed[:, 1]).all()


def _ordered_without_replacement(q: torch.Tensor, k: int) -> dict[tuple[int, ...], float]:
    """Exact probability of every ordered k-tuple drawn without replacement from q (by enumeration)."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(k):
        grown: dict[tuple[int, ...], float] = {}
        for prefix, prob in out.items():
            left = 1.0 - sum(float(q[t]) for t in prefix)
            for t in range(len(q)):
                if t not in prefix and q[t] > 0:
                    grown[prefix + (t,)] = prob * float(q[t]) / left
        out = grown
    return out


def test_gumbel_top_k_samples_without_replacement_in_order() -> None:
    q = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.2, 0.1])
    n, k = 40_000, 3
    uniforms = torch.rand(n, len(q), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    drawn = gumbel_top_k(q.log()[None].expand(n, -1), k, uniforms).tokens  # [n, k]
    assert (drawn >= 0).all() and (q[drawn] > 0).all()
    assert (drawn[:, 0] != drawn[:, 1]).all() and (drawn[:, 0] != drawn[:, 2]).all()
    assert (drawn[:, 1] != drawn[:, 2]).all()

    exact = _ordered_without_replacement(q, k)
    codes = (drawn * torch.tensor([36, 6, 1])).sum(-1)
    observed = torch.bincount(codes, minlength=216)
    expected = torch.zeros(216, dtype=torch.float64)
    for (a, b, c), prob in exact.items():
        expected[36 * a + 6 * b + c] = prob * n
    assert chi_square_pvalue(observed, expected) > ALPHA

    # Inclusion probabilities, which the order statistic above implies, checked on their own.
    for token in range(len(q)):
        inclusion = sum(prob for tup, prob in exact.items() if token in tup)
        hits = float((drawn == token).any(-1).double().sum())
        spread = max((n * inclusion * (1 - inclusion)) ** 0.5, 1e-9)
        assert abs(hits - n * inclusion) / spread < 5.0, (token, hits, n * inclusion)


# ---------------------------------------------------------------------------------------------------
# Toy models: first-order Markov chains, row t the next-token distribution after token t, row BOS the first.


@dataclass
class ToyModels:
    target: torch.Tensor  # [VOCAB + 1, VOCAB] target_probs of the next token given the previous one
    draft: torch.Tensor  # [VOCAB + 1, VOCAB] draft_probs of the next token given the previous one

    def target_joint(self) -> torch.Tensor:  # [VOCAB] * EMITTED
        """Exact target probability of the first EMITTED tokens."""
        joint = self.target[BOS].double()
        for _ in range(EMITTED - 1):
            joint = joint[..., None] * self.target[:VOCAB].double().reshape(*([1] * (joint.dim() - 1)), VOCAB, VOCAB)
        return joint

    def draft_logprobs(self, last: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The draft model as tree construction calls it, for trials whose last committed token is `last`."""
        def logprobs(rows: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
            previous = paths[:, -1] if paths.shape[1] else last[rows]
            return self.draft[previous].log()
        return logprobs


def _params(n: int, temperature: float, top_p: float = 1.0) -> tuple[torch.Tensor, ...]:
    return torch.full((n,), temperature), torch.zeros(n, dtype=torch.long), torch.full((n,), top_p)


def _toy_logits(seed: int) -> torch.Tensor:
    return 1.5 * torch.randn(VOCAB + 1, VOCAB, generator=torch.Generator().manual_seed(seed))


def _models(top_p: float) -> ToyModels:
    """Correlated draft and target at temperature 1; with top-p < 1 both rule tokens out."""
    target_logits = _toy_logits(50)
    draft_logits = 0.6 * target_logits + _toy_logits(51)
    return ToyModels(processed_probs(target_logits, *_params(VOCAB + 1, 1.0, top_p)),
                     processed_probs(draft_logits, *_params(VOCAB + 1, 1.0, top_p)))


MODELS = {"temperature_one": lambda: _models(1.0), "top_p": lambda: _models(0.8)}

TreeMaker = Callable[[ToyModels, torch.Tensor, torch.Generator], DraftTree]


def _rsd_c(*branching: int) -> TreeMaker:
    return lambda models, last, gen: build_tree_rsd_c(models.draft_logprobs(last), len(last), branching, gen)


def _iid(*branching: int) -> TreeMaker:
    return lambda models, last, gen: build_tree_rsd_c(models.draft_logprobs(last), len(last), branching, gen,
                                                      replacement=True)


def _duo(max_branches: int, levels: int) -> TreeMaker:
    return lambda models, last, gen: build_tree_duo(models.draft_logprobs(last), len(last), max_branches, levels, gen)


def _rsd_s(beam_width: int, depth: int) -> TreeMaker:
    return lambda models, last, gen: build_tree_rsd_s(models.draft_logprobs(last), len(last), beam_width, depth, gen)


# Deterministic candidates, as an n-gram drafter offers them: after token t, CANDIDATES[t] in this order.
CANDIDATES = torch.stack([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(60 + t))[:3]
                          for t in range(VOCAB + 1)])  # [VOCAB + 1, 3]


def _ngram_tree(models: ToyModels, last: torch.Tensor, gen: torch.Generator) -> DraftTree:
    """Three deterministic candidates at the root, two below the first and one below the second."""
    level0 = CANDIDATES[last]  # [n, 3]
    below_first = CANDIDATES[level0[:, 0], :2]
    below_second = CANDIDATES[level0[:, 1], :1]
    tokens = torch.cat([level0, below_first, below_second], dim=1)  # [n, 6]
    parents = torch.tensor([-1, -1, -1, 0, 0, 1]).expand(len(last), -1)
    return point_mass_tree(tokens, parents, torch.full((len(last),), 6), VOCAB)


TREES: dict[str, TreeMaker] = {
    "rsd_c_2x2": _rsd_c(2, 2),
    "rsd_c_3x1x1": _rsd_c(3, 1, 1),
    "rsd_c_chain": _rsd_c(1, 1),
    "rsd_c_4": _rsd_c(4),
    "rsd_s_2x2": _rsd_s(2, 2),
    "rsd_s_3x3": _rsd_s(3, 3),
    "rsd_s_4x2": _rsd_s(4, 2),
    "ngram": _ngram_tree,
    "iid_3x2": _iid(3, 2),
    "duo_4x2": _duo(4, 2),
}


def _first_tokens(models: ToyModels, make_tree: TreeMaker, seed: int) -> torch.Tensor:  # [TRIALS, EMITTED]
    """Speculative steps with trees until every trial has emitted EMITTED tokens; returns those."""
    generator = torch.Generator().manual_seed(seed)
    emitted = torch.full((TRIALS, EMITTED), -1, dtype=torch.long)
    counts = torch.zeros(TRIALS, dtype=torch.long)
    last = torch.full((TRIALS,), BOS)
    rows = torch.arange(TRIALS)
    while (counts < EMITTED).any():  # every step emits at least one token
        tree = make_tree(models, last, generator)
        node_targets = models.target[tree.tokens.clamp(min=0)]  # [TRIALS, nodes, VOCAB]
        target_probs = torch.cat([models.target[last][:, None], node_targets], dim=1)
        uniforms = torch.rand(TRIALS, tree.max_nodes + 1, generator=generator, dtype=torch.float64)
        result = verify_tree(target_probs, tree, uniforms)
        for k in range(result.output_tokens.shape[1]):
            slot = counts + k
            write = (k <= result.accepted_counts) & (slot < EMITTED)
            emitted[rows[write], slot[write]] = result.output_tokens[write, k]
        last = result.output_tokens[rows, result.accepted_counts]
        counts = counts + result.accepted_counts + 1
    return emitted


def _pvalue(tokens: torch.Tensor, joint: torch.Tensor) -> float:
    codes = (tokens * torch.tensor([VOCAB ** (EMITTED - 1 - i) for i in range(EMITTED)])).sum(-1)
    observed = torch.bincount(codes, minlength=VOCAB ** EMITTED)
    return chi_square_pvalue(observed, joint.flatten() * tokens.shape[0])


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("tree_name", TREES)
def test_tree_verification_is_lossless(tree_name: str, model_name: str) -> None:
    models = MODELS[model_name]()
    tokens = _first_tokens(models, TREES[tree_name], seed=100)
    assert (tokens >= 0).all()
    assert _pvalue(tokens, models.target_joint()) > ALPHA


def _siblings_share_first_q(make_tree: TreeMaker) -> TreeMaker:
    """WRONG: every sibling keeps the undepleted q of its parent (earlier siblings not removed)."""
    def make(models: ToyModels, last: torch.Tensor, gen: torch.Generator) -> DraftTree:
        tree = make_tree(models, last, gen)
        first_child, _ = sibling_links(tree)
        first_sibling = first_child.gather(1, tree.parents + 1).clamp(min=0)  # [batch, nodes]
        probs = tree.draft_probs.gather(1, first_sibling[..., None].expand(-1, -1, tree.vocab_size))
        return DraftTree(tree.tokens, tree.parents, tree.depths, probs * tree.valid[..., None], tree.num_nodes)
    return make


def _candidates_as_uniform_draws(make_tree: TreeMaker) -> TreeMaker:
    """WRONG: treats deterministic candidates as drawn without replacement from the uniform over them."""
    def make(models: ToyModels, last: torch.Tensor, gen: torch.Generator) -> DraftTree:
        tree = make_tree(models, last, gen)
        _, next_sibling = sibling_links(tree)
        probs = torch.zeros_like(tree.draft_probs)
        rows = torch.arange(tree.batch)
        for node in range(tree.max_nodes):
            later = torch.full_like(rows, node)  # this candidate and the ones tried after it
            while (later >= 0).any():
                live = later >= 0
                probs[rows[live], node, tree.tokens[rows[live], later[live]]] = 1.0
                later = torch.where(live, next_sibling[rows, later.clamp(min=0)], later)
        probs = probs / probs.sum(-1, keepdim=True)
        return DraftTree(tree.tokens, tree.parents, tree.depths, probs, tree.num_nodes)
    return make


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize(("tree_name", "wrong"), [
    ("rsd_c_2x2", _siblings_share_first_q),
    ("rsd_c_4", _siblings_share_first_q),
    ("rsd_s_3x3", _siblings_share_first_q),
    ("ngram", _candidates_as_uniform_draws),
])
def test_harness_catches_wrong_trees(tree_name: str, wrong: Callable[[TreeMaker], TreeMaker], model_name: str
                                     ) -> None:
    models = MODELS[model_name]()
    tokens = _first_tokens(models, wrong(TREES[tree_name]), seed=100)
    assert _pvalue(tokens, models.target_joint()) < WRONG


def test_point_mass_candidates_accept_with_residual_probability() -> None:
    """Exact: with candidates a, b at the root, a is emitted with p(a), b with p(b), and anything else
    is sampled from p without a and b; checked by the histogram of the first emitted token."""
    p = torch.tensor([0.1, 0.3, 0.05, 0.25, 0.2, 0.1])
    n = 40_000
    tree = point_mass_tree(torch.tensor([[1, 3]]).expand(n, -1), torch.tensor([[-1, -1]]).expand(n, -1),
                           torch.full((n,), 2), VOCAB)
    target_probs = p.expand(n, 3, -1)
    uniforms = torch.rand(n, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    result = verify_tree(target_probs, tree, uniforms)
    first = result.output_tokens[:, 0]
    assert chi_square_pvalue(torch.bincount(first, minlength=VOCAB), p.double() * n) > ALPHA
    # Accepted exactly when the first emitted token is a candidate.
    assert torch.equal(result.accepted_counts == 1, (first == 1) | (first == 3))


# ---------------------------------------------------------------------------------------------------
# Construction.


def test_rsd_c_structure_and_sibling_probs() -> None:
    models = MODELS["temperature_one"]()
    last = torch.full((50,), BOS)
    calls: list[tuple[int, int]] = []
    draft = models.draft_logprobs(last)

    def recording(rows: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(paths.shape))
        return draft(rows, paths)

    tree = build_tree_rsd_c(recording, 50, [3, 2], torch.Generator().manual_seed(0))
    assert calls == [(50, 0), (150, 1)]  # one batched call per level
    assert tree.num_nodes.tolist() == [9] * 50
    assert tree.parents[0].tolist() == [-1, -1, -1, 0, 0, 1, 1, 2, 2]
    assert tree.depths[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    for row in range(50):
        root_children = tree.tokens[row, :3]
        assert len(set(root_children.tolist())) == 3
        want = without_replacement_probs(models.draft[BOS][None], root_children[None])[0]
        torch.testing.assert_close(tree.draft_probs[row, :3], want)
        for node in range(3):
            kids = tree.tokens[row, 3 + 2 * node: 5 + 2 * node]
            want = without_replacement_probs(models.draft[root_children[node]][None], kids[None])[0]
            torch.testing.assert_close(tree.draft_probs[row, 3 + 2 * node: 5 + 2 * node], want)


def test_rsd_c_with_small_support_gives_ragged_trees() -> None:
    draft = torch.full((VOCAB + 1, VOCAB), 0.0)
    draft[:, 2] = 1.0  # one possible token everywhere
    models = ToyModels(draft, draft)
    tree = build_tree_rsd_c(models.draft_logprobs(torch.full((4,), BOS)), 4, [3, 2], torch.Generator().manual_seed(0))
    assert tree.num_nodes.tolist() == [2] * 4
    assert tree.tokens.tolist() == [[2, 2]] * 4 and tree.parents.tolist() == [[-1, 0]] * 4


def test_rsd_s_structure_and_sibling_probs() -> None:
    models = MODELS["temperature_one"]()
    batch, beam, depth = 200, 3, 3
    tree = build_tree_rsd_s(models.draft_logprobs(torch.full((batch,), BOS)), batch, beam, depth,
                            torch.Generator().manual_seed(1))
    assert tree.num_nodes.tolist() == [beam * depth] * batch
    assert (tree.depths == torch.arange(depth).repeat_interleave(beam)).all()
    for row in range(batch):
        paths = {tuple(tree.path_tokens(row, j)) for j in range(beam * depth)}
        assert len(paths) == beam * depth  # sequences without replacement: all distinct
        first_child, next_sibling = sibling_links(tree)
        for parent in range(-1, beam * depth):
            kids, child = [], int(first_child[row, parent + 1])
            while child >= 0:
                kids.append(child)
                child = int(next_sibling[row, child])
            if not kids:
                continue
            q = models.draft[BOS if parent < 0 else int(tree.tokens[row, parent])]
            want = without_replacement_probs(q[None], tree.tokens[row, kids][None])[0]
            torch.testing.assert_close(tree.draft_probs[row, kids], want)


def test_stochastic_beam_search_samples_sequences_without_replacement() -> None:
    """The two best beams at depth 2 are two length-2 draft sequences drawn without replacement, in order."""
    vocab = 4
    q_first = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q_next = torch.softmax(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(3)), -1)

    def logprobs(rows: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
        return (q_next[paths[:, -1]] if paths.shape[1] else q_first.expand(len(rows), -1)).log()

    n = 30_000
    tree = build_tree_rsd_s(logprobs, n, 3, 2, torch.Generator().manual_seed(4))
    sequences = torch.stack([tree.tokens.gather(1, tree.parents[:, 3:5]), tree.tokens[:, 3:5]], dim=-1)
    codes = sequences[..., 0] * vocab + sequences[..., 1]  # [n, 2]: best and second-best beam
    joint = (q_first[:, None] * q_next).flatten()
    exact = _ordered_without_replacement(joint, 2)
    expected = torch.zeros(16 * 16, dtype=torch.float64)
    for (a, b), prob in exact.items():
        expected[16 * a + b] = prob * n
    observed = torch.bincount(codes[:, 0] * 16 + codes[:, 1], minlength=256)
    assert chi_square_pvalue(observed, expected) > ALPHA


# ---------------------------------------------------------------------------------------------------
# A chain is a tree with branching 1.


def test_tree_verifier_on_a_chain_is_the_chain_verifier() -> None:
    models = MODELS["top_p"]()
    n, depth = 5_000, 3
    generator = torch.Generator().manual_seed(9)
    tree = _rsd_c(1, 1, 1)(models, torch.full((n,), BOS), generator)
    # Ragged chains: cut each row to 0..depth nodes.
    draft_lens = torch.arange(n) % (depth + 1)
    tree = DraftTree(torch.where(tree.valid & (torch.arange(depth) < draft_lens[:, None]), tree.tokens, -1),
                     torch.where(torch.arange(depth) < draft_lens[:, None], tree.parents, -1),
                     torch.where(torch.arange(depth) < draft_lens[:, None], tree.depths, 0),
                     tree.draft_probs * (torch.arange(depth) < draft_lens[:, None])[..., None], draft_lens)
    target_probs = torch.cat([models.target[BOS].expand(n, 1, -1), models.target[tree.tokens.clamp(min=0)]], dim=1)
    uniforms = torch.rand(n, depth + 1, generator=generator, dtype=torch.float64)
    as_tree = verify_tree(target_probs, tree, uniforms)
    as_chain = verify_chain(target_probs, tree.tokens.clamp(min=0), tree.draft_probs, draft_lens, uniforms)
    assert torch.equal(as_tree.accepted_counts, as_chain.accepted_counts)
    assert [as_tree.emitted(r) for r in range(n)] == [as_chain.emitted(r) for r in range(n)]
    assert (as_chain.accepted_counts < draft_lens).any() and (as_chain.accepted_counts == draft_lens).any()
