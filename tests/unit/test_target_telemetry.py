"""What a target service tells the fleet's cost model of its verifies: batch, tokens per sequence, context, and, for
a ragged call, its widest sequence's tokens (the target pads attention to its widest rows, so the cost model files
such a call under more tokens than its mean, `CostSample.priced_tokens`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from step_fakes import RecordedTelemetry

from router.target_link import GrpcTargetLink
from specfleet.config import TargetConfig
from specfleet.engine import ModelRunner
from specfleet.protos import target_pb2_grpc
from specfleet.sampling_params import SamplingParams
from specfleet.speculation import Proposal, SessionDelta, VerifyAsk
from target_service.server import TargetServicer
from target_service.verifier import Verifier

GREEDY = SamplingParams()


def test_a_ragged_verify_reports_its_widest_sequence_and_a_uniform_one_does_not(tiny_model: Path) -> None:
    runner = ModelRunner.from_folder(tiny_model, num_slots=4, max_seq_len=64, device="cpu")
    telemetry = RecordedTelemetry()
    servicer = TargetServicer(TargetConfig(), Verifier(runner), fingerprint="", eos_ids=[], telemetry=telemetry)

    def ask(seq_id: str, rollback_to: int, new_tokens: list[int], drafts: list[int]) -> VerifyAsk:
        proposal = Proposal(tuple(drafts)) if drafts else None
        return VerifyAsk(SessionDelta(seq_id, rollback_to, new_tokens), proposal, GREEDY, 0)

    async def scenario() -> None:
        server = grpc.aio.server()
        target_pb2_grpc.add_TargetServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        link = GrpcTargetLink(f"127.0.0.1:{port}", [])
        try:
            first = await link.verify([ask("a", 0, [5, 6, 7, 8], []), ask("b", 0, [9, 10, 11, 12], [])], 10)
            a, b = first.answers["a"].tokens, first.answers["b"].tokens
            # a drafts 3 tokens, b none: rows of 4 and 1 tokens.
            ragged = await link.verify([ask("a", 4, a, [1, 2, 3]), ask("b", 4, b, [])], 10)
            a2, b2 = ragged.answers["a"].tokens, ragged.answers["b"].tokens
            # both draft 2: rows of 1 + 2 (a rejected draft leaves one new token to send).
            await link.verify([ask("a", 5 + len(a2) - 1, a2[-1:], [3, 4]),
                               ask("b", 5, b2[-1:], [3, 4])], 10)
        finally:
            await link.close()
            await server.stop(0)

    asyncio.run(scenario())
    first, ragged, uniform = telemetry.samples
    assert (first.batch_size, first.tokens_per_seq, first.widest) == (2, 4.0, None)
    assert (ragged.tokens_per_seq, ragged.widest, ragged.context) == (2.5, 4.0, 5.0)
    assert (uniform.tokens_per_seq, uniform.widest) == (3.0, None)
