"""Lookahead decoding (Fu et al. 2024) on an unmodified model, in the same pass as verification: the training-free
counterpart of SPACE (`specfleet.space`).

Each pass of a sequence feeds, after its new committed tokens (the last of them is the root):
- its *candidates*, a chain drawn from its n-gram pool, verified as any chain is;
- a *Jacobi chain* of W guesses, also hanging from the root: guess i stands where the token i places after the root
  will be, and the model's output there is a better guess for the token after it (one Jacobi iteration).
After the pass, the outputs along the Jacobi chain become the next guesses (shifted past what the step committed),
and every run of N consecutive outputs goes into the pool, keyed by its first token; the next candidates are the
pool's latest n-gram that starts with the token the step emitted. An iteration's outputs converge towards what the
model would write, so the pool fills with its likely phrases.

Departure from the paper: its lookahead branch is a 2-D window (N - 1 past iterations of W guesses) whose attention
pattern is not a tree; a pass here runs trees only (`ModelRunner.extend_tree`), so each pass runs one Jacobi
iteration as a chain, and the past iterations live on in the pool instead of in the window.
Plain functions and a small per-sequence state, free of the model; the verifier runs the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from specfleet.trees.shapes import ROOT_PARENT


@dataclass
class LookaheadState:
    """One sequence's Jacobi guesses and n-gram pool (first token -> the latest continuations that followed it)."""

    guesses: list[int] = field(default_factory=list)
    pool: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class LookaheadLayout:
    """A pass's nodes after the root: the candidates (node j is c_{j+1}: logits rows 0..k as for a chain), then the
    Jacobi chain (rows k + 1 .. k + W)."""

    tokens: list[int]
    parents: list[int]
    candidates: int
    guesses: int

    @property
    def guess_rows(self) -> range:
        """Rows of the pass's logits (row 0: the root, row j + 1: node j) at the Jacobi guesses."""
        return range(1 + self.candidates, 1 + self.candidates + self.guesses)


def lookahead_layout(candidates: Sequence[int], guesses: Sequence[int]) -> LookaheadLayout:
    k, w = len(candidates), len(guesses)
    parents = [ROOT_PARENT, *range(k - 1)] if k else []
    parents += [ROOT_PARENT, *range(k, k + w - 1)] if w else []
    return LookaheadLayout([*candidates, *guesses], parents, k, w)


def initial_guesses(context: Sequence[int], window: int) -> list[int]:
    """A first Jacobi chain: the context's last tokens (any guess converges; text often repeats its recent words)."""
    recent = list(context[-window:])
    return (recent * (window // max(len(recent), 1) + 1))[:window] if recent else []


def advance(state: LookaheadState, root_output: int, guess_outputs: Sequence[int], emitted: Sequence[int],
            ngram: int, pool_size: int) -> None:
    """After a pass: the model's next token at the root (``root_output``) and at each guess (``guess_outputs``, the
    Jacobi iteration's result), and the tokens the step committed (``emitted``: accepted candidates and the
    model's own token). Fills the pool with the iteration's n-grams and moves the guesses past what was committed."""
    outputs = [root_output, *guess_outputs]  # outputs[i]: the iteration's token for i places after the root
    for start in range(len(outputs) - ngram + 1):
        gram = tuple(outputs[start:start + ngram])
        continuations = state.pool.setdefault(gram[0], [])
        if gram[1:] in continuations:
            continuations.remove(gram[1:])
        continuations.append(gram[1:])  # the latest last
        del continuations[:-pool_size]
    shifted = outputs[len(emitted):]
    window = len(guess_outputs)
    state.guesses = (shifted + initial_guesses(emitted, window))[:window] if window else []


def candidates_after(state: LookaheadState, token: int, count: int) -> tuple[int, ...]:
    """The next step's candidates: the latest n-gram continuation the pool holds after ``token``; with none, the
    Jacobi guesses themselves (plain Jacobi decoding)."""
    continuations = state.pool.get(token)
    return (continuations[-1] if continuations else tuple(state.guesses))[:count]
