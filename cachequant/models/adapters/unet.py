"""UNets (``UNet2DModel``, ``UNet2DConditionModel``): DeepCache-style branch caching.

Full step: the whole UNet runs and the input of the last ``layers`` up layers is stored. Cached
step: only ``conv_in``, the down layers whose skip features those up layers read, the up layers
themselves (fed the stored feature, after the cache-DEC correction) and the output head run. One
layer (SD's default) is DeepCache's shallowest branch and the reference's LDM/SD site; whole up
blocks (``cache_branch``) are the coarser sites (see :func:`_resolve_site`).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ...runtime import Runtime
from .base import Adapter, register


_PARTIAL_DOWN = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D")
_PARTIAL_UP = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D")


def _down_units(blk) -> int:
    """Skip features a down block emits: one per layer, one more after its downsampler."""
    return len(blk.resnets) + (blk.downsamplers is not None)


def _split_up(model: nn.Module, layers: int) -> tuple[int, int]:
    """(j, i): the first of the last ``layers`` up layers is layer ``i`` of up block ``j``."""
    left = layers
    for j in range(len(model.up_blocks) - 1, -1, -1):
        n = len(model.up_blocks[j].resnets)
        if left <= n:
            return j, n - left
        left -= n
    raise ValueError(f"this UNet has fewer than {layers} up layers")


def _down_plan(model: nn.Module, layers: int) -> list[tuple[nn.Module, int | None]]:
    """Down blocks a cached step runs: (block, None) in full, (block, k) for its first k layers.

    The last ``layers`` up layers read the first ``layers`` skip features (the up path pops them in
    reverse), so conv_in's output plus the first ``layers - 1`` down units are all a cached step needs.
    """
    plan, need = [], layers - 1
    for blk in model.down_blocks:
        if need <= 0:
            break
        n = _down_units(blk)
        plan.append((blk, None if need >= n else need))
        need -= min(need, n)
    return plan


def _block_layers(model: nn.Module, branch: int) -> int:
    """Up layers in the last ``branch`` up blocks."""
    return sum(len(b.resnets) for b in list(model.up_blocks)[-branch:])


def _trailing_layers(model: nn.Module, site: dict) -> int:
    """Up layers run on a cached step. Plans written before layer-level sites hold only "branch"."""
    return int(site["layers"]) if "layers" in site else _block_layers(model, site["branch"])


def _resolve_site(model: nn.Module, config) -> dict:
    """The cache site: the last ``layers`` up layers (a resnet and, where the block has one, its
    attention) run on cached steps, fed the stored input of the first of them.

    ``cache_branch=b`` runs whole blocks (the last b up blocks); ``cache_layers=R`` any number of
    layers. Neither set: ``UNet2DConditionModel`` runs one layer, DeepCache's shallowest branch
    (``cache_branch_id=0``: conv_in, the last up layer, the head) and the reference's LDM/SD site
    (it caches ``output_blocks[-2]``); ``UNet2DModel`` runs the whole last up block, the deeper
    branch the reference caches for DDPM/CIFAR.
    """
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
    j, i = _split_up(model, layers)
    partial = [(model.up_blocks[j], _PARTIAL_UP)] if i else []
    partial += [(blk, _PARTIAL_DOWN) for blk, k in _down_plan(model, layers) if k is not None]
    for blk, known in partial:
        if type(blk).__name__ not in known:
            raise ValueError(
                f"cache_layers={layers} splits a {type(blk).__name__}, which cachequant runs only whole; "
                f"choose a layer count on a block boundary (cache_branch) or blocks of types {', '.join(known)}")
    if i == 0:
        feature = f"up_blocks.{j - 1}"
    else:
        sub = "attentions" if getattr(model.up_blocks[j], "attentions", None) is not None else "resnets"
        feature = f"up_blocks.{j}.{sub}.{i - 1}"
    site = {"layers": layers, "feature": feature}
    if i == 0:
        site["branch"] = n_up - j
    return site


def _install(model: nn.Module, rt: Runtime, site: dict) -> list:
    module = model.get_submodule(site["feature"])  # old plans name up_blocks.{n_up - branch - 1} here too

    def hook(_module, _inp, out):
        if rt.is_full:
            rt.store(out[0] if isinstance(out, tuple) else out)

    h = module.register_forward_hook(hook)
    return [h.remove]


def _bind(original_forward, args, kwargs) -> dict:
    bound = inspect.signature(original_forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _attend(blk, attn, sample, cond_kwargs):
    """One block attention exactly as the block's own forward calls it."""
    if getattr(blk, "has_cross_attention", False):
        return attn(sample, encoder_hidden_states=cond_kwargs["encoder_hidden_states"],
                    cross_attention_kwargs=cond_kwargs["cross_attention_kwargs"],
                    attention_mask=cond_kwargs["attention_mask"],
                    encoder_attention_mask=cond_kwargs["encoder_attention_mask"], return_dict=False)[0]
    return attn(sample)


