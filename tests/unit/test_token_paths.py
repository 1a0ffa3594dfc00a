from specfleet.token_paths import common_prefix_length


def test_common_prefix_length_counts_the_shared_leading_tokens_up_to_the_limit() -> None:
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4, 5]) == 3
    assert common_prefix_length((5, 6), (7, 6)) == 0
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 3, 4], limit=2) == 2
    assert common_prefix_length([1, 2, 3, 4], [1, 9, 3, 4], limit=3) == 1
    assert common_prefix_length([1, 2], [1, 2], limit=0) == 0
    assert common_prefix_length((1, 2, 3), [1, 2, 4]) == 2  # a tuple beside a list
