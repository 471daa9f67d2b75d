"""Architecture adapters; importing this package registers all of them."""

from . import transformer, unet  # noqa: F401  (registration side effect)
from .base import Adapter, adapter_for, denoiser_of, supported_classes

__all__ = ["Adapter", "adapter_for", "denoiser_of", "supported_classes"]
