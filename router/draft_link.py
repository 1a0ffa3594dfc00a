"""The router's gRPC client of a draft service: `Propose` with the library's values in and out, over one
`ProposeStream` call step after step as `router.target_link` verifies (a call each where an interceptor works per
call, or the service has no `ProposeStream`)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from router.grpc_link import GrpcLink, delta_to_proto, streams_through
from specfleet.protos import draft_pb2, draft_pb2_grpc, session_pb2
from specfleet.speculation import DraftAsk, Proposal, SessionReply, TopK
from specfleet.wire import sampling_to_proto, tree_shape_to_proto


class GrpcDraftLink(GrpcLink):
    def __init__(self, address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        super().__init__(address, draft_pb2_grpc.DraftServiceStub, interceptors)
        self.proposals = self.stream(self.stub.ProposeStream) if streams_through(interceptors) else None

    async def propose(self, asks: list[DraftAsk], timeout_s: float) -> SessionReply[Proposal]:
        request = draft_pb2.ProposeRequest(entries=[
            draft_pb2.ProposeEntry(
                sequence=delta_to_proto(a.delta.seq_id, a.delta.rollback_to, a.delta.new_tokens),
                depth=a.plan.levels, sampling=sampling_to_proto(a.sampling), seed=a.seed,
                tree=tree_shape_to_proto(a.plan.tree, a.plan.tree.nodes) if a.plan.tree is not None else None)
            for a in asks])
        response = await self.exchange(self.proposals, self.stub.Propose, request, timeout_s)
        reply = SessionReply[Proposal]({}, {}, [], response.compute_ms)
        for p in response.proposals:
            if p.status == session_pb2.ENTRY_STATUS_UNKNOWN_SEQUENCE:
                reply.unknown.append(p.seq_id)
                continue
            reply.answers[p.seq_id] = Proposal(
                tuple(p.tokens), tuple(TopK(tuple(d.token_ids), tuple(d.probs)) for d in p.draft_top_k),
                tuple(p.parents) if p.parents else None)
            reply.cached_len[p.seq_id] = p.cached_len
        return reply
