"""The adapters cachequant knows: the built-in families and those registered by user code."""

from __future__ import annotations

from torch import nn

from .base import Adapter
from .transformer import TRANSFORMER
from .unet import UNET2D, UNET2D_CONDITION

BUILTIN = (UNET2D, UNET2D_CONDITION, TRANSFORMER)
_USER: list[Adapter] = []


def register(adapter: Adapter) -> Adapter:
    """Makes cachequant accept the denoiser classes ``adapter`` describes."""
    _USER.append(adapter)
    return adapter


def supported_classes() -> list[str]:
    return [c for a in (*BUILTIN, *_USER) for c in a.classes]


def adapter_for(model: nn.Module) -> Adapter:
    cls = type(model).__name__
    for a in (*_USER, *BUILTIN):
        if cls in a.classes:
            return a
    raise TypeError(
        f"cachequant does not support {cls}. Supported denoisers: {', '.join(supported_classes())}. "
        "A new family is one Adapter description (cachequant.models.adapters.register)."
    )
