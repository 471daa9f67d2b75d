"""8-bit attention matmuls inside the transformer families' own attention processors.

Flux's ``FluxAttnProcessor``, SD3's ``JointAttnProcessor2_0``, Sana's cross-attention
``SanaAttnProcessor2_0`` and Wan's ``WanAttnProcessor`` differ in everything around attention
(joint text / image streams, rotary embeddings, q / k norms, fused projections, output splits) and
agree on its middle: one call of ``torch.nn.functional.scaled_dot_product_attention`` per module
call, made directly (SD3, Sana) or by the native backend of diffusers' ``dispatch_attention_fn``
(Flux, Wan). :class:`SDPAOperandProcessor` therefore runs the family's own processor unchanged
and computes only that one SDPA call explicitly (QKᵀ, softmax, ·V) with its four operands through
``operand(name, x)``, as :class:`~cachequant.quant.attention.QuantAttnProcessor` does for
diffusers' stock processor. No processor is re-implemented, so whatever a diffusers release
changes around the attention call is followed.

The interception is a :class:`torch.overrides.TorchFunctionMode` entered around the inner
processor's call only: it sees that module's call on that thread, nothing global is patched, other
models and modules are untouched, and ``torch.compile`` traces it without a graph break.
diffusers' attention-backend registry cannot do this: its backends are members of a closed enum
(``AttentionBackendName``) and are not told which module calls them, and SD3's and Sana's
processors do not dispatch at all.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from types import FunctionType

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["SDPAOperandProcessor", "explicit_attention", "sdpa_operand_processor"]

Operand = Callable[[str, torch.Tensor], torch.Tensor]


def explicit_attention(operand: Operand, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                       scale: float | None = None, *, enable_gqa: bool = False,
                       max_scores: int | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (same signature after ``operand``) as two explicit
    matmuls whose operands q, k, p (softmax probabilities) and v pass through ``operand``. Masks
    follow SDPA: a boolean mask marks the keys to attend, a float mask is added to the scores; a
    row with every key masked gives zeros (SDPA's math path).

    ``max_scores`` bounds the score elements held at once: the queries are taken in blocks of rows
    so that one block's B·H·rows·S scores fit. Softmax is per row, so the blocks compute exactly the
    rows of the whole; only pass it when ``operand`` treats "p" elementwise (a quantizer with a
    static range), not when it must see the whole tensor (a range observer). Why: the full L×S
    probabilities of every head are 1 GiB in fp16 for one Flux image at 1024² (4,608 tokens, 24
    heads) and do not fit at all for video-length token counts."""
    if dropout_p:
        raise ValueError("8-bit attention is an inference path: dropout_p must be 0")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = operand("q", query), operand("k", key), operand("v", value)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    rows = L if max_scores is None else max(1, max_scores // max(1, q.shape[:-2].numel() * S))
    if rows >= L:
        return _attend(operand, q, k, v, attn_mask, scale)
    per_row = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == L
    return torch.cat([_attend(operand, q[..., i:i + rows, :], k, v,
                              attn_mask[..., i:i + rows, :] if per_row else attn_mask, scale)
                      for i in range(0, L, rows)], dim=-2)


def _attend(operand: Operand, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask) · v for already-transformed q, k, v; p through ``operand``."""
    scores = q @ k.transpose(-1, -2) * scale
    boolean = attn_mask is not None and attn_mask.dtype == torch.bool
    if boolean:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    probs = scores.softmax(dim=-1)
    if boolean:
        probs = probs.nan_to_num(0.0)
    return operand("p", probs) @ v


class _ExplicitSDPA(TorchFunctionMode):
    """Computes every SDPA call made while it is entered by :func:`explicit_attention`; every other
    torch function runs as it is. Counts the calls (the processor contract is exactly one)."""

    def __init__(self, operand: Operand):
        super().__init__()
        self.operand = operand
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            return explicit_attention(self.operand, *args, max_scores=getattr(self.operand, "max_scores", None),
                                      **kwargs)
        if isinstance(func, FunctionType) and getattr(torch.Tensor, func.__name__, None) is func:
            # a Tensor method written in Python (unflatten, split, ...) is called as a method: the
            # same call, which torch.compile traces (it cannot trace their ``super()`` call when
            # reached through a mode)
            return getattr(args[0], func.__name__)(*args[1:], **kwargs)
        return func(*args, **kwargs)


class SDPAOperandProcessor:
    """A family's attention processor with its SDPA call computed by :func:`explicit_attention`.

    ``processor`` (the module's own) is kept as is, for restore; the wrapper calls a shallow copy
    whose ``_attention_backend`` is pinned to diffusers' native backend, so that a module set to
    flash / sage / xformers attention still reaches SDPA (what runs instead is the explicit
    computation anyway). A plain object, not a module: nothing of it enters the ``state_dict``.
    Make instances with :func:`sdpa_operand_processor`, whose class shows the wrapped processor's
    call signature."""

    def __init__(self, processor, operand: Operand):
        from diffusers.models.attention_dispatch import AttentionBackendName

        self.processor = processor
        self.operand = operand
        self.inner = copy.copy(processor)
        if hasattr(processor, "_attention_backend"):
            self.inner._attention_backend = AttentionBackendName.NATIVE

    def __call__(self, attn, *args, **kwargs):
        mode = _ExplicitSDPA(self.operand)
        with mode:
            out = self.inner(attn, *args, **kwargs)
        if mode.calls != 1:
            raise RuntimeError(
                f"{type(self.processor).__name__} made {mode.calls} scaled_dot_product_attention calls in one module "
                "call; 8-bit attention supports processors that make exactly one (calibrate with quant_attention="
                "False, or report this processor)")
        return out


@functools.cache
def _wrapper_class(processor_class: type) -> type:
    """A subclass of :class:`SDPAOperandProcessor` whose ``__call__`` has ``processor_class``'s
    signature: diffusers' attention modules pass a processor only the keyword arguments its
    signature names (``inspect.signature(self.processor.__call__)``), so the wrapper must name
    exactly those the wrapped processor does."""
    def __call__(self, attn, *args, **kwargs):
        return SDPAOperandProcessor.__call__(self, attn, *args, **kwargs)

    __call__.__wrapped__ = processor_class.__call__  # what inspect.signature reads (torch.compile traces it)
    name = f"SDPAOperand{processor_class.__name__}"
    __call__.__qualname__ = f"{name}.__call__"
    return type(name, (SDPAOperandProcessor,), {"__call__": __call__, "__module__": __name__})


def sdpa_operand_processor(processor, operand: Operand) -> SDPAOperandProcessor:
    """``processor`` wrapped so that its one SDPA call computes through ``operand``."""
    return _wrapper_class(type(processor))(processor, operand)
