"""The hooks on the denoiser itself: the per-call bookkeeping of the step clock, and the output
transforms (variance compensation).

These two are PyTorch's own module hooks (a forward pre-hook and a forward hook), not a forward
wrapper: with ``enable_model_cpu_offload``, diffusers re-installs accelerate's offload wrapper on
the denoiser after every pipeline call, restoring the forward it first wrapped and dropping any
wrapper installed on top since. Module hooks are kept by that, by ``torch.compile`` (which traces
them) and by diffusers' registry. Everything that replaces a module's computation (cache, quantized
layers, CUDA graphs) is a named hook in diffusers' registry.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..pipecall import timestep_of
from .clock import StepClock, compiling


class DenoiserHooks:
    def __init__(self, model: nn.Module, clock: StepClock, on_call: Callable[[Any], None] | None = None):
        self.clock = clock
        self.on_call = on_call
        """Called (eager calls only) with the call's timestep before the clock checks it."""
        self.outputs: list[Callable[[nn.Module, Any], Any]] = []
        """Functions (module, output) -> output applied after every call, in order."""
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post)]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not compiling():
            t = timestep_of(args, kwargs)
            if self.on_call is not None:
                self.on_call(t)
            self.clock.check_call(t)
        self.clock.begin_call()  # the call's branch within its position (compiled: one graph per branch)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        for fn in self.outputs:
            output = fn(module, output)
        return output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
