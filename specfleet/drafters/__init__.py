"""Drafters behind one interface: ``model`` (a small LM) and ``ngram`` (prompt lookup)."""

from specfleet.drafters.base import Drafter, DraftRequest, DraftResult
from specfleet.drafters.ngram import NgramDrafter, find_continuation

DRAFTER_KINDS = ("ngram", "model")

__all__ = ["DRAFTER_KINDS", "DraftRequest", "DraftResult", "Drafter", "NgramDrafter", "find_continuation"]
