"""Our own decoder runtime: plain modules, our KV cache, our attention call."""

from .args import ModelArgs, SUPPORTED_ARCHITECTURES
from .transformer import Transformer

__all__ = ["ModelArgs", "SUPPORTED_ARCHITECTURES", "Transformer"]
