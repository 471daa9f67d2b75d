"""One activation-quantize pass for the 8-bit layers that read the same tensor.

An attention's q, k and v projections (and a joint attention's context projections) read the same
hidden states. Calibrated on the same tensor, they get the same activation range, so their codes
are identical. Run separately, each layer pays its own quantize pass.

On an H100, at SD3-medium's image-stream shape (8192×1536×1536,
``results/speed/h100-linear-shapes.json``), that pass costs 9.8 µs. Each projection's 8-bit layer
then takes 58.5 µs against 58.4 µs in fp16, so ``backend="auto"`` keeps all three in fp16.
Quantized once, the three take 139.8 µs against 175.8 µs for three fp16 layers. The outputs are
bit-identical to the separate layers': the same codes feed the same GEMMs.

Eager and CUDA-graph calls only. Under torch.compile each layer's quantize is traced as torch ops
and fuses into the op that produced the input (``backends.triton._cublaslt_traced``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

SIBLINGS = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
"""Layer names, within one attention module, that diffusers' processors call on the same tensor
(``attn.to_q(h); attn.to_k(h); attn.to_v(h)``; for self-attention, the UNets' processors pass
``encoder_hidden_states = hidden_states``)."""


class SharedQuantize:
    """The codes of the last input one member quantized, reused by the other members called with the
    very same tensor object. Each member takes them once; the first member to see a new input, or
    to come back for an input it already took, quantizes again. So an unexpected call order costs
    a quantize pass, never a wrong result. A tensor changed in place between the members' calls
    would be the exception; diffusers' processors do not do that."""

    def __init__(self, members: list[tuple[nn.Module, Any]]):
        self.members = members
        self.names = [hook.name for _, hook in members]
        self.label = "+".join(self.names)
        self.last: tuple | None = None
        """The tuner's memo for the group: (input signature, choice)."""
        self._x: torch.Tensor | None = None
        self._codes: torch.Tensor | None = None
        self._left: set[str] = set()

    def codes(self, name: str, x: torch.Tensor, quantize: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._x is not x or name not in self._left:
            self._x, self._codes, self._left = x, quantize(), set(self.names)
        self._left.discard(name)
        codes = self._codes
        if not self._left:  # every member has its output: hold no tensor between calls
            self._x = self._codes = None
        return codes


def find_groups(model: nn.Module, layers: list[tuple[nn.Module, Any]], compatible: Callable[[list], bool]
                ) -> list[SharedQuantize]:
    """Sibling layers (``SIBLINGS``) of one module that are all in ``layers`` and pass
    ``compatible`` (same kernel kind, activation scales and zero points, input width)."""
    by_module = {id(module): (module, hook) for module, hook in layers}
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            subs = [getattr(parent, n, None) for n in names]
            members = [by_module.get(id(m)) for m in subs if isinstance(m, nn.Module)]
            if len(members) == len(names) and all(m is not None for m in members) and compatible(members):
                groups.append(SharedQuantize(members))
    return groups
