"""Diffusion transformers as a short description: Δ-cache of a block span, quantized Linear layers.

A :class:`TransformerDescription` says which ``nn.ModuleList``\\ s hold the blocks (a
:class:`BlockStack` each, in execution order), which block arguments carry token streams (one,
``hidden_states``, for DiT / PixArt / Sana / Wan; two, image and text tokens, for the joint blocks
of Flux and SD3) and how a block returns them, where conditioning enters (checked against the
blocks' signatures), the first and last layers (kept at 8-bit weights under 4-bit weights) and the
modulation layers kept in float. :meth:`TransformerDescription.adapter` turns it into the
:class:`~cachequant.models.adapters.base.Adapter` that caching, calibration and quantization use.

Caching: blocks are counted over the stacks in order, and a full call of the span ``[start, end)``
stores the deviation ``h_end − h_start`` it adds to each stream; a cached call skips the span and
adds the stored deviation (after the cache-DEC correction, per hidden channel and stream) to the
span's fresh input. The default span keeps the first and the last block live — like DeepCache's
shallow branch, the cheap outer blocks see the current input while the deep middle is reused
(Δ-DiT / CacheQuant cache "the deviation between two blocks").
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from ...cache.hooks import CacheLayout, block_params
from .base import Adapter


@dataclass(frozen=True)
class BlockStack:
    """One list of blocks of the model, called one after another by the model's forward."""
    path: str
    """Module path of the ``nn.ModuleList`` (``"transformer_blocks"``, ``"single_transformer_blocks"``)."""
    streams: tuple[str, ...] = ("hidden_states",)
    """Block parameters that carry token streams: a block reads them and returns their new values
    (passed by keyword or by position; the position is read from the block's ``forward``)."""
    returns: tuple[str, ...] | None = None
    """The order of the streams in the tuple a block returns (FluxTransformerBlock:
    ``("encoder_hidden_states", "hidden_states")``); None: the block returns its one stream."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"BlockStack.path must name a module list, got {self.path!r}")
        if isinstance(self.streams, str) or not self.streams or not all(isinstance(s, str) for s in self.streams):
            raise ValueError(f"BlockStack.streams must be a tuple of parameter names, got {self.streams!r}")
        if self.returns is None and len(self.streams) > 1:
            raise ValueError(f"{self.path}: blocks with several streams {self.streams} return a tuple; "
                             "say its order in BlockStack.returns")
        if self.returns is not None and sorted(self.returns) != sorted(self.streams):
            raise ValueError(f"{self.path}: returns {self.returns} must name the streams {self.streams} in the "
                             "order the block returns them")


@dataclass(frozen=True)
class TransformerDescription:
    """What cachequant needs to know about one family of diffusion transformers."""
    name: str
    classes: tuple[str, ...]
    """Denoiser class names this description applies to (``type(model).__name__``)."""
    stacks: tuple[BlockStack, ...]
    """The block lists, in the order the model runs them."""
    conditioning: tuple[str, ...] = ()
    """Block parameters through which conditioning enters (timestep embedding, text tokens read by
    cross-attention...): read, never cached. Checked against the blocks' ``forward``."""
    first_layers: tuple[str, ...] = ()
    """The layers reading the model input (patch embedding); kept at 8-bit weights."""
    last_layers: tuple[str, ...] = ()
    """Candidates for the output projection, the first one the model has is kept at 8-bit weights
    (DiT has ``proj_out_2``, PixArt ``proj_out``)."""
    float_layers: tuple[str, ...] = ()
    """``fnmatch`` patterns of Linear / Conv2d layers kept in float (the adaLN modulation)."""
    channel_dim: int = 2
    """Hidden-channel axis of the streams: tokens are (batch, tokens, channels)."""

    def __post_init__(self) -> None:
        if isinstance(self.classes, str) or not self.classes:
            raise ValueError(f"{self.name}: classes must be a tuple of class names, got {self.classes!r}")
        if not self.stacks or not all(isinstance(s, BlockStack) for s in self.stacks):
            raise TypeError(f"{self.name}: stacks must be a tuple of BlockStack, got {self.stacks!r}")
        for name in ("conditioning", "first_layers", "last_layers", "float_layers"):
            if isinstance(getattr(self, name), str):
                raise ValueError(f"{self.name}: {name} must be a tuple of names, not a string")

    # -- the model's blocks --------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[tuple[str, BlockStack]]:
        """(module name, stack) of every block, in execution order."""
        out = []
        for stack in self.stacks:
            try:
                blocks = model.get_submodule(stack.path)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no module {stack.path!r} (described by "
                                 f"{self.name})") from None
            if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                raise ValueError(f"{stack.path} of {type(model).__name__} is a {type(blocks).__name__}, not a list of "
                                 "blocks")
            out += [(f"{stack.path}.{i}", stack) for i in range(len(blocks))]
        return out

    def check(self, model: nn.Module, chosen: list[tuple[str, BlockStack]]) -> None:
        """Early, clear errors for a description that does not fit the model: every stream must be
        a parameter of its blocks' ``forward``, every conditioning parameter of some stack's."""
        for name, stack in chosen:
            params = block_params(model.get_submodule(name))
            missing = [p for p in stack.streams if p not in params]
            if missing:
                raise ValueError(f"{self.name}: the blocks of {stack.path} have no parameter {', '.join(missing)} "
                                 f"(their forward takes {', '.join(params)})")
        known = set()
        for stack in self.stacks:
            blocks = model.get_submodule(stack.path)
            if len(blocks):
                known |= set(block_params(blocks[0]))
        missing = [p for p in self.conditioning if p not in known]
        if missing:
            raise ValueError(f"{self.name}: no block of {type(model).__name__} takes the conditioning parameter(s) "
                             f"{', '.join(missing)}")

    # -- the adapter's parts -------------------------------------------------------------------
    def resolve_site(self, model: nn.Module, config) -> dict:
        blocks = self.blocks(model)
        n = len(blocks)
        span = getattr(config, "dit_span", None)
        start, end = (1, n - 1) if span is None else (int(span[0]), int(span[1]))
        if not 0 <= start < end <= n:
            raise ValueError(
                f"dit_span must satisfy 0 <= start < end <= {n} (this model has {n} transformer blocks), "
                f"got ({start}, {end})" + ("; use a model with at least 3 blocks or set dit_span" if span is None else ""))
        chosen = blocks[start:end]
        streams = {s.streams for _, s in chosen}
        if len(streams) > 1:
            raise ValueError(f"dit_span ({start}, {end}) mixes blocks with different streams "
                             f"({' / '.join(map(str, sorted(streams)))}); choose a span within blocks of one kind")
        self.check(model, chosen)
        return {"span": [start, end], "feature": _describe(chosen) + " deviation"}

    def layout(self, model: nn.Module, site: dict) -> CacheLayout:
        start, end = site["span"]
        chosen = self.blocks(model)[start:end]
        names = tuple(n for n, _ in chosen)
        returns = tuple(s.returns for _, s in chosen)
        return CacheLayout("transformer", names, boundary=names[0], channel_dim=self.channel_dim,
                           streams=chosen[0][1].streams, returns=() if all(r is None for r in returns) else returns)

    def keep_8bit(self, model: nn.Module) -> set[str]:
        layers = _quantizable(model)
        out = {n for n in self.first_layers if n in layers}
        last = next((n for n in self.last_layers if n in layers), None)
        return out | ({last} if last else set())

    def keep_float(self, model: nn.Module) -> set[str]:
        return {n for n in _quantizable(model) if any(fnmatchcase(n, p) for p in self.float_layers)}

    def adapter(self) -> Adapter:
        return Adapter(name=self.name, classes=tuple(self.classes), cache_kind="transformer",
                       resolve_site=self.resolve_site, layout=self.layout, keep_8bit=self.keep_8bit,
                       concat_splits=_none, cache_consumers=_none, keep_float=self.keep_float)


def _quantizable(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _describe(chosen: list[tuple[str, BlockStack]]) -> str:
    """``transformer_blocks[1:3]`` (one stack) or ``transformer_blocks[1:2] + single_transformer_blocks[0:2]``."""
    parts: dict[str, list[int]] = {}
    for name, stack in chosen:
        parts.setdefault(stack.path, []).append(int(name.rsplit(".", 1)[1]))
    return " + ".join(f"{p}[{ix[0]}:{ix[-1] + 1}]" for p, ix in parts.items())


def _none(model, site: dict) -> dict[str, int]:
    return {}


DIT_PIXART = TransformerDescription(
    name="transformer2d", classes=("DiTTransformer2DModel", "PixArtTransformer2DModel"),
    stacks=(BlockStack("transformer_blocks"),),
    conditioning=("timestep", "class_labels", "encoder_hidden_states"),
    first_layers=("pos_embed.proj",), last_layers=("proj_out_2", "proj_out"),
    # the shipped DiT plans and the measured results quantize the adaLN layers: kept that way
    float_layers=(),
)
TRANSFORMER = DIT_PIXART.adapter()
