"""Tests for specfleet.verify: exact greedy cases, and statistical losslessness of chain rejection sampling.

The statistical harness runs the whole speculative procedure on toy Markov models over 8 tokens and
compares the joint histogram of the first two emitted tokens with the exact target joint by a
chi-square test. The same harness must reject deliberately wrong verifiers, so it is known to have
the power to catch a lossy one.
"""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from chi_square import chi_square_pvalue

from specfleet.sampling import dense_from_top_k, processed_probs, sample_from_probs, top_k_pairs
from specfleet.trees.structure import point_mass_tree, tree_from_paths
from specfleet.verify import VerifyResult, verify_chain, verify_greedy, verify_tree, verify_tree_greedy

VOCAB = 8
BIG = 20.0


def _logits_for(tokens: list[list[int]], vocab: int = VOCAB) -> torch.Tensor:
    """[batch, positions, vocab] logits with a large logit on the wanted token at each position."""
    logits = torch.randn(len(tokens), len(tokens[0]), vocab, generator=torch.Generator().manual_seed(0))
    for b, row in enumerate(tokens):
        for i, token in enumerate(row):
            logits[b, i, token] += BIG
    return logits


# ---------------------------------------------------------------------------------------------------
# Greedy verification, exact.


def test_greedy_all_accepted_emits_bonus() -> None:
    result = verify_greedy(_logits_for([[3, 5, 1, 6]]), torch.tensor([[3, 5, 1]]), torch.tensor([3]))
    assert result.accepted_counts.tolist() == [3]
    assert result.output_tokens.tolist() == [[3, 5, 1, 6]]
    assert result.emitted(0) == [3, 5, 1, 6]


def test_greedy_early_mismatch_emits_recovered_target_argmax() -> None:
    result = verify_greedy(_logits_for([[3, 5, 1, 6]]), torch.tensor([[3, 4, 1]]), torch.tensor([3]))
    assert result.accepted_counts.tolist() == [1]
    assert result.output_tokens.tolist() == [[3, 5, -1, -1]]
    assert result.emitted(0) == [3, 5]


def test_greedy_first_token_mismatch() -> None:
    result = verify_greedy(_logits_for([[3, 5, 1]]), torch.tensor([[2, 5]]), torch.tensor([2]))
    assert result.emitted(0) == [3]


def test_greedy_empty_draft_depth_zero() -> None:
    result = verify_greedy(_logits_for([[4], [7]]), torch.zeros(2, 0, dtype=torch.int64), torch.tensor([0, 0]))
    assert result.accepted_counts.tolist() == [0, 0]
    assert result.output_tokens.tolist() == [[4], [7]]


def test_greedy_ragged_batch() -> None:
    target = [[3, 5, 1, 6], [2, 2, 2, 2], [0, 7, 4, 1], [6, 1, 3, 5]]
    draft_tokens = torch.tensor([
        [3, 5, 1],  # full depth, all accepted -> bonus 6
        [9, -1, 123],  # no drafts; padding is arbitrary -> bonus 2 at position 0
        [0, 7, 0],  # draft_len 2, both accepted -> bonus at position 2 (the third draft is padding)
        [6, 0, 3],  # mismatch at 1 -> recovered 1, even though position 2 would match
    ])
    result = verify_greedy(_logits_for(target), draft_tokens, torch.tensor([3, 0, 2, 3]))
    assert result.accepted_counts.tolist() == [3, 0, 2, 1]
    assert [result.emitted(b) for b in range(4)] == [[3, 5, 1, 6], [2], [0, 7, 4], [6, 1]]
    assert result.output_tokens.tolist() == [[3, 5, 1, 6], [2, -1, -1, -1], [0, 7, 4, -1], [6, 1, -1, -1]]


def test_verify_checks_shapes() -> None:
    with pytest.raises(ValueError, match="draft_tokens"):
        verify_greedy(torch.zeros(2, 3, 8), torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_chain(torch.zeros(2, 3, 8), torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, 7),
                     torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="uniforms"):
        verify_chain(torch.zeros(2, 3, 8), torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, 8),
                     torch.zeros(2), torch.zeros(2, 2))


