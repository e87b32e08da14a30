"""The generation engine's parts: a slot KV cache, the attention mask over slots, the mixed pass
(`engine.mixed`: decoding rows and rows reading a tool result in one forward), and the
static-shape decoding step. `arpo_ref.engine.generation.Generator` puts them together."""

from .forward import DecodeStep, SlotForward, slot_mask
from .kv_cache import ForwardPlan, SlotCache, SlotLayer

__all__ = ["DecodeStep", "ForwardPlan", "SlotCache", "SlotForward", "SlotLayer", "slot_mask"]
