"""The router refuses to start when a draft does not share the target's tokenizer."""

from __future__ import annotations

import pytest

from router.replicas import DraftReplica, ReplicaInfo, TargetReplica, check_compatible


def _info(kind: str, model: str, vocab: int, fingerprint: str) -> ReplicaInfo:
    return ReplicaInfo(model, kind, vocab, fingerprint, max_seq_len=2048, num_slots=8)


def _target(info: ReplicaInfo) -> TargetReplica:
    return TargetReplica("10.0.0.1:50052", link=None, info=info)


def _draft(info: ReplicaInfo) -> DraftReplica:
    return DraftReplica("10.0.0.2:50051", link=None, info=info)


def test_same_tokenizer_and_model_free_drafters_pass() -> None:
    target = _target(_info("target", "qwen2.5-coder-1.5b", 151936, "abc"))
    check_compatible([target], [_draft(_info("draft/model", "qwen2.5-coder-0.5b", 151936, "abc")),
                                _draft(_info("draft/ngram", "", 0, ""))])


@pytest.mark.parametrize("vocab, fingerprint", [(49152, "abc"), (151936, "other")])
def test_mismatched_draft_is_named(vocab: int, fingerprint: str) -> None:
    target = _target(_info("target", "qwen2.5-coder-1.5b", 151936, "abc"))
    draft = _draft(_info("draft/model", "smollm2-135m", vocab, fingerprint))
    with pytest.raises(ValueError, match=r"10\.0\.0\.2:50051 \(smollm2-135m, vocabulary \d+\) does not share"):
        check_compatible([target], [draft])
