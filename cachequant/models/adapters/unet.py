"""UNets (``UNet2DModel``, ``UNet2DConditionModel``): DeepCache-style caching of the deep path.

A cached call runs only the shallow path: ``conv_in``, the down layers whose skip features the
live up layers read, the last ``layers`` up layers (a resnet and, where the block has one, its
attention; plus their blocks' upsamplers) and the output head. Every other resnet, attention,
down/upsampler and the mid block returns what it returned on the last full call (see
:mod:`cachequant.cache.hooks`); the cached feature is the output of the last of them, which the
first live up layer reads. One live layer (SD's default) is DeepCache's shallowest branch and the
reference's LDM/SD site; whole up blocks (``cache_branch``) are the coarser sites.

The live up layers read the first ``layers`` skip features — conv_in's output and the first
``layers − 1`` down *units* (a resnet with its attention, or a downsampler) — because the up path
pops the skip features in reverse order.
"""

from __future__ import annotations

from torch import nn

from ...cache.hooks import CacheLayout
from .base import Adapter


def _down_units(model: nn.Module) -> list[list[str]]:
    """Each down unit's modules, in execution order (the units that emit one skip feature each)."""
    units = []
    for j, blk in enumerate(model.down_blocks):
        attns = getattr(blk, "attentions", None)
        for i in range(len(blk.resnets)):
            units.append([f"down_blocks.{j}.resnets.{i}"] + ([f"down_blocks.{j}.attentions.{i}"] if attns else []))
        if getattr(blk, "downsamplers", None) is not None:
            units.append([f"down_blocks.{j}.downsamplers.{k}" for k in range(len(blk.downsamplers))])
    return units


def _up_layers(model: nn.Module) -> list[tuple[list[str], list[str]]]:
    """Per up layer: its modules, and the upsamplers that run after it (its block's, if last)."""
    layers = []
    for j, blk in enumerate(model.up_blocks):
        attns = getattr(blk, "attentions", None)
        n = len(blk.resnets)
        ups = [f"up_blocks.{j}.upsamplers.{k}" for k in range(len(blk.upsamplers))] \
            if getattr(blk, "upsamplers", None) is not None else []
        for i in range(n):
            mods = [f"up_blocks.{j}.resnets.{i}"] + ([f"up_blocks.{j}.attentions.{i}"] if attns else [])
            layers.append((mods, ups if i == n - 1 else []))
    return layers


def _split_up(model: nn.Module, layers: int) -> tuple[int, int]:
    """(j, i): the first of the last ``layers`` up layers is layer ``i`` of up block ``j``."""
    left = layers
    for j in range(len(model.up_blocks) - 1, -1, -1):
        n = len(model.up_blocks[j].resnets)
        if left <= n:
            return j, n - left
        left -= n
    raise ValueError(f"this UNet has fewer than {layers} up layers")


def _block_layers(model: nn.Module, branch: int) -> int:
    """Up layers in the last ``branch`` up blocks."""
    return sum(len(b.resnets) for b in list(model.up_blocks)[-branch:])


def _resolve_site(model: nn.Module, config) -> dict:
    """``cache_layers=R`` runs the last R up layers; ``cache_branch=b`` the last b up blocks.
    Neither: one layer for ``UNet2DConditionModel`` (DeepCache's shallowest branch, the reference's
    SD site), the whole last up block for ``UNet2DModel`` (the reference's CIFAR site)."""
    n_up, n_down = len(model.up_blocks), len(model.down_blocks)
    if n_up != n_down:
        raise ValueError(f"cachequant needs a symmetric UNet; this one has {n_down} down and {n_up} up blocks")
    for b in list(model.down_blocks) + list(model.up_blocks):
        if hasattr(b, "skip_conv"):
            raise ValueError(f"{type(b).__name__} (skip-sample blocks) are not supported by the cache yet")
    total = sum(len(b.resnets) for b in model.up_blocks)
    branch, layers = config.cache_branch, config.cache_layers  # CacheQuantConfig refuses both set
    if layers is None and branch is None and type(model).__name__ == "UNet2DConditionModel":
        layers = 1
    if layers is None:
        branch = 1 if branch is None else int(branch)
        if not 1 <= branch < n_up:
            raise ValueError(f"cache_branch must be in [1, {n_up - 1}] for this UNet ({n_up} up blocks), got {branch}")
        layers = _block_layers(model, branch)
    layers = int(layers)
    if not 1 <= layers < total:
        raise ValueError(f"cache_layers must be in [1, {total - 1}] for this UNet ({total} up layers), got {layers}")
    if layers - 1 > len(_down_units(model)):
        raise ValueError(f"cache_layers={layers} needs {layers - 1} down units, this UNet has {len(_down_units(model))}")
    return {"layers": layers, "feature": _layout(model, {"layers": layers}).boundary}


def _layout(model: nn.Module, site: dict) -> CacheLayout:
    layers = int(site["layers"])
    down = _down_units(model)
    up = _up_layers(model)
    skipped = [m for unit in down[layers - 1:] for m in unit]
    if getattr(model, "mid_block", None) is not None:
        skipped.append("mid_block")
    for mods, ups in up[: len(up) - layers]:
        skipped += mods + ups
    return CacheLayout("unet", tuple(skipped), boundary=skipped[-1], channel_dim=1)


def _keep_8bit(model) -> set[str]:
    return {"conv_in", "conv_out"}


def _concat_splits(model, site: dict) -> dict[str, int]:
    """Up-block resnets read cat([hidden, skip]); the hidden part comes first."""
    if model.mid_block is not None:
        prev = model.mid_block.resnets[-1].out_channels
    else:
        prev = model.down_blocks[-1].resnets[-1].out_channels
    out: dict[str, int] = {}
    for j, blk in enumerate(model.up_blocks):
        h = prev
        for i, rn in enumerate(blk.resnets):
            if rn.in_channels > h:
                for layer in ("conv1", "conv_shortcut"):
                    if getattr(rn, layer, None) is not None:
                        out[f"up_blocks.{j}.resnets.{i}.{layer}"] = h
            h = rn.out_channels
        prev = blk.resnets[-1].out_channels
    return out


def _cache_consumers(model, site: dict) -> dict[str, int]:
    j, i = _split_up(model, int(site["layers"]))
    prefix = f"up_blocks.{j}.resnets.{i}."
    return {k: v for k, v in _concat_splits(model, site).items() if k.startswith(prefix)}


def _unet_adapter(name: str, cls: str) -> Adapter:
    return Adapter(name=name, classes=(cls,), cache_kind="unet", resolve_site=_resolve_site, layout=_layout,
                   keep_8bit=_keep_8bit, concat_splits=_concat_splits, cache_consumers=_cache_consumers)


UNET2D = _unet_adapter("unet2d", "UNet2DModel")
UNET2D_CONDITION = _unet_adapter("unet2d-condition", "UNet2DConditionModel")
