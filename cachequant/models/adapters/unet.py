"""UNets (``UNet2DModel``, ``UNet2DConditionModel``): DeepCache-style branch caching.

Full step: the whole UNet runs and the output of up-block ``-(branch+1)`` is stored. Cached step:
only ``conv_in``, the first ``branch`` down blocks (for their skip features), the last ``branch``
up blocks (fed the stored feature, after the cache-DEC correction) and the output head run.
``branch=1`` is DeepCache's shallowest branch, the one the reference work caches for LDM/SD.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ...runtime import Runtime
from .base import Adapter, register


def _resolve_site(model: nn.Module, config) -> dict:
    n_up, n_down = len(model.up_blocks), len(model.down_blocks)
    branch = int(getattr(config, "cache_branch", 1))
    if not 1 <= branch < n_up:
        raise ValueError(f"cache_branch must be in [1, {n_up - 1}] for this UNet ({n_up} up blocks), got {branch}")
    if n_up != n_down:
        raise ValueError(f"cachequant needs a symmetric UNet; this one has {n_down} down and {n_up} up blocks")
    for b in list(model.down_blocks) + list(model.up_blocks):
        if hasattr(b, "skip_conv"):
            raise ValueError(f"{type(b).__name__} (skip-sample blocks) are not supported by the cache yet")
    return {"branch": branch, "feature": f"up_blocks.{n_up - branch - 1}"}


def _install(model: nn.Module, rt: Runtime, site: dict) -> list:
    block = model.up_blocks[-(site["branch"] + 1)]

    def hook(_module, _inp, out):
        if rt.is_full:
            rt.store(out)

    h = block.register_forward_hook(hook)
    return [h.remove]


def _bind(original_forward, args, kwargs) -> dict:
    bound = inspect.signature(original_forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _up_path(model, feature, res, emb, branch, up_kwargs, cond) -> torch.Tensor:
    """Runs the last ``branch`` up blocks on the cached feature, exactly as the full forward does."""
    ups = list(model.up_blocks)[-branch:]
    res = res[: sum(len(b.resnets) for b in ups)]
    sample = feature
    for i, blk in enumerate(ups):
        n = len(blk.resnets)
        r, res = res[-n:], res[:-n]
        if not cond:
            sample = blk(sample, r, emb)
            continue
        is_final = i == len(ups) - 1
        upsample_size = res[-1].shape[2:] if (not is_final and up_kwargs["forward_upsample_size"]) else None
        if getattr(blk, "has_cross_attention", False):
            sample = blk(hidden_states=sample, temb=emb, res_hidden_states_tuple=r,
                         encoder_hidden_states=up_kwargs["encoder_hidden_states"],
                         cross_attention_kwargs=up_kwargs["cross_attention_kwargs"],
                         upsample_size=upsample_size, attention_mask=up_kwargs["attention_mask"],
                         encoder_attention_mask=up_kwargs["encoder_attention_mask"])
        else:
            sample = blk(hidden_states=sample, temb=emb, res_hidden_states_tuple=r, upsample_size=upsample_size)
    return sample


def _cached_forward_unet2d(model, rt: Runtime, site: dict, original_forward, args, kwargs):
    from diffusers.models.unets.unet_2d import UNet2DOutput

    a = _bind(original_forward, args, kwargs)
    sample, timestep, class_labels = a["sample"], a["timestep"], a.get("class_labels")
    if model.config.center_input_sample:
        sample = 2 * sample - 1.0
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
    elif timesteps.dim() == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    emb = model.time_embedding(model.time_proj(timesteps).to(dtype=model.dtype))
    if model.class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        if model.config.class_embed_type == "timestep":
            class_labels = model.time_proj(class_labels)
        emb = emb + model.class_embedding(class_labels).to(dtype=model.dtype)

    branch = site["branch"]
    sample = model.conv_in(sample)
    res = (sample,)
    for blk in list(model.down_blocks)[:branch]:
        sample, r = blk(hidden_states=sample, temb=emb)
        res += r
    sample = _up_path(model, rt.reuse(1), res, emb, branch, {}, cond=False)
    sample = model.conv_out(model.conv_act(model.conv_norm_out(sample)))
    if model.config.time_embedding_type == "fourier":
        sample = sample / timesteps.reshape((sample.shape[0], *([1] * len(sample.shape[1:]))))
    if not a.get("return_dict", True):
        return (sample,)
    return UNet2DOutput(sample=sample)


def _cached_forward_unet2d_condition(model, rt: Runtime, site: dict, original_forward, args, kwargs):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    a = _bind(original_forward, args, kwargs)
    for k in ("down_block_additional_residuals", "mid_block_additional_residual",
              "down_intrablock_additional_residuals"):
        if a.get(k) is not None:
            raise ValueError(f"cachequant: `{k}` (ControlNet / T2I-Adapter) is not supported with caching yet")
    sample = a["sample"]
    cross_kwargs = a.get("cross_attention_kwargs")
    if cross_kwargs is not None and cross_kwargs.get("gligen") is not None:
        raise ValueError("cachequant: GLIGEN cross_attention_kwargs are not supported with caching yet")
    up_factor = 2**model.num_upsamplers
    forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])
    attention_mask, encoder_attention_mask = a.get("attention_mask"), a.get("encoder_attention_mask")
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if model.config.center_input_sample:
        sample = 2 * sample - 1.0
    ehs, added = a.get("encoder_hidden_states"), a.get("added_cond_kwargs")
    emb = model.time_embedding(model.get_time_embed(sample=sample, timestep=a["timestep"]), a.get("timestep_cond"))
    class_emb = model.get_class_embed(sample=sample, class_labels=a.get("class_labels"))
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if model.config.class_embeddings_concat else emb + class_emb
    aug_emb = model.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
    if model.config.addition_embed_type == "image_hint":
        aug_emb, hint = aug_emb
        sample = torch.cat([sample, hint], dim=1)
    emb = emb + aug_emb if aug_emb is not None else emb
    if model.time_embed_act is not None:
        emb = model.time_embed_act(emb)
    ehs = model.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)

    branch = site["branch"]
    sample = model.conv_in(sample)
    res = (sample,)
    for blk in list(model.down_blocks)[:branch]:
        if getattr(blk, "has_cross_attention", False):
            sample, r = blk(hidden_states=sample, temb=emb, encoder_hidden_states=ehs,
                            attention_mask=attention_mask, cross_attention_kwargs=cross_kwargs,
                            encoder_attention_mask=encoder_attention_mask)
        else:
            sample, r = blk(hidden_states=sample, temb=emb)
        res += r
    up_kwargs = dict(encoder_hidden_states=ehs, cross_attention_kwargs=cross_kwargs, attention_mask=attention_mask,
                     encoder_attention_mask=encoder_attention_mask, forward_upsample_size=forward_upsample_size)
    sample = _up_path(model, rt.reuse(1), res, emb, branch, up_kwargs, cond=True)
    if model.conv_norm_out:
        sample = model.conv_act(model.conv_norm_out(sample))
    sample = model.conv_out(sample)
    if not a.get("return_dict", True):
        return (sample,)
    return UNet2DConditionOutput(sample=sample)


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
    j = len(model.up_blocks) - site["branch"]
    prefix = f"up_blocks.{j}.resnets.0."
    return {k: v for k, v in _concat_splits(model, site).items() if k.startswith(prefix)}


UNET2D = register(Adapter(
    name="unet2d", classes=("UNet2DModel",), channel_dim=1, resolve_site=_resolve_site, install=_install,
    cached_forward=_cached_forward_unet2d, keep_8bit=_keep_8bit, concat_splits=_concat_splits,
    cache_consumers=_cache_consumers,
))
UNET2D_CONDITION = register(Adapter(
    name="unet2d-condition", classes=("UNet2DConditionModel",), channel_dim=1, resolve_site=_resolve_site,
    install=_install, cached_forward=_cached_forward_unet2d_condition, keep_8bit=_keep_8bit,
    concat_splits=_concat_splits, cache_consumers=_cache_consumers,
))