# ---------------------------------------------------------------------------------------------------
# Chain verification, exact cases.


def _one_hot(tokens: list[list[int]]) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(tokens), VOCAB).float()


def test_chain_with_point_masses_equals_greedy() -> None:
    target = [[3, 5, 1, 6], [2, 2, 2, 2], [0, 7, 4, 1], [6, 1, 3, 5]]
    draft_tokens = torch.tensor([[3, 5, 1], [9, -1, 123], [0, 7, 0], [6, 0, 3]])
    draft_lens = torch.tensor([3, 0, 2, 3])
    draft_probs = _one_hot(draft_tokens.clamp(0, VOCAB - 1).tolist())
    uniforms = torch.rand(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    chain = verify_chain(_one_hot(target), draft_tokens, draft_probs, draft_lens, uniforms)
    greedy = verify_greedy(_logits_for(target), draft_tokens, draft_lens)
    assert torch.equal(chain.accepted_counts, greedy.accepted_counts)
    assert torch.equal(chain.output_tokens, greedy.output_tokens)


def test_chain_acceptance_threshold_and_recovered_from_residual() -> None:
    # p(x=1) = 0.2, q(x=1) = 0.8: accepted iff u < 0.25. Residual max(0, p - q) = [0.3, 0, 0.5, ...].
    target_probs = torch.zeros(2, 2, VOCAB)
    target_probs[:, 0, :3] = torch.tensor([0.3, 0.2, 0.5])
    target_probs[:, 1, 7] = 1.0
    draft_probs = torch.zeros(2, 1, VOCAB)
    draft_probs[:, 0, :2] = torch.tensor([0.2, 0.8])
    # Row 0 is accepted (0.24 < 0.25), then the bonus 7; row 1 is rejected (0.26), and the recovered
    # token comes from the residual [0.3, 0, 0.5] / 0.8 with u = 0.5 -> token 2 (p would give token 1).
    uniforms = torch.tensor([[0.24, 0.5], [0.26, 0.5]], dtype=torch.float64)
    result = verify_chain(target_probs, torch.tensor([[1], [1]]), draft_probs, torch.tensor([1, 1]), uniforms)
    assert result.output_tokens.tolist() == [[1, 7], [2, -1]]


def test_chain_never_accepts_a_token_the_target_rules_out() -> None:
    target_probs = torch.zeros(1, 2, VOCAB)
    target_probs[0, :, 4] = 1.0
    draft_probs = torch.zeros(1, 1, VOCAB)
    draft_probs[0, 0, 2] = 1.0
    result = verify_chain(target_probs, torch.tensor([[2]]), draft_probs, torch.tensor([1]),
                          torch.tensor([[0.0, 0.999]], dtype=torch.float64))
    assert result.emitted(0) == [4]


def test_chain_zero_mass_residual_falls_back_to_target() -> None:
    # A target row that is numerically q scaled down: p(x)/q(x) = 0.5 rejects at u = 0.9, and
    # max(0, p - q) is zero everywhere, so the recovered token is sampled from p: u = 0.2 -> token 1
    # (an all-zero row would give the last token, 7).
    q = torch.tensor([0.0, 0.25, 0.25, 0.5, 0.0, 0.0, 0.0, 0.0])
    target_probs = torch.stack([q * 0.5, q])[None]
    result = verify_chain(target_probs, torch.tensor([[3]]), q[None, None], torch.tensor([1]),
                          torch.tensor([[0.9, 0.2]], dtype=torch.float64))
    assert result.accepted_counts.tolist() == [0]
    assert result.emitted(0) == [1]


def test_chain_empty_draft_depth_zero_samples_bonus() -> None:
    target_probs = torch.zeros(2, 1, VOCAB)
    target_probs[:, 0, :2] = 0.5
    result = verify_chain(target_probs, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, VOCAB),
                          torch.tensor([0, 0]), torch.tensor([[0.2], [0.7]], dtype=torch.float64))
    assert result.output_tokens.tolist() == [[0], [1]]


