"""The router's gRPC client of a target service: `Verify` with the library's values in and out.

Step after step the requests go over one `VerifyStream` call (`router.grpc_link.CallStream`); each is its own `Verify`
call where an interceptor works per call (`streams_through`), or where the target has no `VerifyStream`."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from router.grpc_link import GrpcLink, delta_to_proto, streams_through
from specfleet.protos import session_pb2, target_pb2, target_pb2_grpc
from specfleet.speculation import Proposal, SessionReply, TopK, Verdict, VerifyAsk
from specfleet.wire import sampling_to_proto


class GrpcTargetLink(GrpcLink):
    def __init__(self, address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        super().__init__(address, target_pb2_grpc.TargetServiceStub, interceptors)
        self.verifies = self.stream(self.stub.VerifyStream) if streams_through(interceptors) else None

    async def verify(self, asks: list[VerifyAsk], timeout_s: float) -> SessionReply[Verdict]:
        request = target_pb2.VerifyRequest(entries=[_entry(a) for a in asks])
        response = await self.exchange(self.verifies, self.stub.Verify, request, timeout_s)
        reply = SessionReply[Verdict]({}, {}, [], response.compute_ms, response.draining)
        for v in response.verdicts:
            if v.status == session_pb2.ENTRY_STATUS_UNKNOWN_SEQUENCE:
                reply.unknown.append(v.seq_id)
                continue
            next_proposal = None
            if v.next_draft_tokens:
                next_proposal = Proposal(tuple(v.next_draft_tokens), tuple(
                    TopK(tuple(d.token_ids), tuple(d.probs)) for d in v.next_draft_top_k))
            reply.answers[v.seq_id] = Verdict(tuple(v.tokens), v.accepted, tuple(v.accepted_nodes), next_proposal)
            reply.cached_len[v.seq_id] = v.cached_len
        return reply


def _entry(ask: VerifyAsk) -> target_pb2.VerifyEntry:
    delta, proposal = ask.delta, ask.proposal
    entry = target_pb2.VerifyEntry(sequence=delta_to_proto(delta.seq_id, delta.rollback_to, delta.new_tokens),
                                   sampling=sampling_to_proto(ask.sampling), seed=ask.seed)
    if proposal is not None:
        entry.draft_next = proposal.draft_next
        entry.draft_tokens.extend(proposal.tokens)
        entry.draft_top_k.extend(session_pb2.TokenDistribution(token_ids=d.token_ids, probs=d.probs)
                                 for d in proposal.draft_top_k)
        if proposal.parents is not None:
            entry.draft_parents.extend(proposal.parents)
    return entry
