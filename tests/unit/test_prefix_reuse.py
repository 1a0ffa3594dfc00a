"""A sequence sent whole starts from the longest prefix of it the cache holds: the logits are those of a runner that
computes everything, and only what follows the prefix runs through the model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from specfleet.engine import Extend, ModelRunner, TreeExtend
from specfleet.engine.streaming import StreamingRunner, StreamingWindow

TOLERANCE = 1e-4
VOCAB = 61
STREAMING = StreamingWindow(sinks=2, window=4, reach=2, chunk=6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _runner(folder: Path, reuse: bool = True, slots: int = 4) -> ModelRunner:
    return ModelRunner.from_folder(folder, num_slots=slots, max_seq_len=128, prefix_reuse=reuse)


class Counted:
    """Counts the tokens a runner's model computes."""

    def __init__(self, runner: ModelRunner) -> None:
        self.tokens = 0
        forward = runner.model.forward

        def counting(input_ids, *args, **kwargs):
            self.tokens += input_ids.numel()
            return forward(input_ids, *args, **kwargs)

        runner.model.forward = counting  # type: ignore[method-assign]


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=TOLERANCE, rtol=0)


def test_a_chats_next_turn_computes_only_its_new_tokens(folder: Path) -> None:
    runner, plain = _runner(folder), _runner(folder, reuse=False)
    turn = list(range(1, 21))
    answer = []
    for r in (runner, plain):
        r.extend([Extend("turn-1", 0, turn)])
    for step in range(5):  # decode the answer one token at a time
        token = 30 + step
        for r in (runner, plain):
            r.extend([Extend("turn-1", len(turn) + step, [token])])
        answer.append(token)
    for r in (runner, plain):
        r.release(["turn-1"])
    conversation = turn + answer + list(range(40, 50))
    counted = Counted(runner)
    _close(runner.extend([Extend("turn-2", 0, conversation, num_logits=3)]),
           plain.extend([Extend("turn-2", 0, conversation, num_logits=3)]))
    assert counted.tokens == 10  # the new turn; the 25 tokens before it were copied
    assert runner.reused_tokens == 25
    assert runner.cached_len("turn-2") == len(conversation)


def test_a_live_sequences_prefix_is_copied_and_both_go_on_unchanged(folder: Path) -> None:
    runner, plain = _runner(folder), _runner(folder, reuse=False)
    shared = list(range(1, 16))
    for r in (runner, plain):
        r.extend([Extend("first", 0, shared + [20, 21])])
    counted = Counted(runner)
    _close(runner.extend([Extend("second", 0, shared + [40, 41, 42])]),
           plain.extend([Extend("second", 0, shared + [40, 41, 42])]))
    assert counted.tokens == 3
    for r in (runner, plain):  # the first sequence's entries were read, not moved
        assert r.cached_len("first") == 17
    _close(runner.extend([Extend("first", 17, [22]), Extend("second", 18, [43])]),
           plain.extend([Extend("first", 17, [22]), Extend("second", 18, [43])]))


def test_a_draft_tree_is_no_prefix(folder: Path) -> None:
    """Tree nodes sit after a sequence's committed tokens in tree order, a sibling where a chain would have the next
    token: a prefix ends at the tree's root, while the tree is pending and once its sequence is released."""
    runner, plain = _runner(folder), _runner(folder, reuse=False)
    committed = list(range(1, 13))
    nodes, parents = [30, 31, 32], [-1, -1, 0]  # 31 is 30's sibling; 32 its child
    for r in (runner, plain):
        r.extend_tree([TreeExtend("drafting", 0, committed, nodes, parents)])
    counted = Counted(runner)
    along_the_nodes = committed + [30, 31, 50]
    _close(runner.extend([Extend("other", 0, along_the_nodes)]), plain.extend([Extend("other", 0, along_the_nodes)]))
    assert counted.tokens == len(along_the_nodes) - len(committed)

    for r in (runner, plain):  # the tree is still there to keep a path of
        r.keep_path("drafting", len(committed), [0, 2])
    counted.tokens = 0
    path = committed + [30, 32, 60]
    _close(runner.extend([Extend("after-keep", 0, path)]), plain.extend([Extend("after-keep", 0, path)]))
    assert counted.tokens == 1  # the kept path counts as the sequence's tokens

    kept = len(committed) + 2
    for r in (runner, plain):
        r.extend_tree([TreeExtend("drafting", kept, [33], [34, 35], [-1, -1])])
        r.release(["drafting"])
    counted.tokens = 0
    late = Extend("late", 0, committed + [30, 32, 33, 34, 35])
    _close(runner.extend([late]), plain.extend([late]))
    assert counted.tokens == 2  # the released sequence's committed tokens end at 33