def _down_path(model, sample, emb, layers, cond_kwargs, cond) -> tuple:
    """conv_in's output and the skip features the last ``layers`` up layers read."""
    sample = model.conv_in(sample)
    res = (sample,)
    for blk, k in _down_plan(model, layers):
        if k is not None:
            attns = getattr(blk, "attentions", None)
            for i in range(k):
                sample = blk.resnets[i](sample, emb)
                if attns is not None:
                    sample = _attend(blk, attns[i], sample, cond_kwargs)
                res += (sample,)
        elif cond and getattr(blk, "has_cross_attention", False):
            sample, r = blk(hidden_states=sample, temb=emb, encoder_hidden_states=cond_kwargs["encoder_hidden_states"],
                            attention_mask=cond_kwargs["attention_mask"],
                            cross_attention_kwargs=cond_kwargs["cross_attention_kwargs"],
                            encoder_attention_mask=cond_kwargs["encoder_attention_mask"])
            res += r
        else:
            sample, r = blk(hidden_states=sample, temb=emb)
            res += r
    return res


def _up_tail(blk, sample, r, emb, start, cond_kwargs, upsample_size) -> torch.Tensor:
    """Layers ``start:`` of an up block and its upsampler, as the block's forward runs them."""
    from diffusers.models.unets.unet_2d_blocks import apply_freeu

    attns = getattr(blk, "attentions", None)
    freeu = all(getattr(blk, a, None) for a in ("s1", "s2", "b1", "b2"))
    for i in range(start, len(blk.resnets)):
        skip, r = r[-1], r[:-1]
        if freeu:
            sample, skip = apply_freeu(blk.resolution_idx, sample, skip, s1=blk.s1, s2=blk.s2, b1=blk.b1, b2=blk.b2)
        sample = blk.resnets[i](torch.cat([sample, skip], dim=1), emb)
        if attns is not None:
            sample = _attend(blk, attns[i], sample, cond_kwargs)
    for up in blk.upsamplers or ():
        if hasattr(blk, "upsample_type"):  # AttnUpBlock2D
            sample = up(sample, temb=emb) if blk.upsample_type == "resnet" else up(sample)
        else:
            sample = up(sample, upsample_size)
    return sample


def _up_path(model, feature, res, emb, site, cond_kwargs, cond) -> torch.Tensor:
    """Runs the last ``layers`` up layers on the cached feature, exactly as the full forward does."""
    j0, i0 = _split_up(model, _trailing_layers(model, site))
    sample = feature
    n_up = len(model.up_blocks)
    for j in range(j0, n_up):
        blk = model.up_blocks[j]
        n = len(blk.resnets) - (i0 if j == j0 else 0)
        r, res = res[-n:], res[:-n]
        if not cond:
            sample = _up_tail(blk, sample, r, emb, i0, cond_kwargs, None) if j == j0 and i0 else blk(sample, r, emb)
            continue
        upsample_size = res[-1].shape[2:] if (j < n_up - 1 and cond_kwargs["forward_upsample_size"]) else None
        if j == j0 and i0:
            sample = _up_tail(blk, sample, r, emb, i0, cond_kwargs, upsample_size)
        elif getattr(blk, "has_cross_attention", False):
            sample = blk(hidden_states=sample, temb=emb, res_hidden_states_tuple=r,
                         encoder_hidden_states=cond_kwargs["encoder_hidden_states"],
                         cross_attention_kwargs=cond_kwargs["cross_attention_kwargs"],
                         upsample_size=upsample_size, attention_mask=cond_kwargs["attention_mask"],
                         encoder_attention_mask=cond_kwargs["encoder_attention_mask"])
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

    res = _down_path(model, sample, emb, _trailing_layers(model, site), {}, cond=False)
    sample = _up_path(model, rt.reuse(1), res, emb, site, {}, cond=False)
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

    cond_kwargs = dict(encoder_hidden_states=ehs, cross_attention_kwargs=cross_kwargs, attention_mask=attention_mask,
                     encoder_attention_mask=encoder_attention_mask, forward_upsample_size=forward_upsample_size)
    res = _down_path(model, sample, emb, _trailing_layers(model, site), cond_kwargs, cond=True)
    sample = _up_path(model, rt.reuse(1), res, emb, site, cond_kwargs, cond=True)
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
    j, i = _split_up(model, _trailing_layers(model, site))
    prefix = f"up_blocks.{j}.resnets.{i}."
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
