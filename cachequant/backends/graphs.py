"""CUDA-graph capture of the accelerated denoiser: one graph per (mode, input signature).

Why: at batch 1–8 a diffusion denoiser is launch-bound (DiT-XL/2 took ~23 ms per step in fp16
eager at batch 2 and at batch 16 alike), so a cached step that skips most of the arithmetic saves
little wall time until its few hundred kernel launches are replayed as one graph.

Everything that varies between calls reaches the graphs through device memory: the inputs
(copied into static buffers), the position (the step clock's buffer, read by the kernels and the
correction tables), and the cached feature (a full-step graph writes it into memory the
cached-step graph reads). The host decides full vs cached (the clock's mode) outside the graphs;
the denoiser's module hooks (clock bookkeeping, variance compensation) run around the replay.
Graphs are keyed by (mode, input shapes and dtypes, non-tensor arguments); the mode includes
whether a full call runs at a position the plan caches (quantization-DEC is off there) and the
call's branch within its step (each branch's full graph writes its own cached feature).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import nn


GRAPH_HOOK = "cachequant.cuda_graphs"
WARMUP_CALLS = 2
"""Eager calls of a graph's inputs before its capture. Under ``torch.compile`` a call that changes
what dynamo guards on recompiles on the next call: the first full call fills the empty feature
cache, so the second full call runs newly compiled code, whose Triton kernels autotune on their
first launch — inside a capture that launches benchmarks and invalidates the graph (measured with
SD3-medium cache-only + compile: ``cudaErrorStreamCaptureInvalidated``). Two warm-ups let that
settle before the capture (the third call of its key); ``tests/test_compile.py`` checks that no
call from the third on compiles."""


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _constant(v: Any) -> tuple:
    """The key of a non-tensor argument: plain values, and lists, tuples and dicts of them (Flux's
    pipeline passes ``joint_attention_kwargs={}``). A tensor inside a container would be baked
    into the graph at capture, so it is refused."""
    if isinstance(v, (int, float, bool, str, type(None))):
        return ("V", v)
    if isinstance(v, (list, tuple)):
        return ("L", type(v).__name__, tuple(_constant(x) for x in v))
    if isinstance(v, dict):
        return ("D", tuple((k, _constant(x)) for k, x in sorted(v.items())))
    what = "a tensor inside a list or dict" if _is_tensor(v) else f"type {type(v).__name__}"
    raise TypeError(f"CUDA graphs: unsupported argument to the denoiser ({what}); run without "
                    "enable_cuda_graphs for this pipeline")


def _key(mode: tuple, args: tuple, kwargs: dict) -> tuple:
    def sig(v):
        return ("T", tuple(v.shape), v.dtype) if _is_tensor(v) else _constant(v)
    return (mode, tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in sorted(kwargs.items())))


class CudaGraphHook(ModelHook):
    def __init__(self, clock, store, device: torch.device):
        super().__init__()
        self.clock, self.store, self.device = clock, store, device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple] = {}

    def new_forward(self, module: nn.Module, *args, **kwargs):
        key = _key((self.clock.mode, self.clock.forced, self.clock.branch), args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(args, kwargs)
        g, sargs, skw, out, _ = entry
        for s, v in zip(sargs, args):
            if _is_tensor(s):
                s.copy_(v, non_blocking=True)
        for k, v in kwargs.items():
            if _is_tensor(skw[k]):
                skw[k].copy_(v, non_blocking=True)
        g.replay()
        return out

    def _capture(self, args: tuple, kwargs: dict) -> tuple:
        eager = self.fn_ref.original_forward

        def static(v):
            return v.detach().to(self.device).clone() if _is_tensor(v) else v

        sargs = tuple(static(a) for a in args)
        skw = {k: static(v) for k, v in kwargs.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):  # Triton compiles, cuBLAS/cuDNN pick algorithms, dynamo settles
                eager(*sargs, **skw)
        torch.cuda.current_stream(self.device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = eager(*sargs, **skw)
        # the cache entries the graphs read and write live in the graphs' memory pool: keep each
        # capture's entries referenced with it, so that a later capture cannot reuse that memory
        return g, sargs, skw, out, dict(self.store.entries)
