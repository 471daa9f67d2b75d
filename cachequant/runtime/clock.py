"""The step clock: which position of the plan the sampler is at, on the host and on the device.

A *position* is an index into the plan's timesteps, one per model call of a whole run (Heun and
PNDM call the model twice at some timesteps; those are separate positions). The clock is moved by
the sampler (:mod:`cachequant.runtime.sampler`: ``set_timesteps`` starts a run, ``set_begin_index``
and the scheduler's own ``step_index`` place it, ``step`` advances it), never by counting model
calls — so image-to-image at strength < 1, custom sigmas, interrupted runs and two pipelines
sharing one model index the same data as the sampler does.

A pipeline may call the model more than once per scheduler step: ``WanPipeline`` with guidance
calls it for the conditional, then the unconditional prediction, as separate calls. Those calls
share the position (and every per-position table); the *branch* numbers them within the step
(0 = first / conditional, 1 = second / unconditional). The plan records ``calls_per_step``; a run
that makes more or fewer calls per step than it is refused (another ``guidance_scale``).

What the model's hooks read from it, without any host read of a tensor (compile-clean):

* ``mode`` — ``"full"`` or ``"cached"``, a plain attribute the host sets before the call
  (``torch.compile`` specializes on it: one graph per mode);
* ``branch`` — a plain int the denoiser's pre-hook sets at each call (from ``calls``, reset by
  the sampler at every position). It only picks which cached feature a call stores or reuses,
  never a table entry, so like ``mode`` it is a host value ``torch.compile`` specializes on: one
  graph per (mode, branch), and a pipeline with one call per step sees only branch 0;
* the position as a one-element int64 *buffer of the model* (:meth:`step_tensor`), which every
  per-position table is indexed with on the device, so that kernels and CUDA-graph replays read
  it from memory. Being a buffer, it moves with the model (``.to``, model CPU offload).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import PlanMismatchError, WorkflowError

STEP_BUFFER = "_cachequant_step"


def compiling() -> bool:
    """True while torch.compile traces (checks that read the host then stay out of the graph)."""
    fn = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling
    return bool(fn())


class StepClock:
    def __init__(self, model: nn.Module, timesteps: Iterable[float], full_steps: Iterable[int] | None,
                 begin: int = 0, calls_per_step: int | None = 1):
        """``full_steps=None``: every position runs in full (calibration's uncached passes).
        ``calls_per_step=None``: any number of calls per position is accepted and counted
        (calibration's first pass, which learns it)."""
        self.model = model
        self.calls_per_step = calls_per_step
        """Model calls the plan expects at every position (2: guidance as separate calls)."""
        self.timesteps = [float(t) for t in timesteps]
        self.full_steps = None if full_steps is None else frozenset(int(s) for s in full_steps)
        self.begin = int(begin)
        self.position: int | None = None
        """Position of the current (or next) model call; None before the first run."""
        self.tentative = False
        """The run has started but the sampler has not placed it yet (assumed at ``begin``)."""
        self.mode = "full"
        self.forced = False
        """A position the plan caches runs in full: the run started there, with nothing cached yet."""
        self.running = False
        self.cache_ready = False
        """A full call has run in this run, so a cached call has a feature to reuse."""
        self.called = False
        """The model was called at the current position (set by the denoiser hook)."""
        self.calls = 0
        """Model calls made at the current position so far (compiled calls included)."""
        self.branch = 0
        """Index of the current call within its position: which cached feature it stores or reuses."""
        model.register_buffer(STEP_BUFFER, torch.zeros(1, dtype=torch.int64, device=_device(model)), persistent=False)

    @property
    def num_positions(self) -> int:
        return len(self.timesteps)

    def adopt(self, timesteps: list[float]) -> None:
        """Takes the timesteps of the sampler's first run as the positions (calibration)."""
        self.timesteps = list(timesteps)

    def step_tensor(self) -> torch.Tensor:
        return self.model._buffers[STEP_BUFFER]

    def detach(self) -> None:
        self.model._buffers.pop(STEP_BUFFER, None)

    # -- moved by the sampler (host) -------------------------------------------------------------
    def start_run(self) -> None:
        """A new run: nothing cached yet; assumed to start at ``begin`` until the sampler says."""
        self.running, self.cache_ready = True, False
        self._place(self.begin, tentative=True)

    def set(self, position: int) -> None:
        """The next model call is at ``position`` (the sampler placed it, or a caller drives the
        model directly). A full call at the previous position makes the cache ready; a position at
        or before the current one starts a new run (nothing cached: a run only moves forward)."""
        if not 0 <= position < self.num_positions:
            raise PlanMismatchError(f"position {position} is outside the plan's {self.num_positions} model calls")
        if position < self.begin:
            raise PlanMismatchError(
                f"this run reaches position {position} of {self.num_positions}, but the plan was calibrated for "
                f"runs that start at position {self.begin} (image-to-image with a smaller strength): calibrate "
                "with the strength you use, or a larger one")
        if not self.running or self.position is None or position <= self.position:
            self.cache_ready = False
        else:
            self.check_step_done()
            if self.mode == "full" and self.called:
                self.cache_ready = True
        self.running = True
        self._place(position, tentative=False)

    def advance(self, to: int | None = None) -> None:
        """After the sampler's step: the next call is at ``to`` (default: the next position)."""
        nxt = (self.position if self.position is not None else self.begin) + 1 if to is None else int(to)
        if nxt >= self.num_positions:  # the run is over; any further call is an error
            if self.running:
                self.check_step_done()
            if self.mode == "full" and self.called:
                self.cache_ready = True
            self.running, self.called, self.calls = False, False, 0
            self.position = self.num_positions
            return
        self.set(nxt)

    def check_step_done(self) -> None:
        """Before the run leaves a position it called the model at: all ``calls_per_step`` calls
        were made (fewer: the run uses less guidance than the plan was calibrated with)."""
        if self.calls_per_step is not None and 0 < self.calls < self.calls_per_step:
            raise PlanMismatchError(
                f"this plan was calibrated with {self.calls_per_step} model calls per scheduler step (classifier-free "
                f"guidance as separate calls, guidance_scale > 1), but this run called the model {self.calls} "
                f"time(s) at position {self.position} (guidance_scale 1 or guidance off?). Calibrate a plan with the "
                "guidance_scale you use (cq.calibrate(..., pipeline_kwargs={'guidance_scale': ...}))")

    def _place(self, position: int, tentative: bool) -> None:
        self.position, self.tentative = position, tentative
        self.called, self.calls, self.branch = False, 0, 0
        planned_full = self.full_steps is None or position in self.full_steps
        self.mode = "full" if planned_full or not self.cache_ready else "cached"
        self.forced = not planned_full and self.mode == "full"
        self.step_tensor().fill_(position)

    # -- the denoiser hook (host, eager only) ----------------------------------------------------
    def check_call(self, timestep) -> None:
        """Consistency of an eager model call with the sampler (skipped inside compiled graphs)."""
        if not self.running or self.position is None or self.position >= self.num_positions:
            raise WorkflowError(
                "the accelerated model was called outside a sampler run: the scheduler that drives it is not "
                "the one cachequant is attached to (a scheduler swapped in after cq.accelerate, or another "
                "pipeline made with from_pipe(..., scheduler=...)): call cq.attach(pipe) on that pipeline. "
                "Code that drives the model itself positions each call with cq.set_step(pipe, position)")
        if self.tentative and timestep is not None:
            found = self.find(timestep)
            if found is not None and found != self.position and found >= self.begin:
                self._place(found, tentative=False)
        if self.calls_per_step is not None and self.calls >= self.calls_per_step:
            raise PlanMismatchError(
                f"the model was called {self.calls + 1} times at sampler position {self.position} without a scheduler "
                f"step in between, and this plan was calibrated with {self.calls_per_step} call(s) per step: the run "
                "uses classifier-free guidance as separate calls (guidance_scale > 1) where the calibration did not, "
                "or more of them. Calibrate a plan with the guidance_scale you use (cq.calibrate(..., "
                "pipeline_kwargs={'guidance_scale': ...})). If another scheduler drives the model, call "
                "cq.attach(pipe) on that pipeline")

    def begin_call(self) -> None:
        """Numbers a model call within its position (the denoiser's pre-hook, every call, compiled
        ones included: a read of ``calls`` that ``torch.compile`` guards on, and writes)."""
        self.branch = self.calls
        self.calls = self.calls + 1
        self.called = True

    def find(self, timestep, start: int = 0) -> int | None:
        """The first position at or after ``start`` whose timestep equals ``timestep`` (host read)."""
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        for i in range(start, self.num_positions):
            if abs(self.timesteps[i] - t) <= 1e-6 * max(1.0, abs(t)):
                return i
        return None


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