# ---------------------------------------------------------------------------------------------------
# Statistical losslessness.
#
# Toy "models" are first-order Markov chains over VOCAB tokens: a table [VOCAB + 1, VOCAB] whose row
# t is the next-token distribution after token t, and row VOCAB the distribution of the first token
# (a virtual BOS). The target emits x1 ~ p(.), x2 ~ p(.|x1); we check that the speculative procedure
# emits (x1, x2) with exactly that joint.
#
# A step emits accepted + 1 >= 1 tokens. When the first step emits only one token, the second comes
# from a second speculative step from that token (rather than from the exact target conditional), so
# the test also covers that steps compose losslessly. The second step runs for every trial (it is
# cheap) and is used only where the first emitted a single token.
#
# Thresholds: the seeds are fixed, so each test is deterministic; under a correct verifier the
# p-value is uniform over seeds (checked over 60 seeds per case when this was written), so the 1e-4
# threshold gives each of the 4 lossless tests a 1e-4 chance of a false failure when seeds or torch's
# generator change: 4e-4 < 1e-3 in all. At 30k trials the wrong verifiers give chi-square statistics
# in the thousands on 25-63 degrees of freedom (p-values that underflow to 0), far below 1e-6.

BOS = VOCAB
TRIALS = 30_000
Verifier = Callable[..., VerifyResult]


@dataclass
class ToyModels:
    target: torch.Tensor  # [VOCAB + 1, VOCAB] target_probs of the next token given the previous one
    draft: torch.Tensor  # [VOCAB + 1, VOCAB] draft_probs of the next token given the previous one

    def target_joint(self) -> torch.Tensor:  # [VOCAB, VOCAB]
        """Exact target probability of the first two tokens (x1, x2)."""
        first = self.target[BOS].double()  # [VOCAB]
        return first[:, None] * self.target[:VOCAB].double()


def _params(n: int, temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[torch.Tensor, ...]:
    return torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p)


def _toy_logits(seed: int) -> torch.Tensor:  # [VOCAB + 1, VOCAB]
    return 1.5 * torch.randn(VOCAB + 1, VOCAB, generator=torch.Generator().manual_seed(seed))


def _models_temperature_one() -> ToyModels:
    target_logits = _toy_logits(10)
    draft_logits = 0.6 * target_logits + _toy_logits(11)  # correlated, as a real draft model would be
    return ToyModels(processed_probs(target_logits, *_params(VOCAB + 1, 1.0)),
                     processed_probs(draft_logits, *_params(VOCAB + 1, 1.0)))


def _models_top_p_target_top_k_wire_draft() -> ToyModels:
    """Target at temperature 1 with top-p 0.9 (zeros in p); draft sent as its top-4 pairs on the wire."""
    target_logits = _toy_logits(20)
    draft_logits = 0.6 * target_logits + _toy_logits(21)
    target = processed_probs(target_logits, *_params(VOCAB + 1, 1.0, top_p=0.9))
    draft = processed_probs(draft_logits, *_params(VOCAB + 1, 1.0))
    token_ids, pair_probs = top_k_pairs(draft, k=4)
    return ToyModels(target, dense_from_top_k(token_ids, pair_probs, VOCAB))


def _models_low_temperature_top_k() -> ToyModels:
    """Target at temperature 0.7 with top-k 5, draft at temperature 1.2."""
    target_logits = _toy_logits(40)
    draft_logits = 0.6 * target_logits + _toy_logits(41)
    return ToyModels(processed_probs(target_logits, *_params(VOCAB + 1, 0.7, top_k=5)),
                     processed_probs(draft_logits, *_params(VOCAB + 1, 1.2)))


def _models_point_mass_draft() -> ToyModels:
    """An n-gram style draft: a deterministic next token after each token, q a point mass."""
    target = processed_probs(_toy_logits(30), *_params(VOCAB + 1, 1.0))
    guesses = torch.randint(0, VOCAB, (VOCAB + 1,), generator=torch.Generator().manual_seed(31))
    return ToyModels(target, torch.nn.functional.one_hot(guesses, VOCAB).float())


