"""The model executor shared by the draft and target services: our Llama-family forward over a
slot KV cache, with sequences addressed as sessions."""

from specfleet.engine.kv_cache import CacheFullError, SlotKVCache
from specfleet.engine.llama import LlamaForCausalLM, ModelConfig
from specfleet.engine.runner import Extend, ModelRunner, TreeExtend, UnknownSequenceError

__all__ = ["CacheFullError", "Extend", "LlamaForCausalLM", "ModelConfig", "ModelRunner", "SlotKVCache",
           "TreeExtend", "UnknownSequenceError"]