def test_a_released_slot_is_taken_over_until_another_sequence_writes_it(folder: Path) -> None:
    runner = _runner(folder, slots=3)
    prompt = list(range(1, 11))
    runner.extend([Extend("a", 0, [5, 6, 7]), Extend("b", 0, [8, 9]), Extend("c", 0, prompt)])
    slot_of_c = runner._slots["c"]
    runner.release(["a", "b", "c"])
    runner.extend([Extend("c-again", 0, prompt)])
    assert runner._slots["c-again"] == slot_of_c  # no copy: the sequence moved into the slot that holds it
    runner.release(["c-again"])
    # New sequences take the lowest free slots; once one has written over the prompt's entries, nothing is reused.
    runner.extend([Extend(name, 0, [40 + i] * 4) for i, name in enumerate(["x", "y", "z"])])
    runner.release(["x", "y", "z"])
    counted = Counted(runner)
    runner.extend([Extend("c-third", 0, prompt)])
    assert counted.tokens == len(prompt)


def test_a_new_conversation_sharing_a_system_prompt_leaves_a_finished_one_for_its_next_turn(folder: Path) -> None:
    """Free slots keep finished conversations; a new one that shares only their system prompt copies it into the
    free slot whose loss costs least (an empty one, else the one holding least), and the finished conversation's
    next turn still starts from all of it."""
    runner = _runner(folder, slots=3)
    system = [1, 2, 3, 4]
    long_chat, short_chat = system + list(range(10, 40)), system + [50, 51]
    runner.extend([Extend("long", 0, long_chat), Extend("short", 0, short_chat)])
    runner.release(["long", "short"])
    slot_of = {"long": 0, "short": 1}
    assert [runner._held[s] for s in slot_of.values()] == [long_chat, short_chat]

    runner.extend([Extend("new-1", 0, system + [55, 56, 57])])
    assert runner._slots["new-1"] == 2  # the empty slot, the system prompt copied into it
    runner.extend([Extend("new-2", 0, system + [58, 59])])
    assert runner._slots["new-2"] == slot_of["short"]  # no slot empty: the one that loses the fewest tokens
    assert runner.reused_tokens == 2 * len(system)

    counted = Counted(runner)
    runner.extend([Extend("long, next turn", 0, long_chat + [5, 6])])
    assert counted.tokens == 2
    assert runner._slots["long, next turn"] == slot_of["long"]  # moved in: the slot held nothing else


def test_two_new_sequences_of_one_prompt_in_one_call(folder: Path) -> None:
    runner, plain = _runner(folder), _runner(folder, reuse=False)
    prompt = list(range(3, 19))
    batch = [Extend("one", 0, prompt), Extend("two", 0, prompt + [7])]
    _close(runner.extend(batch), plain.extend(batch))


def test_nothing_is_reused_when_off(folder: Path) -> None:
    prompt = list(range(1, 30))
    off = _runner(folder, reuse=False)
    streaming_off = StreamingRunner.from_folder(folder, num_slots=2, max_seq_len=128, window=STREAMING,
                                                prefix_reuse=False)
    for runner in (off, streaming_off):
        runner.extend([Extend("first", 0, prompt)])
        runner.release(["first"])
        counted = Counted(runner)
        runner.extend([Extend("again", 0, prompt)])
        assert counted.tokens == len(prompt)
        assert runner.reused_tokens == 0


