"""The adapters cachequant knows: the built-in families and those registered by user code."""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .families import FAMILIES
from .transformer import TRANSFORMER, TransformerDescription
from .unet import UNET2D, UNET2D_CONDITION

BUILTIN = (UNET2D, UNET2D_CONDITION, TRANSFORMER) + tuple(d.adapter() for d in FAMILIES)
_USER: list[Adapter] = []


def register(adapter: Adapter | TransformerDescription) -> Adapter:
    """Makes cachequant accept the denoiser classes ``adapter`` describes (an :class:`Adapter`, or
    a :class:`TransformerDescription`). A class registered here takes precedence over a built-in
    description of it, and the latest registration over earlier ones."""
    if isinstance(adapter, TransformerDescription):
        adapter = adapter.adapter()
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register takes an Adapter or a TransformerDescription, got {type(adapter).__name__}")
    _USER.insert(0, adapter)
    return adapter


def unregister(adapter: Adapter | TransformerDescription) -> None:
    """Takes back a registration (by the adapter's name)."""
    name = adapter.name
    _USER[:] = [a for a in _USER if a.name != name]


def supported_classes() -> list[str]:
    return [c for a in (*BUILTIN, *_USER) for c in a.classes]


def adapter_for(model: nn.Module) -> Adapter:
    cls = type(model).__name__
    for a in (*_USER, *BUILTIN):
        if cls in a.classes:
            return a
    raise TypeError(
        f"cachequant does not support {cls}. Supported denoisers: {', '.join(supported_classes())}. "
        "A new family is one description (cachequant.models.adapters.register(TransformerDescription(...)))."
    )
