"""Which layers and attention modules a plan quantizes, from the model and the config."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from ..plan import LayerSpec

STOCK_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")
"""Attention processors whose arithmetic the 8-bit attention processor reproduces
(:class:`~cachequant.quant.attention.QuantAttnProcessor`)."""

SDPA_PROCESSORS = ("FluxAttnProcessor", "JointAttnProcessor2_0", "SanaAttnProcessor2_0", "WanAttnProcessor",
                   "FusedAttnProcessor2_0", "FusedJointAttnProcessor2_0")
"""The processors that make exactly one ``scaled_dot_product_attention`` call per module call: the
transformer families' own, and those ``fuse_qkv_projections()`` installs on UNet, DiT and SD3
attention (q, k and v from one ``to_qkv`` GEMM, k and v from one ``to_kv`` in cross-attention;
Flux's processor handles its fused projections itself). They run as
they are, with that call computed by the 8-bit attention (:mod:`cachequant.quant.sdpa`). Modules
with any other processor (sliced, IP-Adapter, custom) keep theirs and float attention."""

KEPT_FLOAT_WHY = {
    "SanaLinearAttnProcessor2_0": (
        "linear attention (no QK^T, no softmax*V), kept float by design: its "
        "matmuls (V^T K summed over all tokens with a normaliser row, then times Q) are computed in fp32 by "
        "diffusers on purpose, and cost (d+1)/2C of the module's quantized projections (d head dim, C width: "
        "1.4% in Sana 600M, 0.7% in Sana 1.6B)"),
}
"""Why a family's processor keeps float attention by design (the plan's ``attention_kept_float_why``)."""


def layer_specs(model: nn.Module, weight_bits: int, keep_8bit: set[str], splits: dict[str, int],
                w8_patterns: tuple[str, ...] = (), dec_layers: frozenset[str] = frozenset()) -> list[LayerSpec]:
    """Every Linear and Conv2d of ``model`` with its weight bits and input split (if any). Layers in
    ``keep_8bit`` (the adapter's first / last) or matching a ``w8_patterns`` glob stay at 8 bits
    (:func:`check_layer_patterns` refuses a glob that matches none)."""
    specs = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hit = any(fnmatchcase(name, p) for p in w8_patterns)
            specs.append(LayerSpec(name, 8 if name in keep_8bit or hit else weight_bits, splits.get(name),
                                   name in dec_layers))
    return specs


def user_float_layers(specs: list[LayerSpec], patterns: tuple[str, ...]) -> set[str]:
    """The names among ``specs`` that match a ``CacheQuantConfig.float_layers`` glob."""
    return {s.name for s in specs if any(fnmatchcase(s.name, p) for p in patterns)}


def check_layer_patterns(model: nn.Module, patterns: dict[str, tuple[str, ...]]) -> None:
    """Raises ValueError naming the config field and the globs that match no Linear / Conv2d of
    ``model``: a typo would otherwise silently leave the layer as it is."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for field_name, pats in patterns.items():
        unused = [p for p in pats if not any(fnmatchcase(n, p) for n in names)]
        if unused:
            raise ValueError(f"{field_name} pattern(s) {unused} match no Linear / Conv2d layer of "
                             f"{type(model).__name__}; names look like {names[1] if len(names) > 1 else '?'!r}")


def attention_support(module: nn.Module) -> str | None:
    """None if the attention matmuls of ``module`` (a diffusers attention module) can be
    quantized with its current processor, else why not, briefly: the processor's class, and the
    module's state where the class alone is supported."""
    proc = module.processor
    name = type(proc).__name__
    if name in STOCK_PROCESSORS:
        return None
    if name not in SDPA_PROCESSORS:
        return name
    if getattr(proc, "_parallel_config", None) is not None:
        return f"{name} with context parallelism (the attention is split across processes)"
    if name == "WanAttnProcessor" and getattr(module, "add_k_proj", None) is not None:
        return f"{name} with image context (image-to-video: two attentions per call)"
    return None


def attention_modules(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """(modules whose attention matmuls can be quantized, {module: why not} of the others; see
    :func:`kept_float_why` for the longer reasons)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    ok, other = [], {}
    for name, m in model.named_modules():
        if isinstance(m, (Attention, AttentionModuleMixin)):
            why = attention_support(m)
            if why is None:
                ok.append(name)
            else:
                other[name] = why
    return ok, other


def kept_float_why(kept: dict[str, str]) -> dict[str, str]:
    """{processor: why} for the processors among ``kept`` (from :func:`attention_modules`) that keep
    float attention by design rather than for being unknown or reconfigured."""
    return {p: KEPT_FLOAT_WHY[p] for p in sorted(set(kept.values())) if p in KEPT_FLOAT_WHY}
