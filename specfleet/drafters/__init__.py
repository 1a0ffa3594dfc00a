"""Drafters behind one interface: ``model`` (a small LM) and ``ngram`` (prompt lookup)."""

from specfleet.drafters.base import Drafter, DraftRequest, DraftResult
from specfleet.drafters.ngram import NgramDrafter, find_continuation

__all__ = ["DraftRequest", "DraftResult", "Drafter", "NgramDrafter", "find_continuation"]
