"""The execution backends of quantized layers, by name.

A backend turns a quantized layer's data (:mod:`cachequant.quant.layer`) into arithmetic:

* ``available(device)`` — why it cannot run on ``device`` (None: it can);
* ``unsupported(module, hook)`` — why one layer must stay on the reference (None: it can run it);
* ``prepare(module, hook)`` / ``release(module)`` — lay the data out for it, and drop that;
* ``forward(module, hook, x)`` — the layer's output;
* ``prepare_model(model, has_conv)`` — model-wide changes it wants (memory format...), with their
  undos;
* optionally ``group_layers(model, layers)`` — work shared between the prepared layers (one
  quantize pass for an attention's q, k and v: :mod:`cachequant.backends.groups`), with its undos.

A backend is made per accelerated model from a :class:`~cachequant.backends.options.KernelOptions`
(``factory(options)``). The built-in ones (``fake``, ``int8``, ``fp8``) are registered here,
explicitly; another is one :func:`register_backend` call.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn


class Backend(Protocol):
    name: str

    def available(self, device: torch.device) -> str | None: ...
    def unsupported(self, module: nn.Module, hook: Any) -> str | None: ...
    def prepare(self, module: nn.Module, hook: Any) -> None: ...
    def release(self, module: nn.Module) -> None: ...
    def forward(self, module: nn.Module, hook: Any, x: torch.Tensor) -> torch.Tensor: ...
    def prepare_model(self, model: nn.Module, has_conv: bool) -> list[Callable[[], None]]: ...


_FACTORIES: dict[str, Callable[[Any], Backend]] = {}
_PROBES: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[Any], Backend]) -> None:
    """Makes ``backend=name`` build ``factory(options)`` for each accelerated model."""
    if name == "auto":
        raise ValueError("'auto' is not a backend name")
    _FACTORIES[name] = factory
    _PROBES.pop(name, None)


def _builtins() -> None:
    if "fake" in _FACTORIES:
        return
    from .emulated import EmulatedFP8Backend
    from .reference import ReferenceBackend
    from .triton import TritonBackend

    register_backend("fake", ReferenceBackend)
    register_backend("int8", lambda options: TritonBackend("int8", options))
    register_backend("fp8", lambda options: TritonBackend("fp8", options))
    register_backend("fp8-emulated", EmulatedFP8Backend)


def _probe(name: str) -> Backend:
    """An instance with default options, to ask ``available``."""
    if name not in _PROBES:
        from .options import KernelOptions

        _PROBES[name] = _FACTORIES[name](KernelOptions())
    return _PROBES[name]


def make_backend(name: str, options: Any) -> Backend:
    _builtins()
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; known: auto, {', '.join(_FACTORIES)}")
    return _FACTORIES[name](options)


def select_backend(options: Any, device: torch.device) -> Backend:
    """``auto``: ``fp8`` on a CUDA GPU that runs it (compute capability ≥ 8.9), else ``int8`` where
    it can run (≥ 8.0, with Triton), each with per-layer tuning against the float op; else the
    reference. A named backend that cannot run on ``device`` is an error saying why."""
    _builtins()
    requested = options.backend
    if requested == "auto":
        name = next((k for k in ("fp8", "int8") if device.type == "cuda" and _probe(k).available(device) is None),
                    "fake")
    elif requested not in _FACTORIES:
        raise ValueError(f"unknown backend {requested!r}; known: auto, {', '.join(_FACTORIES)}")
    else:
        name = requested
        why = _probe(requested).available(device)
        if why is not None:
            raise ValueError(f"backend {requested!r} cannot run here: {why}")
    backend = make_backend(name, options)
    tune = options.tune if options.tune is not None else (requested == "auto" and options.keep_float_weights)
    if tune and name != "fake":
        if not hasattr(backend, "tune"):
            raise ValueError(f"backend {name!r} does not support tune=True (it has no float fallback)")
        backend.tune = True
    return backend
