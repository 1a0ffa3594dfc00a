"""The draft and target replicas the router drives, with what it knows about each."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from specfleet.config import DEFAULT_DRAFT_POOL
from specfleet.placement import share_cores

if TYPE_CHECKING:
    from router.ports import DraftLink, TargetLink

log = logging.getLogger("specfleet.router")


@dataclass(frozen=True)
class ReplicaInfo:
    """What a draft or target service says about itself (GetInfo)."""

    model: str  # the model spec it was started with ("" for a model-free drafter)
    kind: str  # "target" or the drafter kind
    vocab_size: int  # 0 for a model-free drafter
    tokenizer_fingerprint: str  # "" for a model-free drafter: it works with any tokenizer
    max_seq_len: int  # the longest sequence it can hold (0: no limit)
    num_slots: int
    live_sequences: int = 0
    eos_token_ids: tuple[int, ...] = ()
    draining: bool = False  # shutting down: it takes no new sequences
    max_draft_next: int = 0  # a self-drafting target: the most next-step drafts a sequence may ask for (0: none)
    self_drafting: str = ""  # how it drafts them ("space", "lookahead", "ngram"), "" when it does not
    draft_next_width: int = 0  # positions its step adds to each verify whatever it drafts (a lookahead chain)
    chains_only: bool = False  # a target that verifies draft chains, not trees (the llamacpp backend)
    host: str = ""  # the machine it runs on ("": not said)
    cpus: tuple[int, ...] = ()  # the CPU cores it computes on; none where it computes on an accelerator

    def shares_cores_with(self, other: ReplicaInfo) -> bool:
        """Whether the two compute on some of the same CPU cores of one machine (`specfleet.placement`)."""
        return share_cores(self.host, self.cpus, other.host, other.cpus)


class ReplicaError(Exception):
    """A call to a replica failed (unreachable, timed out, or refused): ``code`` is the gRPC status's name."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class ReplicaGone(Exception):
    """The replica's channel was closed: it left the pool since the call was planned."""


class TargetLost(Exception):
    """A target stopped answering (unreachable, refusing new calls while it drains, or past the Verify deadline).
    Its step loop ends without committing the step, and its sequences move to the other targets."""

    def __init__(self, address: str, error: ReplicaError) -> None:
        super().__init__(f"target {address} stopped answering: {error}")
        self.address, self.error = address, error


@dataclass
class TargetReplica:
    address: str
    link: TargetLink
    info: ReplicaInfo | None = None
    draining: bool = False  # its replies say it is shutting down: new requests go elsewhere


@dataclass
class DraftReplica:
    address: str
    link: DraftLink
    info: ReplicaInfo | None = None
    assigned: int = 0  # live sequences pinned here
    pool: str = DEFAULT_DRAFT_POOL  # the draft pool it serves (`RouterConfig.draft_pools`)
    unavailable_until: float = 0.0
    last_error: str = field(default="", repr=False)


    @property
    def available(self) -> bool:
        return time.monotonic() >= self.unavailable_until

    def mark_failed(self, error: str, retry_after_s: float) -> None:
        if self.available:
            log.warning("draft %s failed (%s): its sequences run at depth 0 for %.1f s", self.address, error,
                        retry_after_s)
        self.unavailable_until = time.monotonic() + retry_after_s
        self.last_error = error

    def mark_ok(self) -> None:
        if self.last_error:
            log.info("draft %s is answering again", self.address)
            self.last_error = ""


def check_compatible(targets: list[TargetReplica], drafts: list[DraftReplica]) -> None:
    """Every replica must share the first target's tokenizer; raises ValueError saying which does not."""
    reference = targets[0]
    for replica in [*targets[1:], *drafts]:
        info = replica.info
        if not info.tokenizer_fingerprint:  # a model-free drafter works with any tokenizer
            continue
        if info.tokenizer_fingerprint != reference.info.tokenizer_fingerprint or (
                info.vocab_size != reference.info.vocab_size):
            raise ValueError(
                f"{info.kind} at {replica.address} ({info.model}, vocabulary {info.vocab_size}) does not share the "
                f"tokenizer of the target at {reference.address} ({reference.info.model}, vocabulary "
                f"{reference.info.vocab_size}): every draft and target must use one tokenizer")


async def release_on(link: DraftLink | TargetLink, seq_ids: list[str]) -> None:
    """Frees ``seq_ids`` on one replica. One busy past the call's deadline still frees them after its pass; one that
    fails or has left evicts them later by itself."""
    try:
        await link.release(seq_ids)
    except (ReplicaError, ReplicaGone) as err:
        log.warning("release of %d sequence(s) not confirmed (a busy replica frees them after its pass, a failed one "
                    "evicts them later): %s", len(seq_ids), err)