MODELS = {
    "temperature_one": _models_temperature_one,
    "top_p_target_top_k_wire_draft": _models_top_p_target_top_k_wire_draft,
    "low_temperature_top_k": _models_low_temperature_top_k,
    "point_mass_draft": _models_point_mass_draft,
}


def _speculative_step(
    models: ToyModels, verifier: Verifier, previous: torch.Tensor, draft_lens: torch.Tensor,
    generator: torch.Generator,
) -> VerifyResult:
    """One depth-2 step for a batch of trials after token `previous` [n]: draft, then verify."""
    n = previous.shape[0]
    draft_uniforms = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    q1 = models.draft[previous]  # [n, vocab]
    x1 = sample_from_probs(q1, draft_uniforms[:, 0])
    q2 = models.draft[x1]
    x2 = sample_from_probs(q2, draft_uniforms[:, 1])
    draft_tokens = torch.stack([x1, x2], dim=1)  # [n, depth]
    draft_probs = torch.stack([q1, q2], dim=1)  # [n, depth, vocab]
    target_probs = torch.stack([models.target[previous], models.target[x1], models.target[x2]], dim=1)
    uniforms = torch.rand(n, 3, generator=generator, dtype=torch.float64)  # [n, depth + 1]
    return verifier(target_probs, draft_tokens, draft_probs, draft_lens, uniforms)


def _first_two_tokens(models: ToyModels, verifier: Verifier, seed: int) -> torch.Tensor:  # [TRIALS, 2]
    """Run the speculative procedure TRIALS times and return the first two emitted tokens of each."""
    generator = torch.Generator().manual_seed(seed)
    # Ragged: a third of the trials each draft 0, 1 or 2 tokens, all in one batch.
    draft_lens = torch.arange(TRIALS) % 3
    first = _speculative_step(models, verifier, torch.full((TRIALS,), BOS), draft_lens, generator)
    x1 = first.output_tokens[:, 0]
    second = _speculative_step(models, verifier, x1, torch.full((TRIALS,), 2), generator)
    x2 = torch.where(first.accepted_counts >= 1, first.output_tokens[:, 1], second.output_tokens[:, 0])
    return torch.stack([x1, x2], dim=1)


def _chi_square_pvalue(tokens: torch.Tensor, joint: torch.Tensor) -> float:
    """p-value of the observed (x1, x2) histogram against the exact joint."""
    observed = torch.bincount(tokens[:, 0] * VOCAB + tokens[:, 1], minlength=VOCAB * VOCAB)
    return chi_square_pvalue(observed, joint.flatten() * tokens.shape[0])


def _always_accept(target_probs, draft_tokens, draft_probs, draft_lens, uniforms) -> VerifyResult:
    """WRONG: accepts every draft token, then samples the bonus token from the target."""
    batch, depth = draft_tokens.shape
    rows = torch.arange(batch)
    bonus = sample_from_probs(target_probs[rows, draft_lens], uniforms[:, depth])
    return _result(draft_tokens, draft_lens, bonus)


def _residual_is_target(target_probs, draft_tokens, draft_probs, draft_lens, uniforms) -> VerifyResult:
    """WRONG: correct acceptance test, but after a rejection samples from p instead of norm(max(0, p - q))."""
    batch, depth = draft_tokens.shape
    rows = torch.arange(batch)
    valid = torch.arange(depth)[None, :] < draft_lens[:, None]
    safe_tokens = torch.where(valid, draft_tokens, 0)[..., None]
    p_draft = target_probs[:, :depth].gather(-1, safe_tokens).squeeze(-1)
    q_draft = draft_probs.gather(-1, safe_tokens).squeeze(-1)
    accept = valid & (uniforms[:, :depth] * q_draft < p_draft)
    accepted = torch.cumprod(accept.long(), dim=1).sum(dim=1)
    next_tokens = sample_from_probs(target_probs[rows, accepted], uniforms[:, depth])
    return _result(draft_tokens, accepted, next_tokens)


