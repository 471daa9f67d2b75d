"""Per-layer choice between the 8-bit kernel and the layer's own float op, measured on this GPU.

Why: an 8-bit layer only pays where the GEMM saves more than the activation-quantize pass costs.
At SD-1.5 batch-1 shapes the best FP8 GEMM is 1.0–1.6× fp16 and an unfused quantize pass costs
about as much as the GEMM, so some layers are faster in fp16; at batch 8 or Flux-size shapes most
are faster in 8-bit. Which ones depends on the GPU, the shape and the library versions, so it is
measured, cuDNN-benchmark style: the first time a layer runs on an input signature (eager, outside
any capture), both candidates are captured into a CUDA graph of ``REPS`` calls and replayed, and
the faster is kept. Decisions are keyed by everything that changes the cost (kernel kind, GEMM
library, layer geometry, input shape, layout and dtype) and persisted per GPU model and torch
version, so a second process measures nothing.

A layer that runs its float op computes the float layer exactly (no quantization error there);
``cq.kernel_report`` lists those layers with both timings.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path
from typing import Callable

import torch

FORMAT = 2
REPS = 20
ROUNDS = 3
CACHE_ENV = "CACHEQUANT_CACHE_DIR"


def cache_file(device: torch.device) -> Path:
    """``$CACHEQUANT_CACHE_DIR`` (default ``~/.cache/cachequant``)/``autotune-<gpu>-torch<version>.json``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "cachequant")
    gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    version = torch.__version__.split("+")[0]
    return Path(root) / f"autotune-v{FORMAT}-{gpu}-torch{version}.json"


def graph_time_us(fn: Callable[[], object]) -> float:
    """GPU time of one ``fn()`` call in µs: ``REPS`` calls captured in one CUDA graph, the median
    of ``ROUNDS`` replays. Replay removes the host's launch cost, which CUDA graphs remove in use."""
    fn()  # warm-up: Triton compiles, cuBLAS picks its algorithm
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    times = []
    for _ in range(ROUNDS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPS)
    del graph
    return statistics.median(times)


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class LayerTuner:
    """Measured choices: ``key -> {"choice": "kernel" | "float", "kernel_us", "float_us"}``.

    ``measure`` is injectable so that the decision logic is tested without a GPU; ``path`` None
    keeps the table in memory only."""

    def __init__(self, path: Path | None, measure: Callable[[Callable[[], object]], float] = graph_time_us):
        self.path = path
        self.measure = measure
        self.table: dict[str, dict] = _load(path)
        self.layers: dict[str, dict] = {}
        """What each layer (by name) chose last, with the input signature it was measured at."""
        self.last: dict[str, tuple] = {}
        """The backend's memo: each layer's last (input signature, choice)."""

    def can_measure(self, x: torch.Tensor) -> bool:
        """Not while torch.compile traces or a CUDA graph captures (the decision made at an earlier
        eager call is read then); a GPU input, or an injected ``measure``."""
        from ..runtime.clock import compiling

        if compiling() or capturing():
            return False
        return x.is_cuda or self.measure is not graph_time_us

    def lookup(self, key: str, compiled: bool = False) -> str | None:
        """The eager decision, or with ``compiled`` the one for compiled code, where the quantize is
        fused into the op that produced the input (the GEMM alone against the float op)."""
        rec = self.table.get(key)
        if rec is None:
            return None
        return rec.get("compiled_choice", rec["choice"]) if compiled else rec["choice"]

    def choose(self, name: str, key: str, kernel: Callable[[], object], float_op: Callable[[], object],
               gemm_only: Callable[[], object] | None = None) -> str:
        """Measures on the first call per ``key``. ``gemm_only``: the 8-bit GEMM on codes quantized
        beforehand, timed for layers whose compiled form fuses the quantize into its producer."""
        rec = self.table.get(key)
        if rec is None:
            kernel_us, float_us = self.measure(kernel), self.measure(float_op)
            # the kernel must win outright: a tie keeps the exact float layer
            rec = {"choice": "kernel" if kernel_us < float_us else "float",
                   "kernel_us": round(kernel_us, 2), "float_us": round(float_us, 2)}
            if gemm_only is not None:
                gemm_us = self.measure(gemm_only)
                rec.update(gemm_us=round(gemm_us, 2), compiled_choice="kernel" if gemm_us < float_us else "float")
            self.table[key] = rec
            self._save()
        self.layers[name] = {"key": key, **rec}
        return rec["choice"]

    def _save(self) -> None:
        if self.path is None:
            return
        from ..utils.io import atomic_path

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.table, indent=0, sort_keys=True))


def _load(path: Path | None) -> dict[str, dict]:
    if path is None or not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # an unreadable cache is measured again and rewritten
    if not isinstance(table, dict):
        return {}
    return {k: v for k, v in table.items() if isinstance(v, dict) and v.get("choice") in ("kernel", "float")}


def layer_key(kind: str, gemm: str, module: torch.nn.Module, split: int, dec: bool, x: torch.Tensor) -> str:
    """Everything that changes either candidate's cost."""
    w = tuple(module.weight.shape) if module.weight.numel() else "dropped"
    geometry = ""
    if isinstance(module, torch.nn.Conv2d):
        geometry = f"s{module.stride[0]}p{module.padding[0]}d{module.dilation[0]}"
    layout = "nhwc" if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) else "rows"
    return (f"{kind}|{gemm}|{type(module).__name__}{geometry}|w{w}|split{split}|dec{int(dec)}|"
            f"x{tuple(x.shape)}|{layout}|{str(x.dtype).removeprefix('torch.')}")
