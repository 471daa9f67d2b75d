"""Architecture adapters: one description per family of denoisers."""

from .base import Adapter
from .families import FAMILIES, FLUX, SANA, SD3, WAN
from .registry import BUILTIN, adapter_for, register, supported_classes, unregister
from .transformer import DIT_PIXART, BlockStack, TransformerDescription

__all__ = [
           "BUILTIN",
           "DIT_PIXART",
           "FAMILIES",
           "FLUX",
           "SANA",
           "SD3",
           "WAN",
           "Adapter",
           "BlockStack",
           "TransformerDescription",
           "adapter_for",
           "register",
           "supported_classes",
           "unregister",
]
