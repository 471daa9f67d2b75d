"""Named hooks and held data on a model's modules, through diffusers' hook registry.

Every modification cachequant makes to a model is a :class:`diffusers.hooks.ModelHook` registered
under a name starting with ``cachequant.`` on the module it touches, so that it composes with
accelerate's and diffusers' own hooks and is removed by name. Per-module data (quantization
tables, packed kernel weights, correction tables) are *non-persistent buffers*: they follow the
module across devices (``pipe.to("cuda")``, model CPU offload) and never enter ``state_dict``.
Float tables are held as their int32 bit patterns, so that ``pipe.to(torch.bfloat16)`` cannot
round a scale; :func:`held` reads them back as float32 (a view, free on any device and in a
compiled graph).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

PREFIX = "cachequant."
_F32 = "_f32"
_INSTALLED = "_cachequant_installed_forward"


def registry(module: nn.Module):
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module)


def add_hook(module: nn.Module, hook, name: str) -> None:
    """Registers ``hook`` on ``module`` as ``name`` (which must start with ``cachequant.``)."""
    assert name.startswith(PREFIX), name
    registry(module).register_hook(hook, name)
    module.__dict__[_INSTALLED] = module.__dict__.get("forward")


def removal_problem(module: nn.Module, name: str) -> str | None:
    """Why :func:`remove_hook` would refuse to remove ``name`` from ``module`` (None: it can). A
    hook registered after ours in the same registry is the registry's to re-link."""
    reg = getattr(module, "_diffusers_hook", None)
    if reg is not None and reg._hook_order and reg._hook_order[-1] != name:
        return None
    top = module.__dict__.get("forward")
    ours = module.__dict__.get(_INSTALLED)
    if top is ours:
        return None
    if getattr(module, "_hf_hook", None) is not None and module.__dict__.get("_old_forward") is ours:
        return None
    return (f"another library replaced the forward of {type(module).__name__} after cachequant attached "
            f"{name}; remove that library's hooks first")


def remove_hook(module: nn.Module, name: str) -> None:
    """Removes the hook ``name`` from ``module``, keeping anything wrapped around it since.

    diffusers' registry restores the forward it wrapped, which would also throw away a wrapper
    installed on top of ours later, such as accelerate's offload hook (``enable_model_cpu_offload``
    after ``accelerate``). That wrapper calls ``module._old_forward``; it is re-pointed at what is
    left once our hook is gone. Any other foreign wrapper is refused rather than broken."""
    from ..errors import WorkflowError

    reg = getattr(module, "_diffusers_hook", None)
    if reg is None or name not in reg.hooks:
        return
    why = removal_problem(module, name)
    if why is not None:
        raise WorkflowError(f"cannot remove {name}: {why}")
    last = reg._hook_order[-1] == name
    top = module.__dict__.get("forward")
    wrapped_by_accelerate = last and top is not module.__dict__.get(_INSTALLED)
    reg.remove_hook(name, recurse=False)
    left = module.__dict__.get("forward")
    if wrapped_by_accelerate:
        module._old_forward = left if left is not None else module.forward
        module.forward = top
    if last:
        module.__dict__[_INSTALLED] = left
    if not reg.hooks:  # nothing of ours or anyone's left: the module as it was before any hook
        module.__dict__.pop(_INSTALLED, None)
        if _is_plain_bound_forward(module):
            module.__dict__.pop("forward", None)
        del module._diffusers_hook


def _is_plain_bound_forward(module: nn.Module) -> bool:
    f = module.__dict__.get("forward")
    return getattr(f, "__self__", None) is module and getattr(f, "__func__", None) is type(module).forward


def hooks_in(model: nn.Module) -> Iterator[tuple[str, str]]:
    """(module name, hook name) of every diffusers-registry hook in ``model``."""
    for mname, mod in model.named_modules():
        reg = getattr(mod, "_diffusers_hook", None)
        if reg is not None:
            for hname in reg.hooks:
                yield mname, hname


def foreign_hooks(model: nn.Module) -> list[str]:
    """Hooks of other libraries in diffusers' registry (caches, offloading, layerwise casting...)."""
    return [f"{h} on {m or type(model).__name__}" for m, h in hooks_in(model) if not h.startswith(PREFIX)]


# -- data held on modules ------------------------------------------------------------------------


def hold(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Attaches ``tensor`` to ``module`` as a non-persistent buffer (float32 as int32 bits)."""
    if tensor.is_floating_point():
        tensor = tensor.detach().float().contiguous().view(torch.int32)
        name = name + _F32
    module.register_buffer(name, tensor.detach().contiguous(), persistent=False)


def held(module: nn.Module, name: str) -> torch.Tensor | None:
    """A tensor attached by :func:`hold`, float32 again; None if absent."""
    b = module._buffers.get(name + _F32)
    if b is not None:
        return b.view(torch.float32)
    return module._buffers.get(name)


def release(module: nn.Module, prefix: str) -> None:
    """Drops every buffer whose name starts with ``prefix``."""
    for key in [k for k in module._buffers if k.startswith(prefix)]:
        del module._buffers[key]
