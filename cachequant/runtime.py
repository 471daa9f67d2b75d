"""Per-model state shared by the cache hooks and the quantized layers during sampling.

A diffusers pipeline calls the denoiser once per entry of ``scheduler.timesteps`` (PNDM's PLMS
mode repeats one timestep, Heun doubles them), so cachequant indexes everything — the cache
schedule, the per-timestep activation ranges, the DEC coefficients — by *model call* within one
pipeline run, not by timestep value. The counter is reset whenever the pipeline calls
``scheduler.set_timesteps`` at the start of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Runtime:
    num_calls: int
    full_steps: frozenset[int]
    step: int = 0
    """Index of the model call being executed."""
    calls: int = 0
    """Model calls made since the last reset."""
    batch: int = 0
    """Global index of the calibration batch being run (orders per-batch statistics)."""
    quant_mode: str = "off"
    """'off' (full precision), 'observe' (record activation ranges), 'quant' (quantized)."""
    cache: torch.Tensor | None = None
    """The stored deep feature (UNet: up-block output; DiT: the span's deviation)."""
    cache_step: int = -1
    cache_dec: tuple[torch.Tensor, torch.Tensor] | None = None
    """(a, b), each (num_calls, C): X_full ≈ a[t]·X_cached + b[t] per channel."""
    recorder: list[torch.Tensor] | None = None
    """When set, the cached feature of every step is appended here (DPS / DEC fitting)."""
    vc: torch.Tensor | None = None
    """(num_calls, C) variance-compensation factors for the predicted noise, or None."""
    call_log: list | None = None
    """When set, every model call is logged as (step, args, kwargs, output) on the CPU."""
    step_t: torch.Tensor | None = None
    """Device copy of ``step`` (int64, one element), set by kernel backends: GPU kernels and
    CUDA-graph replays read the model-call index from memory instead of a baked-in constant."""
    attn_sdpa: bool = False
    """Kernel backends run attention matmuls with fused SDPA (fp16/bf16) instead of fake-quant."""

    def reset(self) -> None:
        self.calls = 0
        self.step = 0
        self.cache = None
        self.cache_step = -1

    @property
    def is_full(self) -> bool:
        return self.step in self.full_steps

    def store(self, feature: torch.Tensor) -> None:
        self.cache = feature.detach()
        self.cache_step = self.step
        if self.recorder is not None:
            self.recorder.append(feature.detach().float().cpu())

    def reuse(self, channel_dim: int) -> torch.Tensor:
        """The cached feature for the current (cached) step, with the cache-DEC correction."""
        if self.cache is None:
            raise RuntimeError(
                f"cachequant: step {self.step} is a cached step but no feature was stored; the "
                "schedule must start with a full step (step 0)"
            )
        x = self.cache
        if self.cache_dec is not None:
            a, b = self.cache_dec
            shape = [1] * x.dim()
            shape[channel_dim] = -1
            x = x * self.at_step(a).to(x.dtype).view(shape) + self.at_step(b).to(x.dtype).view(shape)
        return x

    def at_step(self, table: torch.Tensor) -> torch.Tensor:
        """Row ``step`` of a per-call table; read through ``step_t`` when set (graph-safe)."""
        if self.step_t is not None and table.device == self.step_t.device:
            return table.index_select(0, self.step_t)[0]
        return table[self.step]
