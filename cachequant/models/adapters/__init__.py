"""Architecture adapters: one description per family of denoisers."""

from .base import Adapter
from .registry import BUILTIN, adapter_for, register, supported_classes

__all__ = ["Adapter", "BUILTIN", "adapter_for", "register", "supported_classes"]
