"""Conversions between protobuf messages and the library's plain records (the transport layer).

Free of torch, so that the router imports it without loading torch: the tensor conversions of the wire's
top-K pairs (``draft_top_k``) live with the services that hold the tensors (`draft_service.server`,
`target_service.server`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from specfleet.placement import compute_cores, host_name
from specfleet.protos import draft_pb2, generate_pb2, session_pb2
from specfleet.sampling_params import SamplingParams
from specfleet.trees.shapes import ROOT_PARENT, TreeShape

if TYPE_CHECKING:
    import torch


def sampling_from_proto(msg: generate_pb2.SamplingParameters) -> SamplingParams:
    """Raises ValueError (with the field's name) for out-of-range values."""
    return SamplingParams(
        temperature=msg.temperature if msg.HasField("temperature") else 0.0,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
    )


def sampling_to_proto(params: SamplingParams) -> generate_pb2.SamplingParameters:
    return generate_pb2.SamplingParameters(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)


def delta_fields(delta: session_pb2.SequenceDelta) -> tuple[str, int, list[int]]:
    if not delta.seq_id:
        raise ValueError("seq_id is empty")
    return delta.seq_id, delta.rollback_to, list(delta.new_tokens)


def validate_tokens(tokens: Sequence[int], vocab_size: int, what: str) -> None:
    if vocab_size and tokens and max(tokens) >= vocab_size:
        raise ValueError(f"{what}: token id {max(tokens)} is outside the vocabulary of {vocab_size}")


def info_response(*, model: str, kind: str, vocab_size: int, fingerprint: str, max_seq_len: int, num_slots: int,
                  live: int, eos_ids: Sequence[int] = (), draining: bool = False, max_draft_next: int = 0,
                  self_drafting: str = "", draft_next_width: int = 0, chains_only: bool = False,
                  on_cpu: bool = False) -> session_pb2.GetServiceInfoResponse:
    """``on_cpu``: the service computes on the CPU, so it reports its cores (`specfleet.placement`)."""
    return session_pb2.GetServiceInfoResponse(
        model=model, kind=kind, vocab_size=vocab_size, tokenizer_fingerprint=fingerprint, max_seq_len=max_seq_len,
        num_slots=num_slots, live_sequences=live, eos_token_ids=list(eos_ids), draining=draining,
        max_draft_next=max_draft_next, self_drafting=self_drafting, draft_next_width=draft_next_width,
        chains_only=chains_only, host=host_name(), cpus=list(compute_cores(on_cpu)))


_METHODS = {"rsd-c": draft_pb2.TREE_METHOD_RSD_C, "rsd-s": draft_pb2.TREE_METHOD_RSD_S,
            "iid": draft_pb2.TREE_METHOD_IID, "duo": draft_pb2.TREE_METHOD_DUO}


def tree_shape_to_proto(shape: TreeShape, max_nodes: int = 0) -> draft_pb2.TreeShape:
    return draft_pb2.TreeShape(method=_METHODS[shape.method], branching=list(shape.branching),
                               beam_width=shape.beam_width, max_nodes=max_nodes)


def tree_shape_from_proto(msg: draft_pb2.TreeShape, depth: int) -> tuple[TreeShape, int]:
    """(shape, max_nodes) of a Propose entry's tree; ``depth`` is the entry's, the tree's levels for RSD-S.
    Raises ValueError for a malformed shape."""
    methods = {v: k for k, v in _METHODS.items()}
    if msg.method not in methods:
        raise ValueError(f"tree.method must be TREE_METHOD_RSD_C, _RSD_S, _IID or _DUO, got {msg.method}")
    method = methods[msg.method]
    if method == "rsd-s":
        return TreeShape(method, beam_width=msg.beam_width, depth=max(depth, 1)), msg.max_nodes
    return TreeShape(method, tuple(msg.branching)), msg.max_nodes


def validate_parents(parents: Sequence[int], nodes: int, what: str) -> None:
    """A tree's parent list: one per node, each ROOT_PARENT (the root) or an earlier node."""
    if len(parents) != nodes:
        raise ValueError(f"{what}: {nodes} nodes but {len(parents)} parents")
    for j, parent in enumerate(parents):
        if not ROOT_PARENT <= parent < j:
            raise ValueError(f"{what}: node {j} has parent {parent}; each must be {ROOT_PARENT} or an earlier node")


def is_chain(parents: Sequence[int]) -> bool:
    """Whether a tree is a chain (each node the child of the one before, the first the root's): it then
    travels as a chain."""
    return all(parent == (j - 1 if j else ROOT_PARENT) for j, parent in enumerate(parents))


def top_k_to_proto(draft_top_k: tuple[torch.Tensor, torch.Tensor] | None) -> list[session_pb2.TokenDistribution]:
    """Draft tokens' top-K pairs (ids [n, K], probs [n, K]) as the wire's distributions; none for greedy ones."""
    if draft_top_k is None:
        return []
    ids, probs = draft_top_k
    return [session_pb2.TokenDistribution(token_ids=i, probs=p)
            for i, p in zip(ids.tolist(), probs.tolist(), strict=True)]
