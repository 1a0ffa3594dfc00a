"""Drafters behind one interface: ``model`` (a small LM), ``ngram`` (prompt lookup), ``llamacpp`` (a GGUF model
run by llama.cpp; `specfleet.drafters.llamacpp`, imported on its own: llama-cpp-python is an optional extra) and
``sparse_self`` (the target's own weights over a sink + window cache; `specfleet.drafters.sparse_self`)."""

from specfleet.drafters.base import Drafter, DraftRequest, DraftResult
from specfleet.drafters.ngram import NgramDrafter, find_continuation

__all__ = ["DraftRequest", "DraftResult", "Drafter", "NgramDrafter", "find_continuation"]
