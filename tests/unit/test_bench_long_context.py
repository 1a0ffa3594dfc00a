"""The long-context bench's pure parts: prompts cut to exactly N tokens, decode goodput, the table and its routers."""

from __future__ import annotations

import pytest

from bench.long_context import (
    AUTO_BOTH,
    AUTO_SPARSE,
    HF,
    PLAIN,
    Cell,
    Frame,
    Timed,
    agreement_until_eos,
    build_prompts,
    cell_work,
    chat_frame,
    decode_goodput,
    document_windows,
    interleave,
    line_start,
    rounds_for,
    router_plans,
    speedup_lines,
    summarise,
    table,
)


class CharTokenizer:
    """One token per character (its code point), under a chat template of fixed markers."""

    def apply_chat_template(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool,
                            tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in conversation) + "<assistant>"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return [ord(c) for c in text]


def chars(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def encode(text: str) -> list[int]:
    return CharTokenizer().encode(text, add_special_tokens=False)


def test_a_prompt_is_the_frame_around_the_documents_first_tokens_exactly_n_long() -> None:
    frame = chat_frame(CharTokenizer(), "Sum up.")
    assert chars(list(frame.prefix)) == "<user>"
    assert chars(list(frame.suffix)) == "\n\nSum up.</user><assistant>"
    document = encode("0123456789" * 10)
    for context in (len(frame.prefix) + len(frame.suffix) + 1, 40, 60):
        prompt = frame.wrap(document, context)
        assert len(prompt) == context
        need = frame.document_tokens(context)
        assert chars(prompt) == f"<user>{chars(document[:need])}\n\nSum up.</user><assistant>"
    with pytest.raises(ValueError, match="too short"):
        frame.wrap(document[:10], 60)
    with pytest.raises(ValueError, match="no room"):
        frame.document_tokens(len(frame.prefix) + len(frame.suffix))
    assert Frame().wrap(document, 7) == document[:7]  # continuation: the bare document


def test_windows_start_at_lines_and_skip_documents_too_short() -> None:
    text = "".join(f"line {i:02d}\n" for i in range(30))  # 30 lines of 8 characters
    assert line_start(text, 0) == 0
    assert line_start(text, 0.5) == 120 and text[120:128] == "line 15\n"
    assert line_start(text, 0.51) == 128  # the next whole line, never one cut in the middle
    windows = list(document_windows([("a", text), ("short", "tiny\n")], encode, need=16))
    assert [label for label, _ in windows] == ["a@0", "a@80", "a@160"]  # the first, then those 1/3 and 2/3 in
    assert all(len(ids) == 16 for _, ids in windows)
    assert chars(windows[1][1]) == "line 10\nline 11\n"
    # Near its end a document has no full window left: left out, not shortened.
    assert [label for label, _ in document_windows([("a", text)], encode, need=100)] == ["a@0", "a@80"]


def test_prompts_are_distinct_exact_and_take_the_kinds_in_turn() -> None:
    code = [(f"m{i}.py", "".join(f"x{i} = {j}\n" for j in range(60))) for i in range(2)]
    chat = [("sharegpt#0", "".join(f"User: question {j}?\n\nAssistant: answer {j}.\n" for j in range(12)))]
    sources = {"code": (chat_frame(CharTokenizer(), "What?"), code), "chat": (Frame(), chat)}
    prompts = build_prompts(sources, encode, context=50, count=6)
    assert [p.kind for p in prompts] == ["code", "chat", "code", "chat", "code", "chat"]
    # 178: the first line that starts at or after a third of the conversation's 484 characters.
    assert [p.label for p in prompts[:4]] == ["m0.py@0", "sharegpt#0@0", "m1.py@0", "sharegpt#0@178"]
    assert all(len(p.ids) == 50 for p in prompts)
    assert len({tuple(p.ids) for p in prompts}) == 6
    with pytest.raises(SystemExit, match="only 9 distinct"):
        build_prompts(sources, encode, context=50, count=10)
    assert list(interleave([1, 2, 3], "a")) == [1, "a", 2, 3]
    # Windows of a text that repeats itself can be equal: each is sent once.
    periodic = {"chat": (Frame(), [("loop", "0123456789\n" * 30)])}
    assert len(build_prompts(periodic, encode, context=20, count=1)) == 1
    with pytest.raises(SystemExit, match="only 1 distinct"):
        build_prompts(periodic, encode, context=20, count=2)


def test_decode_goodput_leaves_out_the_prefill_and_the_first_message() -> None:
    # 64 tokens, the first at 2.0 s (the prefill), the last at 5.0 s: 63 tokens in 3 s.
    assert decode_goodput(Timed([0] * 64, 2.0, 1, 5.0)) == pytest.approx(21.0)
    # The first message carried 4 tokens (drafts accepted on the first step): those came with the prefill.
    assert decode_goodput(Timed([0] * 64, 2.0, 4, 5.0)) == pytest.approx(20.0)
    assert decode_goodput(Timed([0] * 3, 2.0, 3, 2.0)) is None


def _timed(first_s: float, last_s: float, tokens: int = 9, steps: int = 0, drafted: int = 0,
           accepted: int = 0) -> Timed:
    return Timed([0] * tokens, first_s, 1, last_s, steps, drafted, accepted)


def test_a_cell_sums_its_batch_and_takes_the_median_over_rounds() -> None:
    # Round goodputs: 8/1 + 8/2 = 12, 8/4 = 2 + 8/4 = 2 -> 4, and 8/1 + 0 (no decode phase) = 8; median 8.
    cell = Cell([[_timed(1.0, 2.0, steps=4, drafted=8, accepted=4), _timed(1.0, 3.0, steps=5, drafted=8, accepted=2)],
                 [_timed(3.0, 7.0), _timed(3.0, 7.0)],
                 [_timed(1.0, 2.0), Timed([0], 0.5, 1, 0.5)]])
    assert cell.goodput() == pytest.approx(8.0)
    assert cell.ttft_ms() == pytest.approx(1000.0)
    assert cell.acceptance() == pytest.approx(6 / 16)
    assert cell.tokens_per_step() == pytest.approx((5 * 9 + 1) / 9)
    assert Cell([[_timed(1.0, 2.0)]]).acceptance() is None


def _cell(goodput: float, ttft_s: float = 0.5, drafted: int = 0, accepted: int = 0) -> Cell:
    return Cell([[Timed([0] * 11, ttft_s, 1, ttft_s + 10 / goodput, 10, drafted, accepted)]])


def test_the_table_keeps_the_best_ngram_depth_and_marks_the_best_sparse_self_depth() -> None:
    cells = {
        (1024, 1, PLAIN): _cell(20.0),
        (1024, 1, "ngram d2"): _cell(25.0, drafted=20, accepted=10),
        (1024, 1, "ngram d4"): _cell(22.0, drafted=40, accepted=10),
        (1024, 1, "sparse_self d1"): _cell(24.0, drafted=10, accepted=8),
        (1024, 1, "sparse_self d2"): _cell(30.0, 0.75, drafted=20, accepted=15),
        (1024, 1, AUTO_SPARSE): _cell(28.0, drafted=10, accepted=9),
        (1024, 1, HF): _cell(10.0),
        (4096, 8, PLAIN): _cell(50.0),
        (4096, 8, "sparse_self d1"): _cell(40.0, drafted=10, accepted=5),
    }
    rows = summarise(cells)
    assert [(r.context, r.batch, r.config) for r in rows] == [
        (1024, 1, PLAIN), (1024, 1, "ngram d2"), (1024, 1, "sparse_self d1"), (1024, 1, "sparse_self d2"),
        (1024, 1, AUTO_SPARSE), (1024, 1, HF), (4096, 8, PLAIN), (4096, 8, "sparse_self d1")]
    assert [r.config for r in rows if r.best] == ["sparse_self d2", "sparse_self d1"]
    assert table(rows).splitlines() == [
        "| context | batch | configuration | decode tokens/s | vs plain | TTFT ms | acceptance | tokens/step |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        "| 1K | 1 | plain | 20.0 | 1.00x | 500 | - | 1.10 |",
        "| 1K | 1 | ngram d2 | 25.0 | 1.25x | 500 | 50% | 1.10 |",
        "| 1K | 1 | sparse_self d1 | 24.0 | 1.20x | 500 | 80% | 1.10 |",
        "| 1K | 1 | **sparse_self d2** | 30.0 | 1.50x | 750 | 75% | 1.10 |",
        "| 1K | 1 | auto (sparse_self) | 28.0 | 1.40x | 500 | 90% | 1.10 |",
        "| 1K | 1 | HF generate | 10.0 | 0.50x | 500 | - | 1.10 |",
        "| 4K | 8 | plain | 50.0 | 1.00x | 500 | - | 1.10 |",
        "| 4K | 8 | **sparse_self d1** | 40.0 | 0.80x | 500 | 50% | 1.10 |",
    ]
    assert speedup_lines(rows) == {1024: [(1, pytest.approx(1.5))], 4096: [(8, pytest.approx(0.8))]}
    assert speedup_lines(rows, best_only=False, config=AUTO_SPARSE) == {1024: [(1, pytest.approx(1.4))]}
    # A context that is not a whole number of K, and a cell whose plain decoding did not run, print as such.
    odd = summarise({(512, 2, "sparse_self d1"): _cell(5.0)})
    assert table(odd).splitlines()[-1] == "| 512 | 2 | **sparse_self d1** | 5.0 | - | 500 | - | 1.10 |"


def test_routers_plain_each_depth_auto_and_both_pools_named() -> None:
    plans = router_plans([2, 4], [1, 3], both_pools=False, ngram="h:1", sparse="h:2")
    assert {name: (p.drafts, p.depth) for name, p in plans.items()} == {
        PLAIN: (None, "0"), "ngram d2": ("h:1", "2"), "ngram d4": ("h:1", "4"), "sparse_self d1": ("h:2", "1"),
        "sparse_self d3": ("h:2", "3"), AUTO_SPARSE: ("h:2", "auto")}
    assert plans[PLAIN].kinds == frozenset() and plans["ngram d4"].kinds == {"ngram"}
    assert plans[AUTO_SPARSE].kinds == {"sparse_self"}
    both = router_plans([2], [1], both_pools=True, ngram="127.0.0.1:5001", sparse="127.0.0.1:5002")[AUTO_BOTH]
    assert (both.drafts, both.depth) == ("ngram=127.0.0.1:5001,sparse_self=127.0.0.1:5002", "auto")
    assert both.kinds == {"ngram", "sparse_self"}


def test_rounds_send_whole_batches() -> None:
    assert [rounds_for(2, b) for b in (1, 2, 8, 16)] == [2, 1, 1, 1]
    assert rounds_for(20, 8) == 3
    # The time left weighs a 7K-token cell by its attention too: more than 7 times a 1K-token cell of as many requests.
    assert cell_work(7168, 16) / cell_work(1024, 16) == pytest.approx(7 * (1 + 7168 / 6000) / (1 + 1024 / 6000))


def test_hf_and_plain_decoding_are_compared_up_to_the_end_of_sequence() -> None:
    assert agreement_until_eos([5, 6, 2, 9], [5, 6, 7, 8], eos_ids={2})  # HF suppressed EOS, we went past it
    assert not agreement_until_eos([5, 6, 2], [5, 7, 2], eos_ids={2})
    assert agreement_until_eos([5, 6], [5, 6], eos_ids=set())


def test_a_chats_next_turn_extends_the_last_turns_sequence() -> None:
    from bench.chat_turns import next_user_turn

    tokenizer = CharTokenizer()
    first = chat_frame(tokenizer, "Sum up.").wrap(encode("def f(): pass"), 46)
    answer = encode("It passes.")
    follow_up = next_user_turn(tokenizer, "Why?")
    assert chars(follow_up) == "</assistant><user>Why?</user><assistant>"
    whole = tokenizer.apply_chat_template([{"role": "user", "content": "def f(): pass\n\nSum up."},
                                           {"role": "assistant", "content": "It passes."},
                                           {"role": "user", "content": "Why?"}], add_generation_prompt=True,
                                          tokenize=False)
    assert chars(first + answer + follow_up) == whole
