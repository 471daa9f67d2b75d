"""The INT8 / FP8 kernel backends: quantized layers on Triton (and cuBLASLt for FP8 GEMMs).

Each supported layer is packed once (:mod:`cachequant.backends.pack`) and runs as one custom op
(:mod:`cachequant.backends.ops`): an activation-quantize pass, then an 8-bit GEMM or implicit-GEMM
3×3 convolution on channels-last codes whose epilogue folds in dequantization, the zero-point
corrections, bias and quantization-DEC. A layer the kernels cannot run keeps the reference path
and is reported with the reason; nothing is dropped silently.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..runtime.clock import compiling
from ..runtime.hooks import add_hook, release, remove_hook
from .autotune import LayerTuner, cache_file, layer_key
from .groups import SharedQuantize, find_groups
from .ops import gemm_from_codes, quantize_rows
from .ops import qlinear as _define_ops  # noqa: F401  (torch.ops.cachequant.*; Triton loads at first run)
from .pack import FP8_MAX, PACK, default_fp8_gemm, pack_layer, packed, unsupported_reason

GROUP_NORM_HOOK = "cachequant.group_norm"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend:
    def __init__(self, kind: str, options, tune: bool = False):
        self.name = kind
        self.options = options
        self.tune = tune
        """Measure each layer's kernel against its float op at its real input, keep the faster
        (:mod:`cachequant.backends.autotune`); the tuner is made once the device is known."""
        self.tuner: LayerTuner | None = None
        self.shared: dict[str, SharedQuantize] = {}
        """Layer name -> its group of layers sharing one quantize pass (``group_layers``)."""

    def available(self, device: torch.device) -> str | None:
        if not triton_available():
            return "it needs Triton: pip install triton (or a CUDA build of torch)"
        if device.type != "cuda":
            if interpreting():
                return None
            return (f"it runs on a CUDA GPU and the model is on {device}; use backend='fake' on the CPU "
                    "(or TRITON_INTERPRET=1 to test the kernels there, slowly)")
        cc = torch.cuda.get_device_capability(device)
        if cc < (8, 0):
            return f"it needs compute capability >= 8.0 (this GPU has {cc[0]}.{cc[1]})"
        if self.name == "fp8" and cc < (8, 9):
            return "FP8 needs an Ada or Hopper GPU (compute capability >= 8.9); use backend='int8'"
        return None

    def unsupported(self, module: nn.Module, hook) -> str | None:
        return unsupported_reason(module, hook)

    def prepare(self, module: nn.Module, hook) -> None:
        options = self.options
        if self.tune and self.tuner is None and options.keep_float_weights:
            dev = module.weight.device
            self.tuner = LayerTuner(cache_file(dev) if dev.type == "cuda" else None)
        fp8_gemm = options.fp8_gemm or default_fp8_gemm(module.weight.device)
        hook.pack = pack_layer(module, hook, self.name, options.algo, fp8_gemm, options.tiles, options.split_k)
        hook._wdq = None  # the reference path's dequantized copy is not read while the kernel runs

    def release(self, module: nn.Module) -> None:
        release(module, PACK)

    def group_layers(self, model: nn.Module, layers: list[tuple[nn.Module, object]]) -> list[Callable[[], None]]:
        """Groups the sibling layers that can share one quantize pass (:mod:`.groups`)."""
        if not self.options.share_quantize:
            return []
        for group in find_groups(model, layers, _shareable):
            for name in group.names:
                self.shared[name] = group
        return [self.shared.clear]

    def forward(self, module: nn.Module, hook, x: torch.Tensor) -> torch.Tensor:
        group = self.shared.get(hook.name) if self.shared else None
        if group is not None and not compiling():
            if self.tuner is not None and module.weight.numel() and self._group_choice(group, x) == "float":
                return hook.fn_ref.original_forward(x)
            return self._shared_kernel(group, module, hook, x)
        if self.tuner is not None and module.weight.numel() and self._choice(module, hook, x) == "float":
            return hook.fn_ref.original_forward(x)
        return self.kernel(module, hook, x)

    def _choice(self, module: nn.Module, hook, x: torch.Tensor) -> str | None:
        """The tuner's decision for this input; eager calls remember each layer's last one, so that a
        repeated input signature costs a tuple comparison rather than a key and a table lookup."""
        tuner = self.tuner
        dec = hook.dec_active()
        if compiling():
            return tuner.lookup(layer_key(self.name, hook.pack.gemm, module, hook.pack.split, dec, x), compiled=True)
        sig = (x.shape, x.dtype, x.stride(), dec)
        last = tuner.last.get(hook.name)
        if last is not None and last[0] == sig:
            return last[1]
        key = layer_key(self.name, hook.pack.gemm, module, hook.pack.split, dec, x)
        if not tuner.can_measure(x):
            choice = tuner.lookup(key)  # an earlier eager call's; None: the kernel, not remembered
            if choice is None:
                return None
        else:
            gemm_only = _gemm_only(module, hook, x) if hook.pack.gemm == "cublaslt" else None
            choice = tuner.choose(hook.name, key, lambda: self.kernel(module, hook, x),
                                  lambda: hook.fn_ref.original_forward(x), gemm_only)
        tuner.last[hook.name] = (sig, choice)
        return choice

    def _group_choice(self, group: SharedQuantize, x: torch.Tensor) -> str | None:
        """The tuner's decision for a group as a whole: one quantize pass plus every member's GEMM,
        against every member's float op. Each member's own record is measured too, because under
        torch.compile the members run (and are chosen) one by one."""
        tuner = self.tuner
        decs = tuple(hook.dec_active() for _, hook in group.members)
        sig = (x.shape, x.dtype, x.stride(), decs)
        if group.last is not None and group.last[0] == sig:
            return group.last[1]
        key = "shared|" + "+".join(layer_key(self.name, h.pack.gemm, m, h.pack.split, d, x)
                                   for (m, h), d in zip(group.members, decs))
        if not tuner.can_measure(x):
            choice = tuner.lookup(key)
            if choice is None:
                return None
        else:
            for module, hook in group.members:
                self._choice(module, hook, x)

            def kernel():
                for module, hook in group.members:
                    self._shared_kernel(group, module, hook, x)

            def float_op():
                for _, hook in group.members:
                    hook.fn_ref.original_forward(x)

            choice = tuner.choose(group.label, key, kernel, float_op)
            for _, hook in group.members:  # the group's record; the layer's own one for compiled code
                tuner.layers[hook.name] = {**tuner.layers[group.label], "shared_quantize": group.label,
                                           "alone": tuner.layers[hook.name]}
        group.last = (sig, choice)
        return choice

    def _shared_kernel(self, group: SharedQuantize, module: nn.Module, hook, x: torch.Tensor) -> torch.Tensor:
        """The layer's GEMM on the codes its group quantized once: the same result as :meth:`kernel`."""
        p = packed(module)
        info = hook.pack
        dec = hook.dec_active()
        c = x.shape[-1]
        step = hook.clock.step_tensor()
        fp8 = info.kind == "fp8"
        q = group.codes(hook.name, x, lambda: quantize_rows(x.reshape(-1, c).contiguous(), step, p["act_s"],
                                                            p["act_z"], c, 0, fp8))
        y = torch.empty((q.shape[0], p["w"].shape[0]), device=x.device, dtype=x.dtype)
        gemm_from_codes(q, y, p["w"], step, p["act_s"], p["act_z"], p["w_s"], p["w_z"], p["w_sum"], p["bias"],
                        p["dec_a"] if dec else None, p["dec_b"] if dec else None, c, q.shape[0], info.split, fp8,
                        info.w4, info.gemm, 1, 1, (1, 1, 1, 1, 1, 0, 1), info.table, info.split_k)
        return y.view(*x.shape[:-1], -1)

    def kernel(self, module: nn.Module, hook, x: torch.Tensor) -> torch.Tensor:
        p = packed(module)
        info = hook.pack
        dec = hook.dec_active()
        if info.gemm == "cublaslt" and compiling():
            return _cublaslt_traced(module, hook, x, p)
        args = (x, p["w"], hook.clock.step_tensor(), p["act_s"], p["act_z"], p["w_s"], p["w_z"], p["w_sum"],
                p["bias"], p["dec_a"] if dec else None, p["dec_b"] if dec else None, info.split,
                info.kind == "fp8", info.w4, info.algo, info.gemm, info.table, info.split_k)
        if info.conv is not None:
            stride, pad, dil = info.conv
            return torch.ops.cachequant.qconv2d(*args, info.kh, info.kw, stride, pad, dil)
        return torch.ops.cachequant.qlinear(*args)

    def prepare_model(self, model: nn.Module, has_conv: bool) -> list[Callable[[], None]]:
        """NHWC activations end to end when kernel layers include convolutions: the implicit-GEMM
        convs then read and write them without copies, and GroupNorm stays NHWC too (PyTorch's CUDA
        GroupNorm would copy each NHWC input to NCHW and back: two copies per norm)."""
        options = self.options
        undo: list[Callable[[], None]] = []
        if not (options.channels_last and has_conv):
            return undo
        model.to(memory_format=torch.channels_last)
        undo.append(lambda: model.to(memory_format=torch.contiguous_format))
        if options.nhwc_group_norm:
            for mod in model.modules():
                if type(mod) is nn.GroupNorm:  # subclasses may change forward: leave them alone
                    add_hook(mod, NHWCGroupNorm(), GROUP_NORM_HOOK)
                    undo.append(lambda m=mod: remove_hook(m, GROUP_NORM_HOOK))
        return undo


