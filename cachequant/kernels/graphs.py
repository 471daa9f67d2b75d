"""CUDA-graph capture of the accelerated denoiser: one graph for a full step, one for a cached step.

Why: at batch 1–8 a diffusion denoiser is launch-bound (DiT-XL/2 took ~23 ms per step in fp16
eager at batch 2 and at batch 16 alike), so a cached step that skips most of the arithmetic saves
little wall time until its few hundred kernel launches are replayed as one graph.

Everything that varies between model calls reaches the graph through device memory: the inputs
(copied into static buffers), the model-call index (``Runtime.step_t``, read by the INT8/FP8
kernels, the cache-DEC and VC tables), and the cached feature (the full-step graph writes it to a
static buffer the cached-step graph reads). Python decides full vs cached outside the graphs.
Graphs are keyed by (full/cached, input shapes and dtypes, non-tensor arguments).
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.adapters import denoiser_of
from ..session import session_of


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _key(full: bool, args: tuple, kwargs: dict) -> tuple:
    def sig(v):
        if _is_tensor(v):
            return ("T", tuple(v.shape), v.dtype)
        if isinstance(v, (int, float, bool, str, type(None))):
            return ("V", v)
        raise TypeError(f"CUDA graphs: unsupported argument of type {type(v).__name__} to the denoiser")
    return (full, tuple(sig(a) for a in args), tuple((k, sig(v)) for k, v in sorted(kwargs.items())))


def enable_cuda_graphs(pipe: Any) -> None:
    """Replays the accelerated denoiser's full and cached steps as CUDA graphs (call after
    ``cq.accelerate``; undone by ``cq.restore``). Needs every quantized layer on a kernel backend."""
    _, model = denoiser_of(pipe)
    sess = session_of(model)
    if sess is None:
        raise RuntimeError("enable_cuda_graphs needs an accelerated pipeline: call cq.accelerate(pipe, plan) first")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need the model on a CUDA GPU; it is on {device}")
    rt = sess.runtime
    if rt.quant_mode == "quant":
        rep = sess.kernel_report or {}
        if rep.get("backend") in (None, "fake") or rep.get("fake_layers"):
            raise RuntimeError("CUDA graphs need every quantized layer on a kernel backend (accelerate with "
                               f"backend='int8' or 'fp8'); reference-path layers: {list(rep.get('fake_layers', {}))[:5]}")
    if rt.step_t is None:
        rt.step_t = torch.zeros(1, dtype=torch.int64, device=device)
    eager = sess.run_step
    pool = torch.cuda.graph_pool_handle()
    graphs: dict[tuple, tuple] = {}

    def to_static(v):
        return v.detach().to(device).clone() if _is_tensor(v) else v

    def run_step(args, kwargs):
        key = _key(rt.is_full, args, kwargs)
        entry = graphs.get(key)
        if entry is None:
            sargs = tuple(to_static(a) for a in args)
            skw = {k: to_static(v) for k, v in kwargs.items()}
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                eager(sargs, skw)  # warm-up: Triton compiles, cuBLAS/cuDNN pick algorithms
            torch.cuda.current_stream(device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = eager(sargs, skw)
            entry = graphs[key] = (g, sargs, skw, out)
        g, sargs, skw, out = entry
        for s, v in zip(sargs, args):
            if _is_tensor(s):
                s.copy_(v, non_blocking=True)
        for k, v in kwargs.items():
            if _is_tensor(skw[k]):
                skw[k].copy_(v, non_blocking=True)
        g.replay()
        return out

    sess.run_step = run_step

    def undo():
        sess.run_step = eager
        graphs.clear()

    sess.undo.append(undo)