def _result(draft_tokens: torch.Tensor, accepted: torch.Tensor, next_tokens: torch.Tensor) -> VerifyResult:
    depth = draft_tokens.shape[1]
    out = torch.full((draft_tokens.shape[0], depth + 1), -1, dtype=torch.int64)
    for i in range(depth):
        out[:, i] = torch.where(accepted > i, draft_tokens[:, i], out[:, i])
    out[torch.arange(len(accepted)), accepted] = next_tokens
    return VerifyResult(accepted_counts=accepted, output_tokens=out)


@pytest.mark.parametrize("name", MODELS)
def test_chain_verification_is_lossless(name: str) -> None:
    models = MODELS[name]()
    tokens = _first_two_tokens(models, verify_chain, seed=100)
    assert _chi_square_pvalue(tokens, models.target_joint()) > 1e-4


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("wrong_verifier", [_always_accept, _residual_is_target])
def test_harness_catches_wrong_verifiers(name: str, wrong_verifier: Verifier) -> None:
    models = MODELS[name]()
    tokens = _first_two_tokens(models, wrong_verifier, seed=100)
    assert _chi_square_pvalue(tokens, models.target_joint()) < 1e-6


def test_draft_equal_to_target_accepts_everything() -> None:
    models = _models_temperature_one()
    models = ToyModels(models.target, models.target.clone())
    result = _speculative_step(models, verify_chain, torch.full((1000,), BOS), torch.full((1000,), 2),
                               torch.Generator().manual_seed(5))
    assert (result.accepted_counts == 2).all()


# ---------------------------------------------------------------------------------------------------
# Tree verification, exact cases. Tree shape used below (node: token):
#   root ─┬─ 0:3 ─┬─ 2:5 ── 4:1
#         │       └─ 3:4
#         └─ 1:2 ── 5:6
# target_logits rows: 0 at the root, j + 1 at node j.

TREE_PATHS = [[3, 5, 1], [2, 6], [3, 4]]


def _tree_target(argmax_at: list[int]) -> torch.Tensor:
    """[1, nodes + 1, VOCAB] logits with the given argmax at the root and after each node."""
    return _logits_for([argmax_at])


def test_tree_from_paths_layout_used_below() -> None:
    tree = tree_from_paths(TREE_PATHS, VOCAB)
    assert tree.tokens.tolist() == [[3, 5, 1, 2, 6, 4]]
    assert tree.parents.tolist() == [[-1, 0, 1, -1, 3, 0]]


def test_tree_greedy_follows_matching_children_and_emits_bonus_at_leaf() -> None:
    tree = tree_from_paths(TREE_PATHS, VOCAB)  # nodes: 0:3, 1:5, 2:1, 3:2, 4:6, 5:4
    # Root argmax 3 -> node 0; after node 0 argmax 5 -> node 1; after node 1 argmax 1 -> node 2 (leaf), bonus 7.
    result = verify_tree_greedy(_tree_target([3, 5, 1, 7, 0, 0, 0]), tree)
    assert result.accepted_path(0) == [0, 1, 2]
    assert result.emitted(0) == [3, 5, 1, 7]


def test_tree_greedy_takes_the_second_sibling_and_recovers() -> None:
    tree = tree_from_paths(TREE_PATHS, VOCAB)
    # Root argmax 3 -> node 0; after node 0 argmax 4 -> its second child, node 5 (a leaf): bonus 0.
    assert verify_tree_greedy(_tree_target([3, 4, 0, 0, 0, 0, 0]), tree).emitted(0) == [3, 4, 0]
    # Root argmax 2 -> node 3; after node 3 argmax 7 matches no child: recovered 7.
    result = verify_tree_greedy(_tree_target([2, 0, 0, 0, 7, 0, 0]), tree)
    assert result.accepted_path(0) == [3] and result.emitted(0) == [2, 7]
    # Root argmax matches nothing.
    result = verify_tree_greedy(_tree_target([0, 3, 5, 1, 6, 2, 4]), tree)
    assert result.accepted_counts.tolist() == [0] and result.emitted(0) == [0]