def _shareable(members: list) -> bool:
    """Linear layers of one kind and GEMM on one input part, with the same input width and the same
    activation scales and zero points at every step: their codes of one tensor are identical."""
    infos = [hook.pack for _, hook in members]
    if any(not isinstance(m, nn.Linear) for m, _ in members) or len({m.in_features for m, _ in members}) != 1:
        return False
    if any(i.conv is not None or i.algo != "two-pass" or i.split or (i.kind, i.gemm) != (infos[0].kind, infos[0].gemm)
           for i in infos):
        return False
    ops = [packed(m) for m, _ in members]
    return all(torch.equal(o["act_s"], ops[0]["act_s"]) and torch.equal(o["act_z"], ops[0]["act_z"]) for o in ops[1:])


def _fp8_rows(x: torch.Tensor, p: dict, hook) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes of ``x / s_t`` (saturated at ±448) as (rows, C) — NHWC rows for a conv — and the
    step's activation scale s_t, gathered on the device: the quantize of a tensor-wise cuBLASLt layer
    in torch ops."""
    c = p["w"].shape[1]
    rows = (x.permute(0, 2, 3, 1) if x.dim() == 4 else x).reshape(-1, c)
    s_act = p["act_s"][0].index_select(0, hook.clock.step_tensor())
    return torch.clamp(rows.float() / s_act, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s_act


def _gemm_only(module: nn.Module, hook, x: torch.Tensor) -> Callable[[], object]:
    """The cuBLASLt GEMM of this layer on codes quantized once beforehand: what the layer costs
    when compiled code fuses the quantize into the op that produced ``x``."""
    from .ops import cublaslt_fp8

    p = packed(module)
    q, s_act = _fp8_rows(x, p, hook)
    y = torch.empty((q.shape[0], p["w"].shape[0]), device=x.device, dtype=x.dtype)
    return lambda: cublaslt_fp8(q, p["w"], s_act, p["w_s"], p["bias"], y)


def _cublaslt_traced(module: nn.Module, hook, x: torch.Tensor, p: dict) -> torch.Tensor:
    """The tensor-wise cuBLASLt layer as plain torch ops, for torch.compile: the quantize is an
    elementwise op with a static per-step scale (gathered on the device), so inductor fuses it into
    the op that produced ``x`` — a LayerNorm, GELU, GroupNorm+SiLU — and no separate pass reads the
    activation. Same arithmetic as the eager path: e4m3 code of ``x / s_t`` saturated at ±448."""
    conv = x.dim() == 4
    q, s_act = _fp8_rows(x, p, hook)
    w = p["w"]
    bias = p["bias"]
    late = bias is not None and x.dtype == torch.float32
    y = torch._scaled_mm(q, w.view(torch.float8_e4m3fn).t(), s_act, p["w_s"][:1],
                         bias=None if bias is None or late else bias.to(x.dtype), out_dtype=x.dtype)
    if late:
        y = y + bias
    if conv:
        nb, _, h, wd = x.shape
        return y.view(nb, h, wd, -1).permute(0, 3, 1, 2)
    return y.view(*x.shape[:-1], -1)


class NHWCGroupNorm(ModelHook):
    """Channels-last inputs take the NHWC Triton GroupNorm; any other input PyTorch's own."""

    def new_forward(self, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return torch.ops.cachequant.group_norm_nhwc(x, module.num_groups, module.weight, module.bias, module.eps)
        return self.fn_ref.original_forward(x)
