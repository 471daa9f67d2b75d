"""Execution backends of the quantized layers (the float reference, Triton INT8 / FP8 kernels),
their options, and CUDA-graph replay."""

from .options import ATTENTION, BACKENDS, KernelOptions
from .registry import Backend, make_backend, register_backend, select_backend

__all__ = ["ATTENTION", "BACKENDS", "Backend", "KernelOptions", "make_backend", "register_backend", "select_backend"]