@pytest.mark.parametrize("cache", ["full", "streaming"])
def test_random_sessions_have_the_logits_of_a_runner_that_computes_everything(folder: Path, cache: str) -> None:
    """Chats, drafts, trees, rollbacks, releases and evictions over prompts that share prefixes, on a runner that
    reuses prefixes and one that does not: every call's logits agree. On a streaming cache the windows slide (its
    capacity is 22 entries), so prefixes are also taken from trimmed windows, and refused where one cannot restore."""
    rng = random.Random(7)
    if cache == "full":
        runner, plain = _runner(folder, slots=4), _runner(folder, reuse=False, slots=4)
    else:
        runner, plain = (StreamingRunner.from_folder(folder, num_slots=4, max_seq_len=128, window=STREAMING,
                                                     prefix_reuse=reuse) for reuse in (True, False))
    max_logits = STREAMING.chunk if cache == "streaming" else 128
    from_trimmed = []  # per reuse: whether the prefix came from a slot whose window had slid
    start_from_prefix = runner._start_from_prefix

    def recording(request, slot, source, length):
        from_trimmed.append(bool(getattr(runner, "_evicted", [0] * runner.num_slots)[source]))
        return start_from_prefix(request, slot, source, length)

    runner._start_from_prefix = recording  # type: ignore[method-assign]
    stems = [[rng.randrange(VOCAB) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    history: dict[str, list[int]] = {}  # what each live sequence holds (on both runners)
    finished: list[list[int]] = []
    reusing_calls = 0
    for call in range(150 if cache == "full" else 400):
        live = [s for s in history if runner.cached_len(s) is not None and plain.cached_len(s) is not None]
        for seq_id in set(history) - set(live):  # evicted from one of them: the router would resend it
            history.pop(seq_id)
            runner.release([seq_id])
            plain.release([seq_id])
        action = rng.random()
        if action < 0.35 or not live:
            base = rng.choice(finished) if finished and rng.random() < 0.5 else rng.choice(stems)
            suffix = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))]
            cut = len(base) if rng.random() < 0.3 else rng.randrange(1, len(base) + 1)  # 0.3: a chat's next turn
            tokens = base[:cut] + suffix
            seq_id = f"s{call}"
            logits = 1 if rng.random() < 0.5 else rng.randrange(1, min(len(tokens), max_logits) + 1)
            request = Extend(seq_id, 0, tokens, num_logits=logits)
            history[seq_id] = tokens
        elif action < 0.6:
            seq_id = rng.choice(live)
            keep = rng.randrange(1, len(history[seq_id]) + 1)
            if not (runner.can_extend(seq_id, keep) and plain.can_extend(seq_id, keep)):
                keep = len(history[seq_id])  # behind a trimmed window: the router would not roll back so far
            new = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 4))]
            request = Extend(seq_id, keep, new, num_logits=len(new))
            history[seq_id] = history[seq_id][:keep] + new
        elif action < 0.8:
            seq_id = rng.choice(live)
            nodes = [rng.randrange(VOCAB) for _ in range(4)]
            parents = [-1, 0, -1, 1]
            tree = TreeExtend(seq_id, len(history[seq_id]), [rng.randrange(VOCAB)], nodes, parents)
            _close(runner.extend_tree([tree]), plain.extend_tree([tree]))
            path = rng.choice([[], [0], [0, 1], [0, 1, 3], [2]])
            for r in (runner, plain):
                r.keep_path(seq_id, tree.prefix_len, path)
            history[seq_id] = history[seq_id] + tree.tokens + [nodes[n] for n in path]
            continue
        else:
            seq_id = rng.choice(live)
            finished.append(history.pop(seq_id))
            runner.release([seq_id])
            plain.release([seq_id])
            continue
        reused_before = runner.reused_tokens
        _close(runner.extend([request]), plain.extend([request]))
        assert runner.cached_len(request.seq_id) == plain.cached_len(request.seq_id) == len(history[request.seq_id])
        reusing_calls += runner.reused_tokens > reused_before
    assert reusing_calls >= 20
    if cache == "streaming":
        assert sum(from_trimmed) >= 5