def test_tree_greedy_on_chains_equals_chain_greedy_and_empty_trees() -> None:
    target = [[3, 5, 1, 6], [2, 2, 2, 2], [0, 7, 4, 1], [6, 1, 3, 5]]
    draft_tokens = torch.tensor([[3, 5, 1], [9, -1, 123], [0, 7, 0], [6, 0, 3]])
    draft_lens = torch.tensor([3, 0, 2, 3])
    chain_parents = torch.tensor([[-1, 0, 1]]).expand(4, -1)
    tree = point_mass_tree(draft_tokens.clamp(0, VOCAB - 1), chain_parents, draft_lens, VOCAB)
    got = verify_tree_greedy(_logits_for(target), tree)
    want = verify_greedy(_logits_for(target), draft_tokens, draft_lens)
    assert torch.equal(got.accepted_counts, want.accepted_counts)
    assert [got.emitted(b) for b in range(4)] == [want.emitted(b) for b in range(4)]
    assert got.accepted_path(0) == [0, 1, 2] and got.accepted_path(3) == [0]
    # A tree of no nodes at all is one target token.
    empty = point_mass_tree(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                            torch.zeros(2, dtype=torch.long), VOCAB)
    assert verify_tree_greedy(_logits_for([[4], [7]]), empty).output_tokens.tolist() == [[4], [7]]
    probs = _one_hot([[4], [7]])
    sampled = verify_tree(probs, empty, torch.rand(2, 1, dtype=torch.float64))
    assert sampled.output_tokens.tolist() == [[4], [7]]


def test_tree_sampling_with_point_masses_equals_tree_greedy() -> None:
    tree = tree_from_paths(TREE_PATHS, VOCAB)
    for argmax_at in ([3, 5, 1, 7, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0], [2, 0, 0, 0, 7, 0, 0], [0, 3, 5, 1, 6, 2, 4]):
        uniforms = torch.rand(1, 7, generator=torch.Generator().manual_seed(sum(argmax_at)), dtype=torch.float64)
        sampled = verify_tree(_one_hot([argmax_at]), tree, uniforms)
        greedy = verify_tree_greedy(_tree_target(argmax_at), tree)
        assert sampled.emitted(0) == greedy.emitted(0)
        assert sampled.accepted_path(0) == greedy.accepted_path(0)


def test_tree_sampling_tries_siblings_against_the_residual() -> None:
    # Root candidates 1 then 2 (point masses). p = [0.3, 0.2, 0.5, 0...]: candidate 1 is accepted iff
    # u < 0.2; after rejecting it the residual is [0.375, 0, 0.625], so 2 is accepted iff u < 0.625;
    # after rejecting both the recovered token is 0.
    tree = point_mass_tree(torch.tensor([[1, 2]]).expand(3, -1), torch.tensor([[-1, -1]]).expand(3, -1),
                           torch.full((3,), 2), VOCAB)
    p = torch.zeros(VOCAB)
    p[:3] = torch.tensor([0.3, 0.2, 0.5])
    uniforms = torch.tensor([[0.19, 0.9, 0.1], [0.21, 0.62, 0.1], [0.21, 0.63, 0.99]], dtype=torch.float64)
    result = verify_tree(p.expand(3, 3, -1), tree, uniforms)
    assert result.accepted_nodes.tolist() == [[0], [1], [-1]]
    assert [result.emitted(b) for b in range(3)] == [[1, 0], [2, 0], [0]]


def test_tree_verify_checks_shapes() -> None:
    tree = tree_from_paths(TREE_PATHS, VOCAB)
    with pytest.raises(ValueError, match="target_logits"):
        verify_tree_greedy(torch.zeros(1, 6, VOCAB), tree)
    with pytest.raises(ValueError, match="uniforms"):
        verify_tree(torch.zeros(1, 7, VOCAB), tree, torch.zeros(1, 6))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_tree(torch.zeros(1, 7, VOCAB + 1), tree, torch.zeros(1, 7))
