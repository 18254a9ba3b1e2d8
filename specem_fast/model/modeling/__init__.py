"""Our own decoder runtime: plain modules, our KV cache, our attention call."""

from specem_fast.model.modeling.args import ModelArgs, SUPPORTED_ARCHITECTURES
from specem_fast.model.modeling.transformer import Transformer

__all__ = ["ModelArgs", "SUPPORTED_ARCHITECTURES", "Transformer"]
